"""An epoch's batches: shuffled by (key, epoch), padded and masked, grouped for multi-step calls.

The order of an epoch is a pure function of the key and the epoch number, and a group
always starts at a multiple of the group size within the epoch, so a run resumed at a
group boundary takes exactly the steps, in exactly the same slots of the compiled call,
that an uninterrupted one takes.
"""

import functools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np

from mnist_flax.runtime import RUN_ONCE_COMPILER_OPTIONS
from mnist_flax.config import num_batches


class Batch(NamedTuple):
    images: np.ndarray  # uint8 (..., B, 28, 28, 1)
    labels: np.ndarray  # int32 (..., B)
    mask: np.ndarray  # bool (..., B): False marks padding


def epoch_order(key: jax.Array, epoch: int, num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled example indices for one epoch, as (steps, batch_size), and the padding mask.

    Every example is seen once. The last partial batch is padded (with index 0, masked
    out) rather than dropped, so every step has the same shape and compiles once.
    """
    order = np.asarray(_permutation(key, epoch, num_examples))
    steps = num_batches(num_examples, batch_size)
    padded = np.zeros(steps * batch_size, np.int32)
    padded[:num_examples] = order
    mask = np.zeros(steps * batch_size, bool)
    mask[:num_examples] = True
    return padded.reshape(steps, batch_size), mask.reshape(steps, batch_size)


@functools.partial(jax.jit, static_argnums=2, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
def _permutation(key: jax.Array, epoch: int, num_examples: int) -> jax.Array:
    # One program, compiled for a quick start (runtime.py); op by op, the fold-in and the shuffle are
    # four programs. A permutation is integers, so the options do not change it.
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def epoch_batches(images: np.ndarray, labels: np.ndarray, key: jax.Array, epoch: int, *, batch_size: int,
                  group: int = 1, start: int = 0) -> Iterator[Batch]:
    """The epoch's batches from batch `start` on, `group` at a time, stacked along a leading axis.

    Groups start at `start` and then every `group` batches. The epoch's last group is
    filled up with empty batches (a real batch, all masked), which the step skips.
    """
    order, mask = epoch_order(key, epoch, len(images), batch_size)
    for first in range(start, len(order), group):
        rows = np.minimum(np.arange(first, first + group), len(order) - 1)
        real = np.arange(first, first + group) < len(order)
        indices = order[rows]
        yield Batch(images[indices], labels[indices], mask[rows] & real[:, None])
