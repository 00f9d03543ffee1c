"""The dense packed-code LUT layout: packing + reference (layout.py), @triton.jit kernel (jit.py), launcher + op dc_lightning::lut_linear (op.py)."""
