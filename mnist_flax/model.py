"""The network: the PyTorch original, layer for layer, as a Flax linen module. Its only definition.

    conv1 1->8 3x3, bn1, relu      28 -> 26
    conv2 8->16 3x3, bn2, relu     26 -> 24, then max-pool 2x2/2 -> 12
    conv3 16->8 1x1, bn3, relu     12
    conv4 8->16 3x3, bn4, relu     12 -> 10
    conv5 16->8 3x3, bn5, relu     10 -> 8
    fc    512->10 (flattened in NHWC order)

Training, evaluation, prediction and export all apply `CNN`. Its blocks have two forms of
the same maths: the plain one (nn.Conv, BatchNorm, nn.relu, nn.max_pool) and the fused one
of ops.py, which is faster on CPU. `CNN.fused` picks the form (`ops.use_fused` chooses it
for the backend). Variable names match the PyTorch attributes
(`conv1`..`conv5`, `bn1`..`bn5`, `fc`), so exporting to the original's state dict is a
renaming, not a guess.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnist_flax import ops
from mnist_flax.config import IMAGE_SHAPE, MNIST_MEAN, MNIST_STD, NUM_CLASSES

PARAM_BUDGET = 25_000


def normalize(images: jax.Array) -> jax.Array:
    """uint8 pixels (0..255) or floats in [0, 1] -> the original's normalised floats."""
    x = jnp.asarray(images)
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.float32) / 255.0
    else:  # float64 stays float64 where JAX runs in 64 bits (tests/test_ops.py's exactness checks)
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (x - MNIST_MEAN) / MNIST_STD


def check_images(images: Any) -> None:
    """Raises ValueError unless `images` is a (N, 28, 28, 1) batch of numbers."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"expected images of shape (N, 28, 28, 1) (NHWC, one channel), got {shape}; "
            "add a batch axis with images[None] or a channel axis with images[..., None]"
        )
    dtype = np.dtype(images.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"expected uint8 or float images, got dtype {dtype}")


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch's semantics, so trained statistics match the original's.

    Flax's nn.BatchNorm updates the running variance with the biased batch variance;
    PyTorch uses the unbiased one (n / (n - 1)). Normalising uses the biased variance in
    both. `mask` marks the real examples of a padded batch.
    """

    momentum: float = 0.9  # PyTorch's momentum 0.1: running = 0.9 * running + 0.1 * batch
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if not train:
            batch_mean, batch_var = mean.value, var.value
        else:
            _, n, batch_mean, batch_var = ops.batch_statistics(x, mask)
            if not self.is_initializing():
                running = ops.running_average({"mean": mean.value, "var": var.value},
                                              batch_mean, batch_var, n, self.momentum)
                mean.value, var.value = running["mean"], running["var"]
        return (x - batch_mean) * jax.lax.rsqrt(batch_var + self.epsilon) * scale + bias


# PyTorch's default initialisation for Conv2d and Linear: weights and biases uniform in
# +-1/sqrt(fan_in). Flax's defaults (LeCun normal, zero bias) train differently, and the point
# here is to mirror the original.
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """Uniform in +-1/sqrt(fan_in), drawn in [-1, 1) and scaled, as variance_scaling draws kernels.

    Not `uniform(key, shape, dtype, -bound, bound)`: that computes `u * 2 * bound - bound`,
    whose last bit depends on whether XLA fuses the multiply and add, which its optimisation
    level decides. `u * 2 - 1` is exact either way, so the init program gives the same numbers
    however it is compiled (step.py compiles it unoptimised).
    """
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -1.0, 1.0) * bound


