"""Eager PyTorch definitions of every op: what the kernels are tested against."""
