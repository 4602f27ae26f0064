"""SeedNet's forward pass written for XLA:CPU speed, with SeedNet.apply's calling convention.

Same parameters, same math as `model.SeedNet` (tests/test_fast.py pins it),
expressed the way XLA on CPU runs fastest (measurements: docs/performance.md):

* max-pool as reshape + max: `nn.max_pool` lowers to reduce_window, whose
  gradient (select_and_scatter) is several times slower on CPU;
* BatchNorm (training mode) and ReLU as one `jax.custom_vjp` with the
  textbook backward pass: two reductions and one elementwise pass, where
  autodiff of the forward emits many more passes over the activations, and
  those memory-bound passes, not the convolutions' FLOPs, dominate the step;
* convolutions as `lax.conv_general_dilated` in NHWC/HWIO, as nn.Conv does.

It is a drop-in `apply_fn` for the train state; evaluation and export keep
using the readable linen module.
"""

import jax
import jax.numpy as jnp
from jax import lax

from mnist_flax.model import BN_EPSILON, BN_MOMENTUM, CONV_LAYERS, POOL_AFTER, check_images, normalize


def _conv(x: jax.Array, conv: dict) -> jax.Array:
    y = lax.conv_general_dilated(x, conv["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + conv["bias"]


def _weights(z: jax.Array, mask: jax.Array | None) -> tuple[jax.Array | None, jax.Array]:
    """Per-example weights (None: all real) and the number of real positions in z."""
    positions = z.shape[1] * z.shape[2]
    if mask is None:
        return None, jnp.float32(positions * z.shape[0])
    w = mask.astype(z.dtype)[:, None, None, None]
    return w, positions * jnp.sum(w)


def _bn_relu_forward(z, scale, bias, mask):
    w, n = _weights(z, mask)
    mean = jnp.sum(z if w is None else z * w, (0, 1, 2)) / n
    centred = z - mean
    var = jnp.sum(jnp.square(centred) if w is None else jnp.square(centred) * w, (0, 1, 2)) / n  # two-pass
    inv_std = lax.rsqrt(var + BN_EPSILON)
    y = jnp.maximum(centred * (scale * inv_std) + bias, 0.0)
    return (y, mean, var), (z, mean, inv_std, scale, bias, mask, w, n)


def _bn_relu_backward(saved, cotangents):
    # Only y's cotangent matters: mean and var feed the running statistics, which are not
    # differentiated (as in flax and PyTorch).
    z, mean, inv_std, scale, bias, mask, w, n = saved
    normed = (z - mean) * inv_std
    g = jnp.where(normed * scale + bias > 0, cotangents[0], 0.0)  # through the ReLU
    sum_g, sum_g_normed = jnp.sum(g, (0, 1, 2)), jnp.sum(g * normed, (0, 1, 2))
    w = 1.0 if w is None else w
    dz = (scale * inv_std) * (g - w * (sum_g / n) - (w * normed) * (sum_g_normed / n))
    return dz, sum_g_normed, sum_g, None  # the mask gets no gradient


@jax.custom_vjp
def bn_relu_train(z, scale, bias, mask):
    """relu(batch_norm(z)) over the real examples, plus the batch mean and biased variance."""
    return _bn_relu_forward(z, scale, bias, mask)[0]


bn_relu_train.defvjp(_bn_relu_forward, _bn_relu_backward)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def apply(variables: dict, images: jax.Array, *, train: bool, mask: jax.Array | None = None,
          mutable=False):
    """As `SeedNet().apply(variables, images, train=..., mask=..., mutable=...)`."""
    check_images(images)
    params, stats = variables["params"], variables["batch_stats"]
    x = normalize(images)
    new_stats = {}
    for i in range(1, len(CONV_LAYERS) + 1):
        z = _conv(x, params[f"conv{i}"])
        bn, running = params[f"bn{i}"], stats[f"bn{i}"]
        if train:
            x, mean, var = bn_relu_train(z, bn["scale"], bn["bias"], mask)
            n = _weights(z, mask)[1]
            unbiased = var * n / jnp.maximum(n - 1, 1)  # PyTorch's running variance
            new_stats[f"bn{i}"] = jax.tree.map(
                lambda old, new: BN_MOMENTUM * old + (1 - BN_MOMENTUM) * lax.stop_gradient(new),
                running, {"mean": mean, "var": unbiased})
        else:
            inv_std = lax.rsqrt(running["var"] + BN_EPSILON)
            x = jnp.maximum((z - running["mean"]) * (bn["scale"] * inv_std) + bn["bias"], 0.0)
        if i == POOL_AFTER:
            x = _max_pool_2x2(x)
    logits = x.reshape(x.shape[0], -1) @ params["fc"]["kernel"] + params["fc"]["bias"]
    return (logits, {"batch_stats": new_stats if train else stats}) if mutable else logits
