"""The prepared splits' decoded arrays, kept beside TFDS's files so later runs skip decoding.

Reading a prepared split back through TFDS decodes every record on its own: 70,000
deserialisations, the slowest part of loading MNIST. The first read of a split therefore
also writes its arrays to `<dataset dir>/decoded/<split>.npz`, with a manifest that
records what they were decoded from. A later read uses them only when

- the split's TFDS files are the same ones (name, size and modification time of each), so
  a re-prepared or replaced dataset invalidates them, and
- the .npz still has the sha256 the manifest records, so a damaged one is never used.

Otherwise the split is decoded from TFDS again and the arrays rewritten. The .npz holds
plain arrays and is read with allow_pickle=False. Nothing here is needed for correctness:
on a read-only data dir the arrays are simply decoded each time.
"""

import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mnist_flax.atomic import atomic_write_bytes

DIR = "decoded"
MANIFEST = "manifest.json"
FORMAT = 1  # bump when what is stored changes; older manifests are then ignored


def split_files(dataset_dir: Path, split: str) -> list[Path]:
    """The TFDS files holding `split` (its array_record shards)."""
    return sorted(p for p in dataset_dir.glob(f"*-{split}.*") if p.is_file())


def fingerprint(files: list[Path]) -> list[list]:
    return [[p.name, (s := p.stat()).st_size, s.st_mtime_ns] for p in files]


def read_manifest(directory: Path) -> dict:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else {}


def load_arrays(path: Path, sha256: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) from `path` if it holds exactly what the manifest says, else None."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(raw).hexdigest() != sha256:
        return None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as stored:
            images, labels = stored["images"], stored["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28, 1) or labels.dtype != np.int32 \
            or labels.shape != images.shape[:1]:
        return None
    return images, labels


def read_split(dataset_dir: str | Path, split: str,
               decode: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """`split`'s (images, labels): the kept arrays if they are still valid, else `decode()`'s, kept."""
    dataset_dir = Path(dataset_dir)
    directory = dataset_dir / DIR
    source = fingerprint(split_files(dataset_dir, split))
    entry = read_manifest(directory).get("splits", {}).get(split, {})
    if source and entry.get("source") == source:
        arrays = load_arrays(directory / f"{split}.npz", entry.get("sha256", ""))
        if arrays is not None:
            return arrays
    images, labels = decode()
    if source:
        keep(directory, split, source, images, labels)
    return images, labels


def keep(directory: Path, split: str, source: list, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes the split's arrays, then its manifest entry: the manifest commits them."""
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    raw = buffer.getvalue()
    try:
        directory.mkdir(exist_ok=True)
        atomic_write_bytes(directory / f"{split}.npz", raw)
        manifest = read_manifest(directory) or {"format": FORMAT, "splits": {}}
        manifest["splits"][split] = {"source": source, "sha256": hashlib.sha256(raw).hexdigest()}
        atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    except OSError:  # a read-only or full data dir: decode again next time
        pass
