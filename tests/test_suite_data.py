"""The suite finds the real MNIST where a user has it, and says so when it cannot."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from mnist_flax import data, idx_files

pytestmark = pytest.mark.slow  # pytest runs of its own, each preparing MNIST

REAL_DATA_TEST = "tests/test_data.py::test_real_mnist"


def start_suite_part(tfds_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("MNIST_FLAX_MANUAL_DIR", "CI")}
    env["TFDS_DATA_DIR"] = str(tfds_dir)
    # -n 0: one test, so no worker processes to start.
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", REAL_DATA_TEST],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_suite_finds_mnist_where_training_left_it(tmp_path, mnist_manual_dir, mnist_data_dir):
    """Without $MNIST_FLAX_MANUAL_DIR, the real-data tests use the IDX files in TFDS's download dir,
    where an online `python -m mnist_flax.train` leaves them, or the dataset an offline one (from
    --manual-dir) prepared in TFDS's data dir; without either, the summary says what was skipped."""
    downloads = tmp_path / "downloaded" / "downloads"
    downloads.mkdir(parents=True)
    for name in data_files(mnist_manual_dir):
        (downloads / name.name).symlink_to(name)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / data.MnistIdx.name).symlink_to(mnist_data_dir / data.MnistIdx.name)  # no IDX file beside it
    # Three independent pytest processes, run side by side.
    runs = [start_suite_part(tmp_path / name) for name in ("downloaded", "prepared", "empty")]
    found_out, prepared_out, missing_out = (run.communicate(timeout=300)[0] for run in runs)
    assert "1 passed" in found_out, found_out[-2000:]
    assert "1 passed" in prepared_out, prepared_out[-2000:]
    assert "1 skipped" in missing_out, missing_out[-2000:]
    assert "1 tests on the real MNIST were skipped" in missing_out and "MNIST_FLAX_MANUAL_DIR=DIR" in missing_out


def data_files(directory):
    return [next(p for p in (directory / f"{n}.gz", directory / n) if p.is_file()) for n in idx_files.FILE_NAMES]
