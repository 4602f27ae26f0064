"""Atomic file writes: a file appears under its final name only when complete.

Write to a temporary file in the same directory, flush and fsync it, rename it
over the final name (atomic on POSIX), then fsync the directory so the rename
itself survives a crash. A crash at any moment leaves the old file or the new
one, never a torn one; a stray temporary is named `.<name>.<random>.tmp`. A directory is
filled under `.<name>.partial-<random>` and renamed into place the same way (staged_directory).
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_directory(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike, stem: str = "") -> list[Path]:
    """Deletes temporaries a killed writer left behind (`.<stem>*.tmp`)."""
    removed = []
    for tmp in Path(directory).glob(f".{stem}*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


@contextlib.contextmanager
def staged_directory(dest: Path) -> Iterator[Path]:
    """A new directory beside `dest` to fill; it becomes `dest` (which must not exist) only when
    the block ends without an error, and is removed whatever happens. OSError if it cannot be made."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield staging
        os.rename(staging, dest)
        fsync_directory(dest.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
