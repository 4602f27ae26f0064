"""Shared fixtures: the real MNIST (found where the commands find it, prepared once per session)
and a briefly trained checkpoint. Prerequisites that are missing (MNIST, torch, the onnx and serve
extras) skip their tests locally but fail them when $CI is set, so CI cannot pass by skipping.
Under pytest-xdist a session's workers share what it makes once (session_dir, only_one_worker).
pytest-xdist's controller imports this file too and runs no test, so JAX and numpy are imported
where they are used.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import os
import signal
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from mnist_flax import idx_files, runtime  # these import neither JAX nor numpy

if TYPE_CHECKING:
    import numpy as np

    from mnist_flax import data

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, and no pytest-xdist sharing either (see only_one_worker)
    fcntl = None
SHARED_BETWEEN_WORKERS = fcntl is not None and bool(os.environ.get("PYTEST_XDIST_WORKER"))

# CI runs the same hypothesis examples every time; locally they vary and find more. Registered
# as the file loads, in the controller too.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
PARAMETERS = 8_954  # the PyTorch original's trainable parameters: what CNN must have, and every file records
TRAIN_STEPS = 200  # enough Adam steps for a checkpoint well above chance, so that parity means something

# The tests compile into a cache of their own ($MNIST_FLAX_TEST_COMPILATION_CACHE), never the
# user's, shared by every command a test starts, so that each program compiles once. JAX keys an
# entry by its HLO, the XLA flags and the jaxlib version: a kept entry is used only where it matches.
TEST_CACHE_ENV = "MNIST_FLAX_TEST_COMPILATION_CACHE"


def tests_compilation_cache_dir() -> str:
    return os.environ.get(TEST_CACHE_ENV) or str(Path(runtime.default_compilation_cache_dir()).parent / "test-jax")


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which registers "dsession" in its controller
def pytest_configure(config):
    """A process that runs tests (a worker, or a run without workers) sets up as the commands do,
    and compiles into the tests' cache, which every command it starts inherits."""
    if not config.pluginmanager.has_plugin("dsession"):
        os.environ[runtime.COMPILATION_CACHE_ENV] = tests_compilation_cache_dir()
        runtime.enable_compilation_cache()
        runtime.set_up_process()


@pytest.hookimpl(trylast=True)  # after -m and -k: only the tests that run count
def pytest_collection_modifyitems(items):
    """The files that start processes first (most slow tests first), then the rest, most tests first:
    pytest-xdist (`--dist loadfile`) hands files out in this order, and small last ones even out the workers."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    tests = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (-slow[item.path], -tests[item.path]))


MISSING_MNIST = "real MNIST not found"


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if MISSING_MNIST in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} tests on the real MNIST were skipped: MNIST was found neither in "
            f"${idx_files.MANUAL_DIR_ENV} nor in {tfds_data_dir()}. Set {idx_files.MANUAL_DIR_ENV}=DIR (a folder with "
            "the four IDX files), or run `python -m mnist_flax.train` once, which prepares MNIST there.",
            yellow=True, bold=True)


def session_dir(tmp_path_factory, name: str) -> Path:
    """A temporary directory for the whole session: under pytest-xdist, one that every worker shares."""
    if not SHARED_BETWEEN_WORKERS:
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def only_one_worker(directory: Path):
    """Holds an exclusive lock on `directory`: what one xdist worker makes there, the others wait for."""
    if not SHARED_BETWEEN_WORKERS:
        yield
        return
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def tfds_data_dir() -> Path:
    """TFDS's data dir, where `python -m mnist_flax.train` prepares MNIST and keeps what it downloaded."""
    return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")


def has_mnist(path: Path) -> bool:
    return all((path / f"{n}.gz").is_file() or (path / n).is_file() for n in idx_files.FILE_NAMES)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes holding `array`, as MNIST's files are laid out."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_files_from_prepared(data_dir: Path, directory: Path) -> bool:
    """Writes the four IDX files into `directory` from the MNIST a training run prepared in `data_dir`
    (offline, from --manual-dir, it downloads nothing, so only the prepared dataset is left there).
    False if there is none. data.py checks their sha256 when a fixture prepares from them."""
    from mnist_flax import data
    from mnist_flax.atomic import atomic_write_bytes
    builder = data.MnistIdx(data_dir=str(data_dir))
    if not builder.is_prepared():
        return False
    with only_one_worker(directory):
        if not has_mnist(directory):
            arrays = data.load_builder(builder)
            for split, images, labels in [("train", arrays.train_images, arrays.train_labels),
                                          ("test", arrays.test_images, arrays.test_labels)]:
                images_name, labels_name = idx_files.SPLIT_FILES[split]
                atomic_write_bytes(directory / images_name, idx_bytes(images[..., 0]))
                atomic_write_bytes(directory / labels_name, idx_bytes(labels.astype("uint8")))
    return True


