"""The train state, the training step and evaluation: pure functions from (state, data) to results.

Nothing here reads files or flags. `train_step` is one optax update of the model that
`create_train_state` was given (by default `model.network(config.ops)`, the one factory);
`multi_step` runs several of them per compiled call. loop.py runs the calls.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from mnist_flax import ops, optim
from mnist_flax.runtime import RUN_ONCE_COMPILER_OPTIONS
from mnist_flax.config import NUM_CLASSES, Config
from mnist_flax.batches import Batch
from mnist_flax.model import init_variables, network

EVAL_BATCH_SIZE = 1000


class TrainState(train_state.TrainState):
    """Params, optimiser state and step, plus BatchNorm's running statistics and the dropout key;
    and, beside the optimiser `tx`, the learning-rate schedule it follows."""

    batch_stats: Any
    dropout_key: jax.Array  # raw uint32 key data, so that it serialises like any other array
    learning_rate: optax.Schedule = struct.field(pytree_node=False)


def rng_streams(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, data order, dropout) keys of a run: independent streams of one seed."""
    root = jax.random.key(seed)
    init_key, data_key = jax.random.split(root)
    return init_key, data_key, jax.random.fold_in(root, 2)


@functools.partial(jax.jit, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
def data_order_key(seed: int) -> jax.Array:
    """rng_streams' data order key, as one program: op by op, its seed, split and fold-in are
    five more programs for a first run to compile."""
    return rng_streams(seed)[1]


def create_train_state(config: Config, model: nn.Module | None = None) -> TrainState:
    """A fresh run: the model initialised from the config's seed, and its optimiser.

    The state's `apply_fn` is the model's own `apply`: the module is what trains. One
    compiled program (cached like the others), not op-by-op: quicker when warm, and
    the same values.
    """
    return _create_train_state(config, model or network(config.ops))


def train_state_shapes(config: Config) -> TrainState:
    """What `create_train_state` returns, as shapes and dtypes, computing nothing.

    Through the jitted function's own `eval_shape`: a top-level jit with compiler options
    may not be traced inside another transformation.
    """
    return _create_train_state.eval_shape(config, network(config.ops))


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=RUN_ONCE_COMPILER_OPTIONS)
def _create_train_state(config: Config, model: nn.Module) -> TrainState:
    init_key, _, dropout_key = rng_streams(config.seed)
    variables = init_variables(init_key, model)
    optimizer = optim.make_optimizer(config)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        dropout_key=jax.random.key_data(dropout_key),
        tx=optimizer.tx,
        learning_rate=optimizer.schedule,
    ).replace(step=jnp.zeros((), jnp.int32))  # an array from the start, so its type never changes


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def loss_and_updates(params, state: TrainState, batch: Batch, label_smoothing: float = 0.0):
    """Mean cross-entropy over the real examples, and (logits, the new BatchNorm statistics)."""
    dropout = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        batch.images, train=True, mask=batch.mask, mutable=["batch_stats"], rngs={"dropout": dropout},
    )
    losses = cross_entropy(logits, batch.labels, label_smoothing)
    return masked_mean(losses, batch.mask), (logits, updates["batch_stats"])


def train_step(state: TrainState, batch: Batch, label_smoothing: float = 0.0) -> tuple[TrainState, dict]:
    """One optimiser step. Metrics are sums over real examples, so they add across steps."""
    grad_fn = jax.value_and_grad(loss_and_updates, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params, state, batch, label_smoothing)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    real = batch.mask.astype(jnp.float32)
    metrics = {
        "loss_sum": loss * jnp.sum(real),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch.labels) * real),
        "count": jnp.sum(real),
    }
    return state, metrics


def multi_step(step_fn: Callable, unroll: bool = False) -> Callable:
    """`step_fn` over batches stacked along a leading axis, as one `lax.scan` in one program
    (`unroll`: with the steps written out one after the other, see `ops.steps_need_unrolling`).

    A step runs only if its batch has a real example (batches.epoch_batches pads an epoch's
    last call with empty ones) and no step before it in the call, itself included, had a
    non-finite loss; otherwise the state passes through untouched. So the state that comes
    back is always the last good one, and each step's metrics come back stacked.
    """
    # A scan compiles the step once, whatever the number of steps per call: unrolled copies
    # made a first run compile each of them (docs/performance.md).
    def body(carry, batch: Batch):
        state, finite = carry
        new_state, metrics = step_fn(state, batch)
        finite = finite & jnp.isfinite(metrics["loss_sum"])
        keep = finite & jnp.any(batch.mask)
        # A select per value, which XLA fuses into the optimiser's update.
        state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, state)
        return (state, finite), metrics

    def steps(state: TrainState, batches: Batch) -> tuple[TrainState, dict]:
        (state, _), metrics = jax.lax.scan(body, (state, jnp.bool_(True)), batches, unroll=unroll)
        return state, metrics

    return steps


def make_train_steps(config: Config) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The compiled call the loop runs: `config.steps_per_call` train steps (batches stacked).

    Not donated: the loop keeps the state from before each call.
    """
    unroll = ops.steps_need_unrolling(ops.use_fused(config.ops))
    return jax.jit(multi_step(functools.partial(train_step, label_smoothing=config.label_smoothing), unroll))


def model_variables(state: TrainState) -> dict:
    """What a checkpoint holds and inference needs: {'params', 'batch_stats'}."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def predict_logits(variables: dict, images: jax.Array, model: nn.Module | None = None) -> jax.Array:
    """Eval-mode logits: running BatchNorm statistics, no gradients, no updates.

    `model`: the run's form (model.network(config.ops)); without one, "auto"'s."""
    return (model or network()).apply(variables, images, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    return jax.nn.softmax(predict_logits(variables, images, model))


def predict_probabilities(variables: dict, images: np.ndarray, batch_size: int = EVAL_BATCH_SIZE,
                          model: nn.Module | None = None) -> np.ndarray:
    """Class probabilities (N, 10) in eval mode, computed in batches."""
    model = model or network()
    chunks = [_probabilities(model, variables, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(jax.device_get(chunks))


def evaluate(variables: dict, images: np.ndarray, labels: np.ndarray, batch_size: int = EVAL_BATCH_SIZE,
             model: nn.Module | None = None) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true, columns: predicted)."""
    return metrics_from_probabilities(predict_probabilities(variables, images, batch_size, model), labels)


def metrics_from_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """evaluate()'s metrics from the probabilities already computed for `labels`' images."""
    predicted = probabilities.argmax(-1)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    correct = int(np.trace(confusion))
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {"accuracy": correct / len(labels), "correct": correct, "count": len(labels),
            "per_class_accuracy": [round(float(a), 6) for a in per_class],
            "confusion_matrix": confusion.tolist()}
