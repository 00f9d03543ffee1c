"""Weight sharing [DC §3]: 1-D k-means, per-layer codebooks, the codebook step, default bit widths."""
