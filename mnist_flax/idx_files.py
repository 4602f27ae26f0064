"""MNIST's four IDX files: their names, checksums and mirrors; read, verified and downloaded.

Nothing here needs TFDS or JAX: data.py's builder prepares the dataset from these files, and
the test harness finds them without starting either.
"""

import gzip
import hashlib
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from mnist_flax.errors import DataError, missing_path

MANUAL_DIR_ENV = "MNIST_FLAX_MANUAL_DIR"
MIRRORS_ENV = "MNIST_FLAX_MIRRORS"  # comma-separated URL prefixes to download from instead

# IDX base names per split: (images, labels).
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES = tuple(name for pair in SPLIT_FILES.values() for name in pair)

# sha256 of the *decompressed* files: the same whichever mirror or gzip produced them
# (TFDS's registered mnist checksums are of one mirror's .gz bytes, so they can't be used).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

HOW_TO_GET = (
    f"get the four MNIST files ({', '.join(n + '.gz' for n in FILE_NAMES)}) from an MNIST "
    f"mirror such as {MNIST_MIRRORS[0]}, put them in one directory, and pass --manual-dir DIR "
    f"or set {MANUAL_DIR_ENV}=DIR"
)


def parse_idx(raw: bytes, dims: tuple[int, ...], source: str) -> np.ndarray:
    """The uint8 array of an IDX file whose dimensions must be exactly `dims`."""
    ndim = len(dims)
    header_len = 4 + 4 * ndim
    # Magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
    if len(raw) < header_len or raw[:4] != bytes([0, 0, 8, ndim]):
        raise DataError(
            f"{source} is not an IDX file of unsigned bytes with {ndim} dimension(s): it starts "
            f"with {raw[:4].hex() or 'nothing'}, expected 000008{ndim:02x}. Replace it with the "
            f"original MNIST file."
        )
    actual = struct.unpack(f">{ndim}I", raw[4:header_len])
    if actual != dims:
        raise DataError(f"{source} has IDX dimensions {actual}, expected {dims}; wrong or damaged file.")
    body = raw[header_len:]
    if len(body) != int(np.prod(dims)):
        raise DataError(
            f"{source} has {len(body)} data bytes after its header, expected {int(np.prod(dims))} "
            f"(truncated or damaged); replace it with the original MNIST file."
        )
    return np.frombuffer(body, np.uint8).reshape(dims)


def check_sha256(raw: bytes, expected: str, source: str, remedy: str) -> None:
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise DataError(
            f"{source}: sha256 of the decompressed bytes is {actual}, expected {expected}. The "
            f"file is corrupt or not the original MNIST file: {remedy}."
        )


def read_source(path: Path) -> bytes:
    """The decompressed bytes of an IDX file, gzipped (`.gz`) or not."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}; replace it with the original MNIST file.") from e


def find_manual_file(manual_dir: Path, name: str, sha256: str = "") -> Path:
    if not manual_dir.is_dir():
        raise DataError(
            f"MNIST manual directory {missing_path(manual_dir)} does not exist or is not a directory; it should "
            f"hold {', '.join(FILE_NAMES)} (each may be gzipped, with .gz)."
        )
    for candidate in (manual_dir / f"{name}.gz", manual_dir / name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"MNIST manual directory {manual_dir} has neither {name}.gz nor {name}"
        f"{f' (sha256 of the decompressed file: {sha256})' if sha256 else ''}; download {name}.gz from "
        f"an MNIST mirror such as {MNIST_MIRRORS[0]} into it. It should hold {', '.join(FILE_NAMES)} "
        f"(each may be gzipped, with .gz)."
    )


def download(name: str, mirrors: tuple[str, ...], dest_dir: Path, timeout_s: float) -> Path:
    """`name`.gz from the first mirror that serves it, cached in `dest_dir`.

    Not TFDS's downloader: it has no timeout and retries ten times with backoff, so without a
    network it takes minutes to fail. Here each socket operation times out and a failing
    mirror is not retried. urllib verifies TLS certificates by default.
    """
    dest = dest_dir / f"{name}.gz"
    if dest.is_file():  # From an earlier, interrupted prepare; the hash check still applies.
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for mirror in mirrors:
        url = f"{mirror}{name}.gz"
        partial = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            partial.replace(dest)  # Never leave a half file under the final name.
            return dest
        except (urllib.error.URLError, OSError) as e:  # URLError, HTTPError, timeouts, resets
            partial.unlink(missing_ok=True)
            failures.append(f"{url}: {getattr(e, 'reason', e)}")
    raise DataError(f"cannot download {name}.gz ({'; '.join(failures)}). Without network access, {HOW_TO_GET}.")
