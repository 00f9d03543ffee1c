"""One-off accuracy and size experiments on the recipes (bit widths, codebook LR, distillation, seed sweeps)."""
