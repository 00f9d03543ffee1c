"""Inference modules that run from the compressed codes: one file per weight kind, the conversion, its checks and memory accounting."""
