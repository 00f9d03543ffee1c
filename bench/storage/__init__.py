"""The compressed file: storage vs [DC] Tables 4-5, per-layer entropy floors, the loader fuzz, synthetic files."""
