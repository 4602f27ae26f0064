"""The project's exceptions: each carries a message a user can act on.

Command-line entry points catch `MnistFlaxError` and print its message on one
line (no traceback); anything else is a bug and keeps its traceback.
"""

import os
from pathlib import Path


class MnistFlaxError(Exception):
    """Base class for expected failures (bad input, missing data, bad files)."""


class UsageError(MnistFlaxError):
    """A flag value that parsed but makes no sense (batch size 0, say): exit status 2."""


class DataError(MnistFlaxError):
    """MNIST is missing, corrupt, or cannot be downloaded."""


class CheckpointError(MnistFlaxError):
    """A checkpoint or weights file is missing, corrupt, or does not fit the model."""


class ImageError(MnistFlaxError):
    """An input image cannot be read, or holds no digit."""


def brief(value) -> str:
    """A value as it may appear in a one-line message: an array's repr spans lines and can be long."""
    return " ".join(repr(value).split())[:80]


def missing_path(path: str | os.PathLike) -> str:
    """A path that was not found, as a message names it: a relative one says where it was looked for,
    since the command may run in another directory than the one the user thinks of."""
    path = Path(path)
    return str(path) if path.is_absolute() else f"{path} (taken from the current directory, {Path.cwd()})"
