"""Shared fixtures: where the real MNIST IDX files are, and MNIST prepared once per session."""

import os
from pathlib import Path

import pytest

from mnist_flax import data

REPO = Path(__file__).resolve().parent.parent


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
