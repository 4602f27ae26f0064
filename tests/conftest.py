"""Shared fixtures: where the real MNIST IDX files are, and MNIST prepared once per session;
a briefly trained checkpoint (kept between sessions while the code is the same), and the PyTorch
original (pytorch_original/) for parity tests.

Prerequisites that are missing (MNIST, torch, the onnx and serve extras) skip their tests locally but fail
them when $CI is set, so CI cannot pass by skipping.

pytest-xdist's controller imports this file too, and runs no test. So JAX, numpy and the package's
modules that import them are imported where they are used, and a process that runs tests sets
itself up in pytest_configure: the controller starts its workers a second sooner.
"""

from __future__ import annotations

import ast
import atexit
import collections
import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from mnist_flax import runtime, sidecar  # these import neither JAX nor numpy
from mnist_flax.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np

    from mnist_flax import data


def end_worker_without_teardown() -> None:
    """The last exit handler of a pytest-xdist worker: ends it once every other handler has run.

    What is left after them is the interpreter's teardown, which frees a whole session's modules
    and compiled programs one by one, at the end of every run, while the controller waits for it.
    Of the two handlers registered before this one, logging's runs here
    and execnet's has nothing to do (it closes gateways, and a worker opens none). A worker with
    more (coverage started with the interpreter, say) is left to end the usual way.
    """
    logging.shutdown()
    runtime.flush_standard_streams()
    os._exit(0)  # the controller reads a worker's result from its channel, never its exit status


KNOWN_EARLIER_EXIT_HANDLERS = 2  # logging's and execnet's
if os.environ.get("PYTEST_XDIST_WORKER") and atexit._ncallbacks() <= KNOWN_EARLIER_EXIT_HANDLERS:
    atexit.register(end_worker_without_teardown)  # before jax and the tests register theirs: runs after them

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, and no pytest-xdist sharing either (see only_one_worker)
    fcntl = None
# Under pytest-xdist the workers share what a session makes once; that needs flock.
SHARED_BETWEEN_WORKERS = fcntl is not None and bool(os.environ.get("PYTEST_XDIST_WORKER"))

# CI runs the same hypothesis examples every time; locally they vary and find more. Registered
# as the file loads, in the controller too: hypothesis's own pytest_configure loads the profile
# that --hypothesis-profile names.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
PARAMETERS = 8_954  # the PyTorch original's trainable parameters: what CNN must have, and every file records

# The tests compile into a cache of their own, never the user's. It is kept between sessions:
# JAX looks a program up by its HLO, XLA flags and jaxlib version, so an entry that no longer
# matches the code is never used, only left to the size bound's eviction. Every command a test
# starts shares it, so each program compiles once, not once per process or per session.
# $MNIST_FLAX_TEST_COMPILATION_CACHE: a directory, or "session" for a fresh one per session.
TEST_CACHE_ENV = "MNIST_FLAX_TEST_COMPILATION_CACHE"
TEST_CACHE_MAX_BYTES = 512 * 2**20  # a whole session's programs take about 12 MiB


