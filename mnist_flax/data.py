"""MNIST as numpy arrays, prepared once by TFDS into array_record, without TensorFlow.

TFDS's stock `mnist` builder needs TensorFlow (tf.io.gfile, PNG encoding), so this
module has its own small builder that reads the four original IDX files, from a
manual directory or from public mirrors, and stores raw uint8 tensors.
"""

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first prepares are not serialised there
    fcntl = None

from mnist_flax import decoded
from mnist_flax.config import MNIST_NUM_EXAMPLES
from mnist_flax.errors import DataError
from mnist_flax.idx_files import (MANUAL_DIR_ENV, MIRRORS_ENV, MNIST_MIRRORS, MNIST_SHA256, SPLIT_FILES, check_sha256,
                                  download, find_manual_file, parse_idx, read_source)

class MnistArrays(NamedTuple):
    train_images: np.ndarray  # uint8 (60000, 28, 28, 1)
    train_labels: np.ndarray  # int32 (60000,)
    test_images: np.ndarray  # uint8 (10000, 28, 28, 1)
    test_labels: np.ndarray  # int32 (10000,)


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """TFDS's DatasetInfo for a dataset that exists only where it is prepared."""

    def initialize_from_bucket(self) -> None:
        """Nothing to fetch. TFDS calls this for a dataset not prepared yet, to fetch the info of
        the datasets it publishes in its bucket, which this one is not. Its own version also makes
        a temporary directory before it looks and never removes it: one left behind per prepare."""


class MnistIdx(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MNIST from its IDX files, stored as array_record in the original record order.

    Not registered with TFDS (nothing loads it by name). Tests subclass it with a tiny IDX set
    by overriding the class attributes below; a subclass gets its own name, so its prepared
    data never mixes with the real one's.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Images as TFDS's default integer lists.",
        "1.1.0": "Images as their 784 raw bytes: the same arrays, prepared faster.",
    }
    EXPECTED_SHA256: dict[str, str] = MNIST_SHA256
    NUM_EXAMPLES: dict[str, int] = MNIST_NUM_EXAMPLES
    MIRRORS: tuple[str, ...] = MNIST_MIRRORS
    DOWNLOAD_TIMEOUT_S = 10.0
    # TFDS looks for a checksums file next to the builder's code with a check that imports the
    # `importlib_resources` backport (a TFDS dependency only on Python < 3.9), which fails here.
    # There is no such file: the sha256 check above replaces TFDS's checksums.
    code_path = None

    def __init__(self, *, manual_dir: str | os.PathLike | None = None, progress: bool = True, **kwargs):
        self._progress = progress
        manual_dir = manual_dir or os.environ.get(MANUAL_DIR_ENV)
        self._manual_dir = Path(manual_dir).expanduser() if manual_dir else None
        mirrors = os.environ.get(MIRRORS_ENV, "")
        self._mirrors = tuple(m.strip() for m in mirrors.split(",") if m.strip()) or self.MIRRORS
        super().__init__(file_format="array_record", **kwargs)
        self._final_data_dir = self.data_dir  # while it prepares, TFDS points data_dir at a temporary directory

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self,
            description="MNIST handwritten digits, from the original IDX files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8, encoding="bytes"),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            # Records sorted by their integer key, i.e. kept in IDX order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        # Read and verify every file before TFDS writes anything, so a bad file fails fast.
        self.prepared_arrays = {split: self._load_split(split, dl_manager) for split in SPLIT_FILES}
        if self._progress:
            print(f"MNIST: the four IDX files are verified; preparing them in {self._final_data_dir} "
                  "(once: later runs read it from there)", file=sys.stderr)
        return {split: self._generate_examples(*arrays) for split, arrays in self.prepared_arrays.items()}

    def _log_download_bytes(self) -> None:
        """Silent. TFDS would print "Downloading and preparing dataset Unknown size" on stdout before
        this builder has read a file, so before the one-line error of a run that cannot get them;
        _split_generators says what happens once the files are verified."""

    def _log_download_done(self) -> None:
        """Silent: the line _split_generators printed said it already, and TFDS's goes to stdout."""

    def _load_split(self, split: str, dl_manager) -> tuple[np.ndarray, np.ndarray]:
        n = self.NUM_EXAMPLES[split]
        images_name, labels_name = SPLIT_FILES[split]
        images = self._load_file(images_name, (n, 28, 28), dl_manager)
        labels = self._load_file(labels_name, (n,), dl_manager)
        if labels.max(initial=0) > 9:
            raise DataError(f"{labels_name} holds label {labels.max()}, MNIST labels are 0-9.")
        return images[..., None], labels.astype(np.int32)

    def _load_file(self, name: str, dims: tuple[int, ...], dl_manager) -> np.ndarray:
        if self._manual_dir is not None:
            path = find_manual_file(self._manual_dir, name, self.EXPECTED_SHA256[name])
            remedy = (f"replace it with a good copy of {name}.gz from an MNIST mirror such as "
                      f"{self.MIRRORS[0] if self.MIRRORS else MNIST_MIRRORS[0]}")
        else:
            path = download(name, self._mirrors, Path(dl_manager.download_dir), self.DOWNLOAD_TIMEOUT_S)
            remedy = (f"delete it and run again to re-download, or put good copies in a directory "
                      f"and pass --manual-dir DIR or set {MANUAL_DIR_ENV}=DIR")
        raw = read_source(path)
        array = parse_idx(raw, dims, str(path))
        check_sha256(raw, self.EXPECTED_SHA256[name], str(path), remedy)
        return array

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


