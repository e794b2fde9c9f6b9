"""stale: uniform-prior flow matching for video diffusion transformers, on PyTorch Lightning."""

__version__ = "0.1.0"
