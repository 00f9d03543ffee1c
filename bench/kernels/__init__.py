"""Micro-benchmarks of the kernels and algorithms: EIE sparse / LUT layouts, the codebook step, k-means, Huffman,
whole-network latency."""
