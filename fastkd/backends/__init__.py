"""Backends of the fused losses. Each registers its kernels as ``torch.library`` custom ops."""
