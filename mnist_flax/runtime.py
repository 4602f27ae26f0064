"""The process's runtime: the compilation cache, devices and hosts (XLA flags and malloc: cli.py).

Data parallelism: each batch is split over devices on a 1-D mesh, parameters replicated.
The same code runs on one CPU, on several CPU "host devices" (XLA splits the
machine's cores between them), on GPUs or TPUs, and across hosts after
`jax.distributed.initialize()`. The step is the ordinary `train_step`; the
shardings tell XLA where the data lives, and it inserts the all-reduces, so
BatchNorm statistics and the loss are still over the whole batch.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnist_flax.batches import Batch
from mnist_flax.errors import MnistFlaxError

BATCH_AXIS = "batch"

def configure(count: int = 0) -> None:
    """On CPU, runs as `count` host devices (0: JAX's default, one); call before JAX first computes.

    The XLA flags and the allocator's settings come before this, from `cli.run_main`,
    which every command runs first.
    """
    if count > 1:
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError as e:  # JAX already started its backends; too late to split the CPU
            raise MnistFlaxError(f"cannot set {count} CPU devices now: {e}") from None


COMPILATION_CACHE_ENV = "MNIST_FLAX_COMPILATION_CACHE"


def default_compilation_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mnist_flax", "jax")


def enable_compilation_cache() -> str | None:
    """Keeps compiled XLA programs on disk, so that a second run skips compiling them.

    The directory is $MNIST_FLAX_COMPILATION_CACHE (empty or "off": no cache), else
    JAX's own $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/mnist_flax/jax.
    Returns the directory used, or None. Every program is cached, however quick to
    compile: together the small ones (init, step, evaluation) are most of start-up.
    A cached program is the one XLA would compile (the key covers the HLO, the flags
    and the jaxlib version), so results, and resumed runs, are unchanged.
    """
    path = os.environ.get(COMPILATION_CACHE_ENV)
    if path is None:
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_compilation_cache_dir()
    if path.strip().lower() in ("", "off", "0", "none"):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def initialize_distributed() -> None:
    """Joins a multi-host run: one process per host.

    On Cloud TPU, SLURM and similar, JAX finds its peers itself. Elsewhere set
    JAX_COORDINATOR_ADDRESS (host:port of process 0), and JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, which this reads because jax.distributed.initialize does not.
    """
    def env_int(name):
        value = os.environ.get(name)
        try:
            return None if value is None else int(value)
        except ValueError:
            raise MnistFlaxError(f"{name}={value!r} is not a whole number") from None

    jax.distributed.initialize(num_processes=env_int("JAX_NUM_PROCESSES"), process_id=env_int("JAX_PROCESS_ID"))


# Devices per backend when --devices is not given (0: all): one on CPU, where splitting the
# cores into host devices adds all-reduces and gains nothing (docs/performance.md).
DEFAULT_DEVICES = {"cpu": 1}


def default_device_count() -> int:
    if jax.process_count() > 1:
        return 0
    return DEFAULT_DEVICES.get(jax.default_backend(), 0)


def make_mesh(count: int = 0) -> Mesh:
    """A mesh over the first `count` devices (0: all of them)."""
    available = jax.devices()
    count = count or len(available)
    if count > len(available):
        raise MnistFlaxError(f"--devices {count} asked for, but JAX sees {len(available)} "
                             f"({jax.default_backend()}); on CPU set it before anything else runs")
    return Mesh(np.array(available[:count]), (BATCH_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise MnistFlaxError(f"batch size {batch_size} does not split evenly over {mesh.size} devices; "
                             "choose --devices that divides it")


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def batch_sharder(mesh: Mesh):
    """Host batches stacked by step (steps, batch, ...) -> global arrays split along the batch axis.

    On many hosts each process passes the whole global batch and places its own part.
    """
    sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXIS))
    if mesh.size == 1 and jax.process_count() == 1:
        return lambda batches: batches  # one device: plain arrays, the same program as without a mesh

    def shard(batches: Batch) -> Batch:
        rows = batches.labels.shape[1]
        per_process = rows // jax.process_count()
        local = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)[:, local], x.shape),
            batches)

    return shard
