"""The row layouts of embedding tables (``ell``: sparse rows, ``codes``: dense codes): packing, row lookup, decode and
the PyTorch reference (``layout``). No Triton kernel: a lookup decodes only the rows it is asked for."""
