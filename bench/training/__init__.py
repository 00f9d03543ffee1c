"""What compression costs during training (per-step overhead of pruning and codebook fine-tuning)."""
