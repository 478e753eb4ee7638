"""fourdgen: 4D scene generation and training on PyTorch Lightning."""

__version__ = "0.1.0"