@pytest.fixture(scope="session")
def mnist_manual_dir(tmp_path_factory) -> Path:
    """A directory holding the four real MNIST IDX files, found where the commands find MNIST:
    $MNIST_FLAX_MANUAL_DIR; else the files a training run downloaded into TFDS's data dir; else
    the files written back from the dataset a training run prepared there."""
    env = os.environ.get(idx_files.MANUAL_DIR_ENV)
    if env and has_mnist(Path(env)):
        return Path(env)
    if not env and has_mnist(downloads := tfds_data_dir() / "downloads"):
        return downloads
    written = session_dir(tmp_path_factory, "mnist-idx")
    if not env and write_idx_files_from_prepared(tfds_data_dir(), written):
        return written
    message = f"{MISSING_MNIST} in {env if env else tfds_data_dir()}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def mnist_data_dir(mnist_manual_dir, tmp_path_factory) -> Path:
    """A TFDS data dir with the real MNIST prepared in it, once per session. The tests only read
    it; those about preparing use data dirs of their own."""
    from mnist_flax import data
    data_dir = session_dir(tmp_path_factory, "tfds")  # data.py's own lock serialises the workers' prepares
    data.load_mnist(data_dir=str(data_dir), manual_dir=str(mnist_manual_dir), progress=False)
    return data_dir


@pytest.fixture(scope="session")
def mnist_arrays(mnist_manual_dir, mnist_data_dir) -> data.MnistArrays:
    """The real MNIST as arrays."""
    from mnist_flax import data
    return data.load_mnist(data_dir=str(mnist_data_dir), manual_dir=str(mnist_manual_dir), progress=False)


@pytest.fixture(scope="session")
def test_set(mnist_arrays) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 real test images, uint8 (N, 28, 28, 1), and their labels."""
    import numpy as np
    return np.asarray(mnist_arrays.test_images), np.asarray(mnist_arrays.test_labels)


@pytest.fixture(scope="session")
def trained_checkpoint(mnist_arrays, test_set, tmp_path_factory) -> Path:
    """A checkpoint (msgpack + sidecar) after TRAIN_STEPS real Adam steps on MNIST; under
    pytest-xdist the first worker that needs it trains it, the others load it."""
    from mnist_flax import checkpoint, loop, step, training
    from mnist_flax import config as config_lib
    directory = session_dir(tmp_path_factory, "trained")
    with only_one_worker(directory):
        if found := next(directory.glob("*.msgpack"), None):
            return found
        config = config_lib.resolve()
        batches = training.batch_source(config, mnist_arrays.train_images, mnist_arrays.train_labels)
        state, _, _ = loop.run(step.create_train_state(config), step.make_train_steps(config), batches, 1,
                               should_pause=lambda s, position: position.batch >= TRAIN_STEPS)
        variables = step.model_variables(state)
        metadata = {"test_accuracy": step.evaluate(variables, *test_set)["accuracy"], "config": config.to_dict(),
                    "num_batches_tracked": TRAIN_STEPS}
        return checkpoint.save_checkpoint(directory, variables, metadata)


@pytest.fixture(scope="session")
def flax_test_logits(trained_checkpoint, test_set) -> np.ndarray:
    """The trained checkpoint's logits for the 10,000 test images, in batches of 1,000."""
    import jax
    import numpy as np

    from mnist_flax import checkpoint, step
    variables, _ = checkpoint.load_checkpoint(trained_checkpoint)
    logits = jax.jit(step.predict_logits)
    return np.concatenate([logits(variables, images) for images in np.split(test_set[0], 10)])


def require(module: str, install: str, imported: bool = True):
    """The module, imported (or only found, for a test that needs it in the processes it starts);
    without it the test skips, or fails when $CI is set (CI installs every extra)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is required when $CI is set: {install}")
        pytest.skip(f"{module} is not installed: {install}", allow_module_level=True)
    return importlib.import_module(module) if imported else None


TORCH_INSTALL = "the CPU build, torch==2.13.*"


@pytest.fixture
def env_without_jax(tmp_path) -> dict[str, str]:
    """The environment for a process of this repository in which jax, flax and tensorflow_datasets
    fail to import: whatever it does without them, it does without loading them."""
    blocked = tmp_path / "blocked-imports"
    for package in ("jax", "flax", "tensorflow_datasets"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f"raise ImportError('{package} imported')\n")
    return {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{REPO}"}


@pytest.fixture(scope="session")
def served_url(trained_checkpoint):
    """A real `python -m mnist_flax.serve` process serving the trained checkpoint; its base URL."""
    require("fastapi", "pip install 'mnist-flax[serve]'")
    proc, url = load_script("load_test").start_server(str(trained_checkpoint))
    yield url
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: uvicorn shuts down cleanly, status 0
    assert proc.wait(30) == 0


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
