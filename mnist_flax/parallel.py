"""Data parallelism: each batch is split over devices on a 1-D mesh, parameters replicated.

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

    The XLA flags and the allocator's settings come before this, from `runtime.set_up_process`,
    which every command runs first.
    """
    if count > 1:
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError as e:  # JAX already started its backends; too late to split the CPU
            raise MnistFlaxError(f"cannot set {count} CPU devices now: {e}") from None


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
