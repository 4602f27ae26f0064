"""The training loop: epochs of steps, with exact resume, periodic saves and a NaN guard.

Where a run stands is plain data (`Position`), saved with the train state so
that an interrupted run, resumed, takes exactly the steps an uninterrupted one
would: the data order is a pure function of (seed, epoch), and the position
says how many of the epoch's batches are done.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from mnist_flax import training
from mnist_flax.errors import MnistFlaxError


@dataclasses.dataclass(frozen=True)
class Position:
    """How far a run has got, and the running metrics of the current epoch."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already done
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def epoch_metrics(self) -> dict:
        count = max(self.count, 1.0)
        return {"loss": self.loss_sum / count, "accuracy": self.correct / count, "count": int(self.count)}


class StepReport(NamedTuple):
    """What `on_step` hears after every step."""

    step: int  # global step count after this step
    epoch: int
    batch: int  # batches of this epoch done
    batches_per_epoch: int
    loss: float  # this batch's mean loss
    accuracy: float  # this batch's accuracy
    images_per_second: float
    position: Position


class NonFiniteLoss(MnistFlaxError):
    """The loss became NaN or infinite; `state` is the last good state, from before that step."""

    def __init__(self, step: int, state, position: Position):
        super().__init__(f"the loss became NaN or infinite at step {step}; training stopped and no "
                         "checkpoint was written from it (try a smaller --learning-rate)")
        self.step, self.state, self.position = step, state, position


def run_epochs(
    state: training.TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    data_key: jax.Array,
    epochs: int,
    batch_size: int,
    position: Position = Position(),
    step_fn: Callable = training.jit_train_step,
    on_step: Callable[[StepReport], None] = lambda report: None,
    on_epoch_end: Callable[[int, dict], None] = lambda epoch, metrics: None,
    should_pause: Callable[[training.TrainState, Position], bool] = lambda state, position: False,
    shard_batch: Callable[[training.Batch], training.Batch] = lambda batch: batch,
) -> tuple[training.TrainState, Position, bool]:
    """Runs from `position` to the end of `epochs`; returns (state, position, finished).

    After each step `should_pause(state, position)` may save and return True to
    stop early (finished False): the caller saves, the loop stays pure of I/O.
    `shard_batch` places each host batch on the devices (see devices.py).
    """
    for epoch in range(position.epoch, epochs):
        order, mask = training.epoch_order(data_key, epoch, len(images), batch_size)
        for b in range(position.batch, len(order)):
            start = time.perf_counter()
            batch = shard_batch(training.Batch(images[order[b]], labels[order[b]], mask[b]))
            new_state, metrics = step_fn(state, batch)
            loss_sum, correct, count = (float(v) for v in jax.device_get(
                (metrics["loss_sum"], metrics["correct"], metrics["count"])))
            if not np.isfinite(loss_sum):
                raise NonFiniteLoss(int(state.step) + 1, state, position)
            state = new_state
            position = Position(epoch, b + 1, position.loss_sum + loss_sum, position.correct + correct,
                                position.count + count)
            on_step(StepReport(int(state.step), epoch, b + 1, len(order), loss_sum / count, correct / count,
                               count / (time.perf_counter() - start), position))
            if b + 1 == len(order):
                on_epoch_end(epoch, position.epoch_metrics())
                position = Position(epoch + 1, 0)
            if should_pause(state, position):
                return state, position, position.epoch >= epochs
    return state, position, True
