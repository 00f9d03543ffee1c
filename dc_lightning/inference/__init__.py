"""Inference modules that run from the compressed codes: one file per weight kind (``linear``, ``attention``,
``recurrent``, ``embedding``), the conversion (``conversion``), its static and dynamic checks (``source_check``,
``verify``), tied weights (``ties``) and memory accounting (``memory``)."""