def decode_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of a prepared split, in record order, decoded by TFDS."""
    source = builder.as_data_source(split=split)
    records = source.__getitems__(range(len(source)))  # One batched read, not 60,000 lookups.
    images = np.stack([r["image"] for r in records]) if records else np.zeros((0, 28, 28, 1), np.uint8)
    labels = np.array([r["label"] for r in records], dtype=np.int32)
    return images, labels


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split's arrays: decoded once, then kept beside it (decoded.py).

    A builder that has just prepared the split still holds the verified IDX arrays TFDS
    wrote (record i is image i): those are kept instead of decoding the records back.
    """
    prepared = getattr(builder, "prepared_arrays", {}).get(split)

    def decode() -> tuple[np.ndarray, np.ndarray]:
        if prepared:  # copied: the IDX arrays are read-only views, decoded ones are writable
            return tuple(np.array(a) for a in prepared)
        return decode_split(builder, split)

    return decoded.read_split(builder.data_dir, split, decode)


@contextlib.contextmanager
def exclusive_prepare(builder: tfds.core.DatasetBuilder):
    """Holds a lock per dataset and data dir, and clears what killed prepares left behind.

    Two processes preparing the same dataset at once (two first runs, parallel tests)
    would both write it and the second rename would fail; with the lock, the second
    waits and then finds the data ready. Under the lock no prepare is running, so any
    `incomplete.*` directory is a dead one's (TFDS never removes those itself).
    """
    dataset_dir = Path(builder.data_dir).parent  # <data dir>/<dataset name>/<version>
    try:
        dataset_dir.mkdir(parents=True, exist_ok=True)
        lock = open(dataset_dir.parent / f".{builder.name}.lock", "a")
    except OSError:  # a read-only data dir: nothing gets prepared there, so nothing to serialise
        yield
        return
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        for stale in dataset_dir.glob("incomplete.*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


@contextlib.contextmanager
def tfds_progress_bars_off():
    """TFDS's own bars (splits, examples, shuffling) while it writes a few seconds' worth of records:
    nested, and written with cursor escapes into logs. The builder prints one line instead."""
    from tensorflow_datasets.core.utils import tqdm_utils

    shown = getattr(tqdm_utils, "_active", True)  # TFDS has a setter but no getter: restored as it was
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(shown)


def load_builder(builder: tfds.core.DatasetBuilder) -> MnistArrays:
    """Prepares `builder` if it is not yet (once per data dir), then reads both splits."""
    with exclusive_prepare(builder), tfds_progress_bars_off():
        builder.download_and_prepare()
    if not builder.info.splits:  # another process prepared it after this builder read its (empty) info
        builder.info.read_from_directory(builder.data_dir)
    arrays = MnistArrays(*read_split(builder, "train"), *read_split(builder, "test"))
    builder.prepared_arrays = {}  # 55 MB the caller now holds as `arrays`
    return arrays


def load_mnist(data_dir: str | None = None, manual_dir: str | None = None, progress: bool = True) -> MnistArrays:
    """MNIST as numpy arrays in the original IDX order.

    data_dir: TFDS data directory (default: TFDS's own, which honours TFDS_DATA_DIR).
    manual_dir: directory holding the four IDX files, gzipped or not (default: the
    MNIST_FLAX_MANUAL_DIR environment variable, else download from public mirrors).
    Only the first call for a data_dir reads the IDX files; later calls reuse its dataset.
    progress: one line on stderr when the dataset is prepared (nothing on later calls).
    """
    return load_builder(MnistIdx(data_dir=data_dir, manual_dir=manual_dir, progress=progress))
