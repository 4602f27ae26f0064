"""The training loop: iterate an epoch's batches, call the step, keep the position; a NaN guard.

Where a run stands is plain data (`Position`), saved with the train state so that an
interrupted run, resumed, takes exactly the steps an uninterrupted one would: the data
order is a pure function of (seed, epoch), and the position says how many of the epoch's
batches are done. The loop does no I/O; its callers save and report through the hooks.
"""

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from mnist_flax.errors import MnistFlaxError


@dataclasses.dataclass(frozen=True)
class Position:
    """How far a run has got, and the running metrics of the current epoch."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already done
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def after(self, loss_sum: float, correct: float, count: float) -> "Position":
        """The position one batch later."""
        return Position(self.epoch, self.batch + 1, self.loss_sum + loss_sum, self.correct + correct,
                        self.count + count)

    def epoch_metrics(self) -> dict:
        count = max(self.count, 1.0)
        return {"loss": self.loss_sum / count, "accuracy": self.correct / count, "count": int(self.count)}


class StepReport(NamedTuple):
    """What `on_step` hears after every step."""

    step: int  # global step count after this step
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


def run(
    state: Any,
    steps_fn: Callable,
    epoch_batches: Callable[[int, int], Iterator],
    epochs: int,
    position: Position = Position(),
    on_step: Callable[[StepReport], None] = lambda report: None,
    on_epoch_end: Callable[[int, dict], None] = lambda epoch, metrics: None,
    should_pause: Callable[[Any, Position], bool] = lambda state, position: False,
) -> tuple[Any, Position, bool]:
    """Runs from `position` to the end of `epochs`; returns (state, position, finished).

    `epoch_batches(epoch, start)` yields what `steps_fn(state, batches)` takes; steps_fn
    returns the new state and per-step metrics stacked along a leading axis (sums of
    `loss_sum`, `correct` and `count`; a step with count 0 did not run), and leaves the
    state as it was before any step whose loss is not finite (step.multi_step does both).
    After each call `should_pause(state, position)` may save and return True to stop early.
    """
    step = int(state.step)  # counted here from now on: reading it back would wait for every call
    for epoch in range(position.epoch, epochs):
        for batches in epoch_batches(epoch, position.batch):
            start = time.perf_counter()
            state, metrics = steps_fn(state, batches)
            rows = np.stack(jax.device_get((metrics["loss_sum"], metrics["correct"], metrics["count"])), -1)
            rows = rows.astype(np.float64)[rows[:, 2] > 0].tolist()  # the steps that ran
            seconds_per_step = (time.perf_counter() - start) / max(len(rows), 1)
            for loss_sum, correct, count in rows:
                if not math.isfinite(loss_sum):
                    raise NonFiniteLoss(step + 1, state, position)
                step, position = step + 1, position.after(loss_sum, correct, count)
                on_step(StepReport(step, loss_sum / count, correct / count, count / seconds_per_step, position))
            if should_pause(state, position):
                return state, position, False
        on_epoch_end(epoch, position.epoch_metrics())
        position = Position(epoch + 1)
    return state, position, True
