"""fmnist: train, understand, tune and serve Fashion-MNIST classifiers with PyTorch."""

__version__ = "0.1.0"
