"""The dense packed-code LUT layout: packing + PyTorch reference (``layout``), the ``@triton.jit`` kernel (``jit``),
launcher + op ``dc_lightning::lut_linear`` (``op``)."""
