"""The PyTorch original that mnist_flax reimplements: its network and its training loop.

Not part of the mnist_flax package (which never imports torch): it is here so that exported
weights load into the original network, and so that the speed comparison runs against it.

    from pytorch_original import OriginalNet    # run from the repository root
    python -m pytorch_original.train --steps 100 [--compile default] [--channels-last]
"""

from pytorch_original.model import OriginalNet, normalize

__all__ = ["OriginalNet", "normalize"]
