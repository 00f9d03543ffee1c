"""Triton kernels for the EIE inference path (installed as ``dc_lightning.kernels``)."""