@functools.cache
def tests_compilation_cache_dir() -> str:
    from mnist_flax import runtime
    path = os.environ.get(TEST_CACHE_ENV) or str(Path(runtime.default_compilation_cache_dir()).parent / "test-jax")
    if path == "session":
        path = tempfile.mkdtemp(prefix="mnist-flax-tests-compilation-cache-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def restore_missing_access_times(cache_dir: str) -> int:
    """Gives every cached program whose `-atime` file is missing the oldest access time, 0.

    With a size bound JAX keeps each program as KEY-cache plus KEY-atime, written one after the
    other; a process killed between the two (the suite kills processes) leaves a program without
    its atime, and from then on jax 0.10's eviction pass raises on it before every write, so no
    new program is cached: each test process compiles it again. This is the upstream fix's own
    rule (jax-ml/jax#39883: a missing atime reads as 0, the first to go), applied once per process
    until requirements/lock.txt pins a jax that has it. Returns how many it restored.
    """
    try:
        names = set(os.listdir(cache_dir))
    except FileNotFoundError:
        return 0
    missing = [n.removesuffix("-cache") for n in names
               if n.endswith("-cache") and n.removesuffix("-cache") + "-atime" not in names]
    for key in missing:
        with contextlib.suppress(OSError):  # evicted meanwhile by another process
            with open(os.path.join(cache_dir, key + "-atime"), "xb") as f:
                f.write((0).to_bytes(8, "little"))
    return len(missing)


def set_up_test_process() -> None:
    """What a process that runs tests sets before any of them: the tests' compilation cache, for
    it and every command it starts, and the commands' XLA flags and allocator settings, so that
    in-process computations run the kernels, and allocate, as the commands do."""
    import jax

    from mnist_flax import runtime

    cache_dir = tests_compilation_cache_dir()
    restore_missing_access_times(cache_dir)
    os.environ[runtime.COMPILATION_CACHE_ENV] = cache_dir
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(TEST_CACHE_MAX_BYTES)  # read by every JAX the tests start
    jax.config.update("jax_compilation_cache_max_size", TEST_CACHE_MAX_BYTES)
    runtime.enable_compilation_cache()  # and this process too: what a fixture compiled, a command loads
    runtime.set_up_process()


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which registers "dsession" in its controller
def pytest_configure(config):
    if not config.pluginmanager.has_plugin("dsession"):  # a worker, or a run without workers
        set_up_test_process()


MISSING_MNIST = "real MNIST not found"


def tfds_data_dir() -> Path:
    """TFDS's data dir, where `python -m mnist_flax.train` prepares MNIST and keeps what it downloaded."""
    return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")


def has_mnist(path: Path) -> bool:
    from mnist_flax import idx_files
    return all((path / f"{n}.gz").is_file() or (path / n).is_file() for n in idx_files.FILE_NAMES)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes holding `array`, as MNIST's files are laid out."""
    import struct
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_files_from_prepared(data_dir: Path, directory: Path) -> bool:
    """Writes the four IDX files into `directory` from the MNIST a training run prepared in `data_dir`
    (offline, from --manual-dir, it downloads nothing, so only the prepared dataset is left there).
    False if there is none. data.py checks their sha256 when a fixture prepares from them."""
    from mnist_flax import data, idx_files
    from mnist_flax.atomic import atomic_write_bytes
    builder = data.MnistIdx(data_dir=str(data_dir))
    if not builder.is_prepared():
        return False
    with only_one_worker(directory):
        if not has_mnist(directory):
            arrays = data.load_builder(builder)
            splits = {"train": (arrays.train_images, arrays.train_labels),
                      "test": (arrays.test_images, arrays.test_labels)}
            for split, (images, labels) in splits.items():
                images_name, labels_name = idx_files.SPLIT_FILES[split]
                atomic_write_bytes(directory / images_name, idx_bytes(images[..., 0]))
                atomic_write_bytes(directory / labels_name, idx_bytes(labels.astype("uint8")))
    return True


@pytest.fixture(scope="session")
def mnist_manual_dir(tmp_path_factory) -> Path:
    """A directory holding the four real MNIST IDX files, found where the commands find MNIST.

    $MNIST_FLAX_MANUAL_DIR; else the files a training run downloaded into TFDS's data dir; else
    the files written back from the dataset a training run prepared there. Missing files fail the
    test under CI (where they must be there) and skip it elsewhere; the session's summary counts
    those skips and says how to run them.
    """
    from mnist_flax import idx_files
    env = os.environ.get(idx_files.MANUAL_DIR_ENV)
    if env and has_mnist(Path(env)):
        return Path(env)
    downloads = tfds_data_dir() / "downloads"
    if not env and has_mnist(downloads):
        return downloads
    written = session_dir(tmp_path_factory, "mnist-idx")
    if not env and write_idx_files_from_prepared(tfds_data_dir(), written):
        return written
    message = f"{MISSING_MNIST} in {env if env else tfds_data_dir()}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.hookimpl(trylast=True)  # after -m and -k: only the tests that run count
def pytest_collection_modifyitems(items):
    """The files that start processes first (most slow tests first), then the rest, most tests
    first; each file's own order is kept.

    pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands a file to whichever worker is
    free, in this order. Its own order, most tests first, left the one-test end-to-end file and
    the few-test files of real processes for last, so one worker ran them while the other idled.
    Ending on small in-process files evens the workers out.
    """
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    tests = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (-slow[item.path], -tests[item.path]))


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if MISSING_MNIST in str(r.longrepr)]
    if skipped:
        from mnist_flax import idx_files
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


@pytest.fixture(scope="session")
def mnist_data_dir(mnist_manual_dir) -> Path:
    """A TFDS data dir with the real MNIST prepared in it, kept between sessions.

    Preparing it takes about 5 s of one core, and at a session's start every xdist worker waits
    for it. A kept one is used in place, under a digest of the code that writes its files
    (prepared_data_key): data.py's lock serialises a prepare, TFDS publishes a split only once it
    is whole, and decoded.py uses its arrays only while their sha256 matches. The tests only read
    it; those about preparing use data dirs of their own.
    """
    from mnist_flax import data
    data_dir = kept_data_dir() / prepared_data_key()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.utime(data_dir)  # the digests in use are the ones kept longest
    prepare_or_repair(data_dir, lambda: data.load_mnist(data_dir=str(data_dir), manual_dir=str(mnist_manual_dir)))
    drop_all_but_newest(kept_data_dir(), KEEP_DATA_AT_MOST)
    return data_dir


