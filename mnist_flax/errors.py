"""The project's exceptions: each carries a message a user can act on.

Command-line entry points catch `MnistFlaxError` and print its message on one
line (no traceback); anything else is a bug and keeps its traceback.
"""


class MnistFlaxError(Exception):
    """Base class for expected failures (bad input, missing data, bad files)."""


class DataError(MnistFlaxError):
    """MNIST is missing, corrupt, or cannot be downloaded."""


class CheckpointError(MnistFlaxError):
    """A checkpoint or weights file is missing, corrupt, or does not fit the model."""


class ImageError(MnistFlaxError):
    """An input image cannot be read, or holds no digit."""


def brief(value) -> str:
    """A value as it may appear in a one-line message: an array's repr spans lines and can be long."""
    return " ".join(repr(value).split())[:80]
