"""The tensor-core LUT layout: packing + PyTorch reference (``layout``), the register decode (``decode``), the
``@triton.jit`` kernel (``jit``), launcher + op ``dc_lightning::tc_linear`` (``op``)."""
