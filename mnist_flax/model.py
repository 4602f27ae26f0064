"""The original PyTorch MNIST network, layer for layer, as a Flax linen module.

    conv1 1->8 3x3, bn1, relu      28 -> 26
    conv2 8->16 3x3, bn2, relu     26 -> 24, then max-pool 2x2/2 -> 12
    conv3 16->8 1x1, bn3, relu     12
    conv4 8->16 3x3, bn4, relu     12 -> 10
    conv5 16->8 3x3, bn5, relu     10 -> 8
    fc    512->10 (flattened in NHWC order)

Layer names match the PyTorch attributes (`conv1`..`conv5`, `bn1`..`bn5`, `fc`)
so that exporting to the original's state dict is a renaming, not a guess.
"""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from mnist_flax.config import IMAGE_SHAPE, MNIST_MEAN, MNIST_STD, NUM_CLASSES

# (output channels, kernel size) of conv1..conv5, as in the original.
CONV_LAYERS = ((8, 3), (16, 3), (8, 1), (16, 3), (8, 3))
POOL_AFTER = 2  # max-pool 2x2/2 follows conv2
# PyTorch's BatchNorm2d defaults: running = 0.9 * running + 0.1 * batch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
PARAM_BUDGET = 25_000


def normalize(images: jax.Array) -> jax.Array:
    """uint8 pixels (0..255) or floats in [0, 1] -> the original's normalised floats."""
    x = jnp.asarray(images)
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.float32) / 255.0
    else:  # float64 stays float64 where JAX runs in 64 bits (the fast path's exactness tests)
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

    Flax's nn.BatchNorm updates the running variance with the biased batch
    variance; PyTorch uses the unbiased one (n / (n - 1)). Normalising uses the
    biased variance in both. `mask` marks the real examples of a padded batch.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if not train:
            mean, var = ra_mean.value, ra_var.value
        else:
            weights = jnp.ones(x.shape[:-1], x.dtype)
            if mask is not None:
                weights = weights * mask.reshape((-1,) + (1,) * (x.ndim - 2)).astype(x.dtype)
            weights = weights[..., None]
            n = jnp.sum(weights)
            mean = jnp.sum(x * weights, axis=(0, 1, 2)) / n
            # Two-pass variance: stable where E[x^2] - E[x]^2 is not.
            var = jnp.sum(jnp.square(x - mean) * weights, axis=(0, 1, 2)) / n
            if not self.is_initializing():
                unbiased = var * n / jnp.maximum(n - 1, 1)
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


# PyTorch's default initialisation for Conv2d and Linear: weights and biases
# uniform in +-1/sqrt(fan_in). Flax's defaults (LeCun normal, zero bias) train
# differently, and the point here is to mirror the original.
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class SeedNet(nn.Module):
    """The original network. Input NHWC (N, 28, 28, 1), uint8 or [0, 1] floats; output logits (N, 10)."""

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        check_images(images)
        x = normalize(images)
        for i, (features, size) in enumerate(CONV_LAYERS, start=1):
            fan_in = size * size * x.shape[-1]
            x = nn.Conv(features, (size, size), padding="VALID", name=f"conv{i}",
                        kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in))(x)
            x = BatchNorm(name=f"bn{i}")(x, train=train, mask=mask)
            x = nn.relu(x)
            if i == POOL_AFTER:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(NUM_CLASSES, name="fc", kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(x.shape[-1]))(x)


def init_variables(key: jax.Array) -> dict:
    """Fresh {'params', 'batch_stats'} for SeedNet (PRNG key in, no hidden state)."""
    return SeedNet().init(key, jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32), train=False)


def parameter_table(params: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """(path, shape, count) for every trainable array, in layer order."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    rows = []
    for path, leaf in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        rows.append((name, tuple(leaf.shape), int(np.prod(leaf.shape))))
    order = {f"{kind}{i}": 2 * i + (kind == "bn") for kind in ("conv", "bn") for i in range(1, 6)}
    order["fc"] = 99
    return sorted(rows, key=lambda r: (order.get(r[0].split("/")[0], 100), r[0]))


def count_params(params: Any) -> int:
    return sum(count for _, _, count in parameter_table(params))


def format_parameter_table(params: Any) -> str:
    """The layer-by-layer table the training run prints, with the total."""
    rows = parameter_table(params)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'layer/param':<{width}}  {'shape':<14} {'count':>6}"]
    lines += [f"{name:<{width}}  {str(shape):<14} {count:>6,}" for name, shape, count in rows]
    lines.append(f"{'total':<{width}}  {'':<14} {count_params(params):>6,}")
    return "\n".join(lines)
