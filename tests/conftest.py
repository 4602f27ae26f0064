"""Shared fixtures: where the real MNIST IDX files are, and MNIST prepared once per session;
a briefly trained checkpoint, and the original PyTorch network for parity tests.

Prerequisites that are missing (MNIST, torch) skip their tests locally but fail
them when $CI is set, so CI cannot pass by skipping.
"""

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import settings

# CI runs the same hypothesis examples every time; locally they vary and find more.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

from mnist_flax import checkpoint, cli, data, loop, runtime, step, train
from mnist_flax import config as config_lib

REPO = Path(__file__).resolve().parent.parent

# Commands the tests start compile from scratch: nothing written to the user's cache, and
# timings (tests/test_resume.py interrupts a run mid-training) as on a first run.
os.environ.setdefault(runtime.COMPILATION_CACHE_ENV, "off")
cli.add_xla_flags()  # in-process computations run the kernels the commands run


def _main_checkout(repo: Path) -> Path:
    """The main checkout of `repo`: itself, or the one a git worktree hangs off."""
    git = repo / ".git"
    if git.is_file():  # A worktree: ".git" holds "gitdir: <main>/.git/worktrees/<name>".
        gitdir = Path(git.read_text().removeprefix("gitdir:").strip())
        if gitdir.parent.name == "worktrees":
            return gitdir.parent.parent.parent
    return repo


def _find_mnist_dir() -> Path:
    if env := os.environ.get(data.MANUAL_DIR_ENV):
        return Path(env)
    candidates = [REPO.parent / "shared" / "mnist", _main_checkout(REPO).parent / "shared" / "mnist"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


@pytest.fixture(scope="session")
def mnist_manual_dir() -> Path:
    """The directory holding the four real MNIST IDX files.

    $MNIST_FLAX_MANUAL_DIR, else <repo>/../shared/mnist. Missing files fail the test under CI
    (where they must be there) and skip it elsewhere.
    """
    path = _find_mnist_dir()
    missing = [n for n in data.FILE_NAMES if not (path / f"{n}.gz").is_file() and not (path / n).is_file()]
    if missing:
        message = f"real MNIST not found: {path} lacks {', '.join(missing)} (set {data.MANUAL_DIR_ENV})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def mnist_data_dir(mnist_manual_dir, tmp_path_factory) -> Path:
    """A temporary TFDS data dir with the real MNIST prepared in it, once per session."""
    data_dir = tmp_path_factory.mktemp("tfds_data")
    data.load_mnist(data_dir=str(data_dir), manual_dir=str(mnist_manual_dir))
    return data_dir


@pytest.fixture(scope="session")
def mnist_arrays(mnist_manual_dir, mnist_data_dir) -> data.MnistArrays:
    """The real MNIST as arrays (prepared once per session)."""
    return data.load_mnist(data_dir=str(mnist_data_dir), manual_dir=str(mnist_manual_dir))


TRAIN_STEPS = 200  # ~97% test accuracy in ~20 s on a laptop CPU: enough to make parity meaningful


def require_torch():
    """The torch module; skips the test without it, or fails it when $CI is set."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("torch is required when $CI is set (the CPU build, torch==2.13.*)")
        return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def test_set(mnist_arrays) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 real test images, uint8 (N, 28, 28, 1), and their labels."""
    return np.asarray(mnist_arrays.test_images), np.asarray(mnist_arrays.test_labels)


@pytest.fixture(scope="session")
def trained_checkpoint(mnist_arrays, test_set, tmp_path_factory) -> Path:
    """A checkpoint (msgpack + sidecar) after TRAIN_STEPS real Adam steps on MNIST."""
    images, labels = np.asarray(mnist_arrays.train_images), np.asarray(mnist_arrays.train_labels)
    config = config_lib.resolve()
    state = step.create_train_state(config)
    state, _, _ = loop.run(state, step.make_train_steps(config), train.batch_source(config, images, labels), 1,
                           should_pause=lambda s, position: position.batch >= TRAIN_STEPS)
    variables = step.model_variables(state)
    test = step.evaluate(variables, *test_set)
    metadata = {"test_accuracy": test["accuracy"], "config": config.to_dict(),
                "num_batches_tracked": TRAIN_STEPS}
    return checkpoint.save_checkpoint(tmp_path_factory.mktemp("trained"), variables, metadata)


@pytest.fixture(scope="session")
def flax_test_logits(trained_checkpoint, test_set) -> np.ndarray:
    variables, _ = checkpoint.load_checkpoint(trained_checkpoint)
    logits_fn = jax.jit(step.predict_logits)
    images = test_set[0]
    return np.concatenate([np.asarray(logits_fn(variables, images[i:i + 1000]))
                           for i in range(0, len(images), 1000)])


@pytest.fixture(scope="session")
def torch_seed():
    """The module defining the original `SeedNet`: <repo>/../shared/bench/torch_seed.py, or a verbatim copy."""
    torch = require_torch()
    candidates = [REPO.parent / "shared" / "bench" / "torch_seed.py",
                  _main_checkout(REPO).parent / "shared" / "bench" / "torch_seed.py"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return _torch_seed_copy(torch)
    spec = importlib.util.spec_from_file_location("torch_seed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("torch_seed", module)
    spec.loader.exec_module(module)
    return module


def _torch_seed_copy(torch):
    """SeedNet exactly as in torch_seed.py, for checkouts without ../shared."""
    import torch.nn as nn
    import torch.nn.functional as F

    class SeedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)
            self.conv3, self.bn3 = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
            self.conv4, self.bn4 = nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)
            self.conv5, self.bn5 = nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            x = F.max_pool2d(x, 2, 2)
            x = F.relu(self.bn3(self.conv3(x)))
            x = F.relu(self.bn4(self.conv4(x)))
            x = F.relu(self.bn5(self.conv5(x)))
            return self.fc(torch.flatten(x, 1))

    return types.SimpleNamespace(SeedNet=SeedNet)