class ConvBNReLU(nn.Module):
    """conv{index} -> bn{index} -> ReLU, then a 2x2/2 max-pool if `pool`.

    Its variables are nn.Conv's and BatchNorm's, under the names `conv{index}` and
    `bn{index}` in the parent's scope (the model shares its scope with the block). The
    fused form, used when `fused`, applies ops.py to those same variables: in training all
    of it, in evaluation only its convolution, which computes conv1's single input channel
    as nine shifted products (the others as nn.Conv does, bit for bit). Initialisation
    always takes the plain form.
    """

    features: int
    kernel_size: int
    index: int
    pool: bool = False
    fused: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        fan_in = self.kernel_size ** 2 * x.shape[-1]
        conv = nn.Conv(self.features, (self.kernel_size,) * 2, padding="VALID", name=f"conv{self.index}",
                       kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in))
        bn = BatchNorm(name=f"bn{self.index}")
        if self.fused and not self.is_initializing():
            if train:
                return self._fused(x, bn, mask)
            # XLA:CPU's convolution of one input channel is far slower than the shifted products
            # (docs/performance.md), and conv1 is a large part of evaluating the test set.
            params = self.get_variable("params", f"conv{self.index}")
            z = ops.conv(x, params["kernel"]) + params["bias"]
        else:
            z = conv(x)
        y = nn.relu(bn(z, train=train, mask=mask))
        return nn.max_pool(y, (2, 2), strides=(2, 2)) if self.pool else y

    def _fused(self, x: jax.Array, bn: BatchNorm, mask: jax.Array | None) -> jax.Array:
        conv = self.get_variable("params", f"conv{self.index}")
        norm = self.get_variable("params", bn.name)
        # Training-mode BatchNorm subtracts the batch mean, so the conv bias cancels exactly: it is
        # left out of the activations (its gradient is then exactly zero, where autodiff of the
        # plain form gives rounding noise) and added back where it survives, in the running mean.
        if self.pool:
            y, mean, var, n = ops.conv_bn_relu_pool_train(x, conv["kernel"], norm["scale"], norm["bias"],
                                                          mask, bn.epsilon)
        else:
            y, mean, var, n = ops.bn_relu_train(ops.conv(x, conv["kernel"]), norm["scale"], norm["bias"],
                                                mask, bn.epsilon)
        running = ops.running_average(self.get_variable("batch_stats", bn.name), mean + conv["bias"], var, n,
                                      bn.momentum)
        self.put_variable("batch_stats", bn.name, running)
        return y


class CNN(nn.Module):
    """The original network. Input NHWC (N, 28, 28, 1), uint8 or [0, 1] floats; output logits (N, 10)."""

    fused: bool = False  # the blocks' fused form (ops.py; in evaluation, its convolution); else the plain form

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        check_images(images)
        x = normalize(images)
        for block in (ConvBNReLU(8, 3, index=1, fused=self.fused),
                      ConvBNReLU(16, 3, index=2, pool=True, fused=self.fused),
                      ConvBNReLU(8, 1, index=3, fused=self.fused),
                      ConvBNReLU(16, 3, index=4, fused=self.fused),
                      ConvBNReLU(8, 3, index=5, fused=self.fused)):
            nn.share_scope(self, block)  # conv1, bn1, ... at the top level, as in the original
            x = block(x, train=train, mask=mask)
        self.sow("intermediates", "fc_input", x)  # export reads fc's input layout from here
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(NUM_CLASSES, name="fc", kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(x.shape[-1]))(x)


def network(form: str = "auto") -> CNN:
    """The network in the form a config's `ops` names: "fused", "plain", or "auto", the one
    ops.use_fused picks for this backend. The one place a run's form becomes a model: training,
    evaluation, prediction, serving and export all take theirs from here."""
    return CNN(fused=ops.use_fused(form))


def example_images(batch: int = 1) -> jax.Array:
    return jnp.zeros((batch,) + IMAGE_SHAPE, jnp.uint8)


def init_variables(key: jax.Array, model: nn.Module | None = None) -> dict:
    """Fresh {'params', 'batch_stats'} (PRNG key in, no hidden state)."""
    return (model or CNN()).init(key, example_images(), train=False)


def layer_order(model: nn.Module | None = None) -> list[str]:
    """The model's top-level variable names in the order its layers run.

    Flax builds the variables in the order the module creates them; JAX's tree functions
    sort dict keys, so the order is read here, during an abstract init, before any of them runs.
    """
    return list(_layer_order(model))


@functools.cache  # the abstract init traces the whole module; modules are hashable dataclasses
def _layer_order(model: nn.Module | None) -> tuple[str, ...]:
    order = []

    def init(key):
        variables = init_variables(key, model)
        order.extend(variables["params"])
        return variables

    jax.eval_shape(lambda: init(jax.random.key(0)))  # the key too is only traced: nothing compiles
    return tuple(order)


def parameter_table(params: Any, model: nn.Module | None = None) -> list[tuple[str, tuple[int, ...], int]]:
    """(path, shape, count) for every trainable array, in layer order."""
    rank = {name: i for i, name in enumerate(layer_order(model))}
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        rows.append((name, tuple(leaf.shape), int(np.prod(leaf.shape))))
    return sorted(rows, key=lambda r: (rank.get(r[0].split("/")[0], len(rank)), r[0]))


def count_params(params: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def format_parameter_table(params: Any, model: nn.Module | None = None) -> str:
    """The layer-by-layer table the training run prints, with the total."""
    rows = parameter_table(params, model)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'layer/param':<{width}}  {'shape':<14} {'count':>6}"]
    lines += [f"{name:<{width}}  {str(shape):<14} {count:>6,}" for name, shape, count in rows]
    lines.append(f"{'total':<{width}}  {'':<14} {count_params(params):>6,}")
    return "\n".join(lines)
