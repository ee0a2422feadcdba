"""accuquant-pl: AccuQuant post-training quantization of diffusion models with PyTorch Lightning."""

__version__ = "0.1.0"
