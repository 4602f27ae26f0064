"""The training step and evaluation: pure functions from (state, data) to new state.

Nothing here reads files or flags; `loop.py` runs the steps, `train.py` owns the command line.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from mnist_flax import fast
from mnist_flax.config import NUM_CLASSES, TrainConfig
from mnist_flax.model import SeedNet, init_variables

EVAL_BATCH_SIZE = 1000


class TrainState(train_state.TrainState):
    """Params, optimiser state and step, plus BatchNorm's running statistics."""

    batch_stats: Any
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)


class Batch(NamedTuple):
    images: jax.Array  # uint8 (B, 28, 28, 1)
    labels: jax.Array  # int32 (B,)
    mask: jax.Array  # bool (B,): False marks padding in the epoch's last batch


# The one-cycle recipe: Adam with Nesterov momentum (NAdam); the learning rate rises
# linearly from PEAK_FACTOR/25 to PEAK_FACTOR x the learning rate over the first
# WARMUP_FRACTION of the run, then falls linearly to 1/FINAL_DIV of the peak by its last
# step. It also smooths the labels (10% of the target spread over all classes), which
# keeps the last layer from chasing overconfident logits in the high-rate phase. Chosen
# on a validation split (the last 5,000 training images held out, 8 seeds): NAdam was
# the one change that clearly helped; README has the per-seed test accuracies.
ONECYCLE_PEAK_FACTOR = 4.0
ONECYCLE_WARMUP_FRACTION = 0.25
ONECYCLE_INITIAL_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e3
ONECYCLE_LABEL_SMOOTHING = 0.1


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    if config.recipe == "seed":
        return optax.constant_schedule(config.learning_rate)
    total = config.epochs * config.steps_per_epoch()
    peak = ONECYCLE_PEAK_FACTOR * config.learning_rate
    warmup = int(ONECYCLE_WARMUP_FRACTION * total)
    return optax.join_schedules(
        [optax.linear_schedule(peak / ONECYCLE_INITIAL_DIV, peak, warmup),
         optax.linear_schedule(peak, peak / ONECYCLE_FINAL_DIV, total - warmup)],
        boundaries=[warmup])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The original's Adam; NAdam for the one-cycle recipe (same state, so resume works alike)."""
    adam = optax.nadam if config.recipe == "onecycle" else optax.adam
    return adam(learning_rate_schedule(config))


def create_train_state(key: jax.Array, config: TrainConfig, apply_fn: Callable = fast.apply) -> TrainState:
    """Fresh model and Adam state for `config`'s optimiser and schedule.

    `apply_fn` computes the forward pass in training: `fast.apply` by default, the same
    math as the linen module `SeedNet().apply` expressed for speed (tests/test_fast.py).
    """
    variables = init_variables(key)
    return TrainState.create(
        apply_fn=apply_fn,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=make_optimizer(config),
        label_smoothing=ONECYCLE_LABEL_SMOOTHING if config.recipe == "onecycle" else 0.0,
    ).replace(step=jnp.zeros((), jnp.int32))  # an array from the start, so its type never changes


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def loss_and_updates(params, state: TrainState, batch: Batch):
    """Mean cross-entropy over the real examples, and the new BatchNorm statistics."""
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        batch.images, train=True, mask=batch.mask, mutable=["batch_stats"],
    )
    if state.label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(batch.labels, logits.shape[-1]), state.label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
    return masked_mean(losses, batch.mask), (logits, updates["batch_stats"])


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """One Adam step. Metrics are sums over real examples, so they add across steps."""
    grad_fn = jax.value_and_grad(loss_and_updates, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params, state, batch)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    real = batch.mask.astype(jnp.float32)
    metrics = {
        "loss_sum": loss * jnp.sum(real),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch.labels) * real),
        "count": jnp.sum(real),
    }
    return state, metrics


def model_variables(state: TrainState) -> dict:
    """What a checkpoint holds and inference needs: {'params', 'batch_stats'}."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def predict_logits(variables: dict, images: jax.Array) -> jax.Array:
    """Eval-mode logits: running BatchNorm statistics, no gradients, no updates."""
    return SeedNet().apply(variables, images, train=False)


def epoch_order(key: jax.Array, epoch: int, num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled example indices for one epoch, as (steps, batch_size) plus a padding mask.

    Every example is seen once. The last partial batch is padded (with index 0,
    masked out) rather than dropped, so every step has the same shape and the
    step compiles once.
    """
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), num_examples))
    steps = -(-num_examples // batch_size)
    padded = np.zeros(steps * batch_size, np.int32)
    padded[:num_examples] = order
    mask = np.zeros(steps * batch_size, bool)
    mask[:num_examples] = True
    return padded.reshape(steps, batch_size), mask.reshape(steps, batch_size)


# Steps per compiled call of the training loop. XLA:CPU spends about 1 ms per call outside
# the step's own work (waking its threads, the call's buffers, Python): through the loop, four
# steps per call train 11% faster than one, for about 3.5 s more compile time on a first run
# (docs/performance.md, "Fourth round").
STEPS_PER_CALL = 4


def train_steps(state: TrainState, batches: Batch, active: jax.Array) -> tuple[TrainState, dict]:
    """`len(active)` train_steps in one program, over batches stacked along a leading axis.

    A step whose `active` entry is False leaves the state exactly as it was (the loop
    uses them where a call starts or ends inside an epoch's first or last few steps);
    its metrics are computed but meaningless. Metrics come back stacked, one per step.
    """
    per_step = []
    for i in range(active.shape[0]):
        new_state, metrics = train_step(state, jax.tree.map(lambda x: x[i], batches))
        # A select per value, which XLA fuses into the optimiser's updates: 3% faster per step
        # than a lax.cond over the state, for 1.4 s more compile time (docs/performance.md).
        state = jax.tree.map(lambda new, old: jnp.where(active[i], new, old), new_state, state)
        per_step.append(metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *per_step)


# Not donated: the loop keeps the state from before each call, to fall back on if the loss turns NaN.
jit_train_step = jax.jit(train_step)
jit_train_steps = jax.jit(train_steps)


@jax.jit
def _probabilities(variables: dict, images: jax.Array) -> jax.Array:
    return jax.nn.softmax(predict_logits(variables, images))


def predict_probabilities(variables: dict, images: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Class probabilities (N, 10) in eval mode, computed in batches."""
    chunks = [_probabilities(variables, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(jax.device_get(chunks))


def evaluate(variables: dict, images: np.ndarray, labels: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true, columns: predicted)."""
    predicted = predict_probabilities(variables, images, batch_size).argmax(-1)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    correct = int(np.trace(confusion))
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {"accuracy": correct / len(images), "correct": correct, "count": len(images),
            "per_class_accuracy": [round(float(a), 6) for a in per_class],
            "confusion_matrix": confusion.tolist()}
