"""The sparse (EIE sliced-ELL) layout: packing + PyTorch reference (``layout``), the ``@triton.jit`` kernels
(``jit``), heuristics and tuned table (``tuning``), launcher + op ``dc_lightning::eie_linear`` (``op``)."""
