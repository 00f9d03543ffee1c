"""Codebook fine-tuning on the GPU: the fused gradient + rewrite step (step.py)."""
