"""The sparse (EIE sliced-ELL) layout: packing + reference (layout.py), @triton.jit kernels (jit.py), tuning (tuning.py), launcher + op dc_lightning::eie_linear (op.py)."""
