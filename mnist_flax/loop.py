"""The training loop: epochs of steps, with exact resume, periodic saves and a NaN guard.

Where a run stands is plain data (`Position`), saved with the train state so
that an interrupted run, resumed, takes exactly the steps an uninterrupted one
would: the data order is a pure function of (seed, epoch), and the position
says how many of the epoch's batches are done.
"""

import dataclasses
import math
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


def _call_slots(step: int, batch: int, batches: int, steps_per_call: int) -> tuple[list[int], int, int]:
    """For a call starting at global `step`, this epoch's `batch` of `batches`: the batch each
    slot of the compiled program takes, the first active slot, and the number of active slots.

    Calls cover global steps [k * steps_per_call, (k + 1) * steps_per_call), cut at epoch ends:
    each step always runs in the same slot, so a resumed run repeats an uninterrupted one bit
    for bit. Inactive slots repeat a neighbouring batch; their results are discarded.
    """
    first = step % steps_per_call
    active = min(steps_per_call - first, batches - batch)
    rows = [batch + min(max(slot - first, 0), active - 1) for slot in range(steps_per_call)]
    return rows, first, active


def run_epochs(
    state: training.TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    data_key: jax.Array,
    epochs: int,
    batch_size: int,
    position: Position = Position(),
    steps_fn: Callable = training.jit_train_steps,
    steps_per_call: int = training.STEPS_PER_CALL,
    on_step: Callable[[StepReport], None] = lambda report: None,
    on_epoch_end: Callable[[int, dict], None] = lambda epoch, metrics: None,
    should_pause: Callable[[training.TrainState, Position], bool] = lambda state, position: False,
    shard_batch: Callable[[training.Batch], training.Batch] = lambda batch: batch,
) -> tuple[training.TrainState, Position, bool]:
    """Runs from `position` to the end of `epochs`; returns (state, position, finished).

    `steps_fn(state, batches, active)` runs `steps_per_call` steps in one call (see
    `training.train_steps`). `on_step` hears about every step; after each call
    `should_pause(state, position)` may save and return True to stop early (finished
    False): the caller saves, the loop stays pure of I/O. `shard_batch` places each
    host batch, stacked by step, on the devices (see devices.py).
    """
    step = int(state.step)  # counted here from now on: reading it back would wait for every call
    for epoch in range(position.epoch, epochs):
        order, mask = training.epoch_order(data_key, epoch, len(images), batch_size)
        b = position.batch
        while b < len(order):
            start = time.perf_counter()
            rows, first, count = _call_slots(step, b, len(order), steps_per_call)
            slots = np.arange(steps_per_call)
            active = (slots >= first) & (slots < first + count)
            batches = shard_batch(training.Batch(images[order[rows]], labels[order[rows]], mask[rows]))
            new_state, metrics = steps_fn(state, batches, active)
            losses, corrects, counts = (np.asarray(v, np.float64)[first:first + count].tolist() for v in
                                        jax.device_get((metrics["loss_sum"], metrics["correct"], metrics["count"])))
            bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
            if bad:
                good = active & (slots < first + bad[0])
                # The same program with the steps from the bad one on switched off: exactly the
                # state an uninterrupted run had before that step.
                last_good = steps_fn(state, batches, good)[0] if good.any() else state
                for i in range(bad[0]):
                    position = Position(epoch, b + i + 1, position.loss_sum + losses[i],
                                        position.correct + corrects[i], position.count + counts[i])
                raise NonFiniteLoss(step + bad[0] + 1, last_good, position)
            state = new_state
            seconds_per_step = (time.perf_counter() - start) / count
            for i in range(count):
                b, step = b + 1, step + 1
                position = Position(epoch, b, position.loss_sum + losses[i], position.correct + corrects[i],
                                    position.count + counts[i])
                on_step(StepReport(step, epoch, b, len(order), losses[i] / counts[i], corrects[i] / counts[i],
                                   counts[i] / seconds_per_step, position))
            if b == len(order):
                on_epoch_end(epoch, position.epoch_metrics())
                position = Position(epoch + 1, 0)
            if should_pause(state, position):
                return state, position, position.epoch >= epochs
    return state, position, True
