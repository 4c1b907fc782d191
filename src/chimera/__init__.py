"""Chimera: a PyTorch toolkit and benchmark harness for efficient and alternative training."""

__version__ = "0.1.0"
