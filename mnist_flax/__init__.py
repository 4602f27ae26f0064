"""mnist-flax: the classic PyTorch MNIST CNN, reimplemented in pure-functional JAX/Flax."""

__version__ = "0.1.0"
