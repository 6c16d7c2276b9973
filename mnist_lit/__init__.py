"""The guide's MNIST recipe as a PyTorch Lightning project."""

__version__ = "0.1.0"
