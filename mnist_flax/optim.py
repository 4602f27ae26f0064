"""The optimiser and its learning-rate schedule, both read from the config."""

from typing import NamedTuple

import optax

from mnist_flax.config import Config


def learning_rate_schedule(config: Config) -> optax.Schedule:
    """constant: `learning_rate` throughout. onecycle: a linear rise from peak / initial_div to
    the peak (`learning_rate`) over the first `warmup_fraction` of the run, then a linear fall to
    peak / final_div by its last step."""
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    total, peak = config.total_steps(), config.learning_rate
    warmup = int(config.warmup_fraction * total)
    return optax.join_schedules(
        [optax.linear_schedule(peak / config.initial_div, peak, warmup),
         optax.linear_schedule(peak, peak / config.final_div, total - warmup)],
        boundaries=[warmup])


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # the one `tx` follows: what a run logs is what it trained with


def make_optimizer(config: Config) -> Optimizer:
    """Adam, as the original; or NAdam, whose state has the same structure; with its schedule."""
    adam = {"adam": optax.adam, "nadam": optax.nadam}[config.optimizer]
    schedule = learning_rate_schedule(config)
    return Optimizer(adam(schedule), schedule)