def prepare_or_repair(data_dir: Path, load) -> None:
    """Runs `load()`, which prepares MNIST in `data_dir` or reads it back; if that fails, empties
    `data_dir` and runs it once more, so that a damaged entry (a file removed or cut short, which
    TFDS reports as it reads) is prepared again. A fault of data.py fails the second time too."""
    try:
        load()
        return
    except Exception:
        pass
    with only_one_worker(data_dir):
        try:
            load()  # another worker has prepared it again meanwhile
            return
        except Exception:
            pass
        for entry in data_dir.iterdir():
            if entry.name != ".lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        load()


@pytest.fixture(scope="session")
def mnist_arrays(mnist_manual_dir, mnist_data_dir) -> data.MnistArrays:
    """The real MNIST as arrays (prepared once per session)."""
    from mnist_flax import data
    return data.load_mnist(data_dir=str(mnist_data_dir), manual_dir=str(mnist_manual_dir))


TRAIN_STEPS = 200  # ~97% test accuracy in ~20 s on a laptop CPU: enough to make parity meaningful


def require(module: str, install: str):
    """The module; skips the test without it, or fails it when $CI is set (CI installs every extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        fail_under_ci(module, install)
        return pytest.importorskip(module)


def require_installed(module: str, install: str) -> None:
    """As `require`, for a test that needs the module only in the processes it starts: found,
    not imported into the worker (torch takes 1.6 s of CPU to import)."""
    if importlib.util.find_spec(module) is None:
        fail_under_ci(module, install)
        pytest.skip(f"{module} is not installed: {install}")


def fail_under_ci(module: str, install: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{module} is required when $CI is set: {install}")


TORCH_INSTALL = "the CPU build, torch==2.13.*"


def require_torch():
    return require("torch", TORCH_INSTALL)


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
def test_set(mnist_arrays) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 real test images, uint8 (N, 28, 28, 1), and their labels."""
    import numpy as np
    return np.asarray(mnist_arrays.test_images), np.asarray(mnist_arrays.test_labels)


@pytest.fixture(scope="session")
def trained_checkpoint(mnist_arrays, test_set, tmp_path_factory) -> Path:
    """A checkpoint (msgpack + sidecar) after TRAIN_STEPS real Adam steps on MNIST.

    Trained once per session: under pytest-xdist the first worker that needs it trains it.
    Kept between sessions beside the tests' compiled programs, under a digest of everything
    that decides its bits (see trained_checkpoint_key): training is deterministic, so a kept
    one is the checkpoint this code trains here, and any change to the code trains anew.
    """
    directory = session_dir(tmp_path_factory, "trained")
    with only_one_worker(directory):
        found = next(directory.glob("*.msgpack"), None)
        if found:
            return found
        kept = kept_checkpoints_dir() / trained_checkpoint_key()
        if copy_valid_checkpoint(kept, directory):
            return next(directory.glob("*.msgpack"))
        path = train_checkpoint(mnist_arrays, test_set, directory)
        keep_checkpoint(path, kept)
        return path


# Inside the tests' compilation cache, so that CI's cache of it keeps these too; JAX's size
# bound only counts and evicts the files at the top of that directory.
def kept_checkpoints_dir() -> Path:
    return Path(tests_compilation_cache_dir()) / "trained-checkpoints"


KEEP_AT_MOST = 8  # digests kept: a few checkouts (a worktree, a branch) can share the cache


def kept_data_dir() -> Path:
    return Path(tests_compilation_cache_dir()) / "prepared-mnist"


KEEP_DATA_AT_MOST = 2  # each is 74 MiB


def prepared_data_key(root: Path = REPO) -> str:
    """A digest of what the prepared MNIST's files depend on: data.py and the package modules it
    imports, and the libraries that write them. MNIST needs no entry: data.py verifies the IDX
    files' sha256 before preparing."""
    digest = hashlib.sha256()
    for path in package_modules_imported_by(root / "mnist_flax" / "data.py"):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in ("tensorflow-datasets", "array-record", "numpy"):
        digest.update(f"{dist}=={importlib.metadata.version(dist)}\0".encode())
    return digest.hexdigest()[:24]


def package_modules_imported_by(module: Path) -> list[Path]:
    """`module` and the modules of its package that it imports, directly or not (`from mnist_flax
    import x` and `from mnist_flax.x import y`), sorted."""
    package, found, todo = module.parent, set(), [module]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
                names = node.module.split(".")[1:2] or [alias.name for alias in node.names]
                todo += [package / f"{name}.py" for name in names if (package / f"{name}.py").is_file()]
    return sorted(found)


def trained_checkpoint_key(root: Path = REPO, *run: str) -> str:
    """A digest of what the session's checkpoint depends on: the package's code, this file
    (TRAIN_STEPS, train_checkpoint), the libraries that compute it, the XLA flags and the CPU.
    MNIST needs no entry: data.py verifies the IDX files' sha256. `run`: what else decides the
    bits of another kept checkpoint, such as a command's flags."""
    digest = hashlib.sha256("\0".join(run).encode())
    for path in sorted((root / "mnist_flax").rglob("*.py")) + [root / "tests" / "conftest.py"]:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in ("jax", "jaxlib", "flax", "optax", "numpy"):
        digest.update(f"{dist}=={importlib.metadata.version(dist)}\0".encode())
    digest.update(f"{os.environ.get('XLA_FLAGS', '')}\0{platform.machine()}\0{cpu_description()}".encode())
    return digest.hexdigest()[:24]


def cpu_description() -> str:
    """The first CPU's model and feature flags (Linux), which decide the kernels XLA emits, and
    how many cores this process may use: XLA splits a convolution among them, and one core or
    two gave checkpoints that differ in their last bits."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return f"{platform.processor()}\ncores: {cores}"
    return "\n".join([line for line in cpuinfo.splitlines() if line.startswith(("model name", "flags"))]
                     + [f"cores: {cores}"])


def copy_valid_checkpoint(kept: Path, directory: Path) -> bool:
    """Copies a kept checkpoint into `directory` if it loads (its sidecar's sha256 matches)."""
    found = next(kept.glob("*.msgpack"), None) if kept.is_dir() else None
    if found is None:
        return False
    from mnist_flax import checkpoint
    try:
        checkpoint.load_checkpoint(found)  # a damaged entry is trained again
        for path in (sidecar.path_for(found), found):  # the msgpack last: its presence means both are there
            shutil.copy2(path, directory / path.name)
        os.utime(kept)  # the digests in use are the ones kept longest
    except (CheckpointError, OSError):
        return False
    return True


def keep_checkpoint(path: Path, kept: Path) -> None:
    """Publishes the checkpoint at `path` and its sidecar as `kept`, whole or not at all;
    drops all but the KEEP_AT_MOST newest digests."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=kept.parent))
    for file in (path, sidecar.path_for(path)):
        shutil.copy2(file, staging / file.name)
    try:
        staging.rename(kept)  # atomic; fails if another session published it first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    drop_all_but_newest(kept.parent, KEEP_AT_MOST)


def drop_all_but_newest(directory: Path, keep: int) -> None:
    """Removes all but the `keep` most recently used entries of `directory`, and staging
    directories that a session killed while publishing left behind an hour ago or more."""
    entries = sorted(directory.iterdir(), key=modified, reverse=True)
    stale = [p for p in entries if not p.name.startswith(".")][keep:]
    stale += [p for p in entries if p.name.startswith(".staging-") and time.time() - modified(p) > 3600]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def modified(path: Path) -> float:
    """Its modification time; 0 if another session, pruning too, has just removed it."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def train_checkpoint(mnist_arrays, test_set, directory: Path) -> Path:
    import numpy as np

    from mnist_flax import checkpoint, loop, step, training
    from mnist_flax import config as config_lib
    images, labels = np.asarray(mnist_arrays.train_images), np.asarray(mnist_arrays.train_labels)
    config = config_lib.resolve()
    state = step.create_train_state(config)
    state, _, _ = loop.run(state, step.make_train_steps(config), training.batch_source(config, images, labels), 1,
                           should_pause=lambda s, position: position.batch >= TRAIN_STEPS)
    variables = step.model_variables(state)
    test = step.evaluate(variables, *test_set)
    metadata = {"test_accuracy": test["accuracy"], "config": config.to_dict(),
                "num_batches_tracked": TRAIN_STEPS}
    return checkpoint.save_checkpoint(directory, variables, metadata)


@pytest.fixture(scope="session")
def flax_test_logits(trained_checkpoint, test_set) -> np.ndarray:
    import jax
    import numpy as np

    from mnist_flax import checkpoint, step
    variables, _ = checkpoint.load_checkpoint(trained_checkpoint)
    logits_fn = jax.jit(step.predict_logits)
    images = test_set[0]
    return np.concatenate([np.asarray(logits_fn(variables, images[i:i + 1000]))
                           for i in range(0, len(images), 1000)])


@pytest.fixture(scope="session")
def torch_original():
    """The repository's PyTorch original (pytorch_original/), with torch imported."""
    require_torch()
    return importlib.import_module("pytorch_original")


@pytest.fixture(scope="session")
def served_url(trained_checkpoint):
    """A real `python -m mnist_flax.serve` process serving the trained checkpoint; its base URL."""
    require("fastapi", "pip install 'mnist-flax[serve]'")
    load_test = load_script("load_test")
    proc, url = load_test.start_server(str(trained_checkpoint))
    yield url
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: uvicorn shuts down cleanly, status 0
    assert proc.wait(30) == 0


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
