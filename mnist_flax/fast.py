"""SeedNet's forward pass written for XLA:CPU speed, with SeedNet.apply's calling convention.

Same parameters, same math as `model.SeedNet` (tests/test_fast.py pins it),
expressed the way XLA on CPU runs fastest (measurements: docs/performance.md):

* max-pool as reshape + max: `nn.max_pool` lowers to reduce_window, whose
  gradient (select_and_scatter) is several times slower on CPU; in training it
  is folded into the BatchNorm+ReLU before it, which pools the conv output
  (exactly: the map is monotone, and made rising by negating the channels with a
  negative scale) so that the full-size activation is never written, and routes
  each window's gradient to its first maximum as PyTorch does;
* BatchNorm (training mode) and ReLU as one `jax.custom_vjp` with the
  textbook backward pass: two reductions and one elementwise pass, where
  autodiff of the forward emits many more passes over the activations, and
  those memory-bound passes, not the convolutions' FLOPs, dominate the step;
* convolutions as one `jax.custom_vjp` that picks, for each product, the form
  XLA:CPU runs fastest: the first layer (one input channel) as nine shifted
  multiply-adds, which XLA fuses into one pass (Eigen's convolution is 15x
  slower there); the input gradient of a 3x3 layer as nine shifted matrix
  products (Eigen's transposed convolution is 1.4-2.2x slower); everything
  else as `lax.conv_general_dilated` in NHWC/HWIO, as nn.Conv does;
* in training, no conv bias in the activations: BatchNorm subtracts it again at once,
  so it only enters the running mean. Its gradient is zero in exact arithmetic, and
  zero here; the linen module's is float32 rounding noise, which Adam turns into small
  steps of a bias that changes nothing but that running mean;
* the BatchNorm+ReLU outputs (the next convolution's input) and the gradients leaving
  BatchNorm computed once into memory (`_computed_once`), so that XLA does not recompute
  them, transposed, inside the weight gradients.

It is a drop-in `apply_fn` for the train state; evaluation and export keep
using the readable linen module.
"""

import jax
import jax.numpy as jnp
from jax import lax

from mnist_flax.model import BN_EPSILON, BN_MOMENTUM, CONV_LAYERS, POOL_AFTER, check_images, normalize


def _computed_once(fn, *args) -> jax.Array:
    """fn(*args), written to memory once, where its consumers read it.

    XLA:CPU otherwise recomputes fn's chain of elementwise operations inside each consumer,
    and for the transposed copies that the weight gradients need it runs that chain in a
    cache-hostile order (1.2 ms instead of 0.2 for conv2's input). XLA fuses nothing across
    a conditional; `lax.optimization_barrier` does not stop the fusion (XLA:CPU removes
    barriers first). The predicate is true for every float, NaN included, but XLA cannot
    prove it, so the conditional stays and the other branch never runs. fn runs inside the
    branch: passing a finished value through would cost a copy of it.
    """
    first = args[0].ravel()[0]
    out = jax.eval_shape(fn, *args)
    return lax.cond((first == first) | (first != first), fn, lambda *_: jnp.zeros(out.shape, out.dtype), *args)


def _lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _single_channel_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID convolution of (N, H, W, 1) images as a sum of shifted, scaled copies."""
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return sum(x[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(kh) for j in range(kw))


def _conv_input_gradient(kernel: jax.Array, dz: jax.Array) -> jax.Array:
    """d(conv)/dx as a sum of per-tap matrix products, each shifted into place by padding."""
    kh, kw = kernel.shape[:2]
    return sum(jnp.pad(jnp.einsum("nhwo,io->nhwi", dz, kernel[i, j]),
                       ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
               for i in range(kh) for j in range(kw))


def _conv_forward(x, kernel):
    y = _single_channel_conv(x, kernel) if x.shape[-1] == 1 else _lax_conv(x, kernel)
    return y, (x, kernel)


def _conv_backward(saved, dz):
    x, kernel = saved
    d_kernel = jax.vjp(lambda k: _lax_conv(x, k), kernel)[1](dz)[0]
    if kernel.shape[:2] == (1, 1):  # a plain matrix product already
        dx = jax.vjp(lambda v: _lax_conv(v, kernel), x)[1](dz)[0]
    else:  # for the first layer this is the images' gradient, which nothing uses: XLA drops it
        dx = _conv_input_gradient(kernel, dz)
    return dx, d_kernel


@jax.custom_vjp
def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID, stride-1 NHWC/HWIO convolution, as `lax.conv_general_dilated`."""
    return _conv_forward(x, kernel)[0]


conv.defvjp(_conv_forward, _conv_backward)


def _weights(z: jax.Array, mask: jax.Array | None) -> tuple[jax.Array | None, jax.Array]:
    """Per-example weights (None: all real) and the number of real positions in z."""
    positions = z.shape[1] * z.shape[2]
    if mask is None:
        return None, jnp.float32(positions * z.shape[0])
    w = mask.astype(z.dtype)
    return w, positions * jnp.sum(w)


def _channel_sum(values: jax.Array, w: jax.Array | None) -> jax.Array:
    """Sum over batch and positions, each example weighted by w (None: all 1)."""
    if w is None:
        return jnp.sum(values, (0, 1, 2))
    # Per-example sums, then one dot with the weights: XLA never materialises the
    # mask broadcast to the activations' full size (about 5% of a step).
    return w @ jnp.sum(values, (1, 2))


def _statistics(z, mask):
    """Weights, count, mean, biased variance (two-pass) and 1/std of z over the real examples."""
    w, n = _weights(z, mask)
    mean = _channel_sum(z, w) / n
    var = _channel_sum(jnp.square(z - mean), w) / n
    return w, n, mean, var, lax.rsqrt(var + BN_EPSILON)


def _unbiased(var, n):
    """PyTorch's running variance takes the unbiased batch variance."""
    return var * n / jnp.maximum(n - 1, 1)


def _bn_relu(z, mean, factor, bias):
    return jnp.maximum((z - mean) * factor + bias, 0.0)


def _normalisation_gradient(g, z, mean, inv_std, scale, w, n, sum_g, sum_g_normed):
    """The textbook BatchNorm backward: d/dz from g, the gradient at the normalised output."""
    w = 1.0 if w is None else w[:, None, None, None]
    normed = (z - mean) * inv_std  # recomputed, not passed in: cheaper than keeping it in memory
    return (scale * inv_std) * (g - w * (sum_g / n) - (w * normed) * (sum_g_normed / n))


def _bn_relu_forward(z, scale, bias, mask):
    w, n, mean, var, inv_std = _statistics(z, mask)
    # y is the next convolution's input, which its weight gradient reads again, transposed.
    y = _computed_once(_bn_relu, z, mean, scale * inv_std, bias)
    return (y, mean, _unbiased(var, n)), (z, mean, inv_std, scale, bias, w, n)


def _bn_relu_backward(saved, cotangents):
    # Only y's cotangent matters: mean and var feed the running statistics, which are not
    # differentiated (as in flax and PyTorch).
    z, mean, inv_std, scale, bias, w, n = saved
    normed = (z - mean) * inv_std
    g = jnp.where(normed * scale + bias > 0, cotangents[0], 0.0)  # through the ReLU
    sum_g, sum_g_normed = jnp.sum(g, (0, 1, 2)), jnp.sum(g * normed, (0, 1, 2))
    dz = _computed_once(_normalisation_gradient, g, z, mean, inv_std, scale, w, n, sum_g, sum_g_normed)
    return dz, sum_g_normed, sum_g, None  # the mask gets no gradient


@jax.custom_vjp
def bn_relu_train(z, scale, bias, mask):
    """relu(batch_norm(z)) over the real examples, plus the batch mean and unbiased variance."""
    return _bn_relu_forward(z, scale, bias, mask)[0]


bn_relu_train.defvjp(_bn_relu_forward, _bn_relu_backward)


def _windows(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H/2, 2, W/2, 2, C): the 2x2 pooling windows."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _first_max_slot(windows: jax.Array, chosen: jax.Array) -> jax.Array:
    """For each 2x2 window, the slot (0-3, row-major) of the first position equal to chosen."""
    hit = [windows[:, :, i, :, j] == chosen for i in range(2) for j in range(2)]
    return jnp.where(hit[0], 0, jnp.where(hit[1], 1, jnp.where(hit[2], 2, 3)))


def _bn_relu_pool_forward(z, scale, bias, mask):
    w, n, mean, var, inv_std = _statistics(z, mask)
    factor = scale * inv_std
    # relu((z - mean) * factor + bias) rises with z (scale >= 0), and so does each rounded
    # step of it: pooling z first is exact, and the full-size activation is never written.
    chosen = _windows(z).max(axis=(2, 4))
    y = _computed_once(_bn_relu, chosen, mean, factor, bias)
    return (y, mean, _unbiased(var, n)), (z, chosen, mean, inv_std, scale, bias, w, n)


def _pooled_normalisation_gradient(g, z, chosen, mean, inv_std, scale, w, n, sum_g, sum_g_normed):
    """`_normalisation_gradient` with g, given per pooling window, routed to the window's position."""
    # Each window's gradient goes to the first position holding the pooled value, where
    # max-pooling sends it (XLA's select_and_scatter, PyTorch's max_pool2d). Selecting by
    # slot number keeps this one elementwise expression that XLA fuses into dz's pass;
    # building the four slots and concatenating them cost a full extra pass.
    slot = jnp.arange(4).reshape(1, 1, 2, 1, 2, 1)  # 2 * row + column, on the windows' axes
    first = _first_max_slot(_windows(z), chosen)[:, :, None, :, None, :]
    routed = jnp.where(slot == first, g[:, :, None, :, None, :], 0.0).reshape(z.shape)
    return _normalisation_gradient(routed, z, mean, inv_std, scale, w, n, sum_g, sum_g_normed)


def _bn_relu_pool_backward(saved, cotangents):
    z, chosen, mean, inv_std, scale, bias, w, n = saved
    factor = scale * inv_std
    g = jnp.where((chosen - mean) * factor + bias > 0, cotangents[0], 0.0)  # through the ReLU
    sum_g, sum_g_normed = jnp.sum(g, (0, 1, 2)), jnp.sum(g * ((chosen - mean) * inv_std), (0, 1, 2))
    dz = _computed_once(_pooled_normalisation_gradient, g, z, chosen, mean, inv_std, scale, w, n, sum_g, sum_g_normed)
    return dz, sum_g_normed, sum_g, None


@jax.custom_vjp
def bn_relu_pool_train(z, scale, bias, mask):
    """max_pool_2x2(relu(batch_norm(z))) over the real examples, plus the batch mean and unbiased
    variance. For scale >= 0 only: `conv_bn_relu_pool_train` negates the channels where it is not.
    """
    return _bn_relu_pool_forward(z, scale, bias, mask)[0]


bn_relu_pool_train.defvjp(_bn_relu_pool_forward, _bn_relu_pool_backward)


def conv_bn_relu_pool_train(x, kernel, scale, bias, mask):
    """bn_relu_pool_train(conv(x, kernel), scale, bias, mask), for any sign of scale.

    Channels whose scale is negative are computed negated: kernel and scale times -1,
    which is exact in floating point, as is every step after it (the batch statistics, the
    pooling, both products in the normalisation, and their gradients). BatchNorm+ReLU then
    rises with z in every channel, and pooling takes one maximum instead of a maximum and a
    minimum. The negated channels' batch mean is negated back.
    """
    sign = jnp.where(scale >= 0, 1.0, -1.0)
    y, mean, var = bn_relu_pool_train(conv(x, kernel * sign), scale * sign, bias, mask)
    return y, mean * sign, var


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return _windows(x).max(axis=(2, 4))


def apply(variables: dict, images: jax.Array, *, train: bool, mask: jax.Array | None = None,
          mutable=False):
    """As `SeedNet().apply(variables, images, train=..., mask=..., mutable=...)`."""
    check_images(images)
    params, stats = variables["params"], variables["batch_stats"]
    x = normalize(images)
    new_stats = {}
    for i in range(1, len(CONV_LAYERS) + 1):
        kernel, conv_bias = params[f"conv{i}"]["kernel"], params[f"conv{i}"]["bias"]
        bn, running = params[f"bn{i}"], stats[f"bn{i}"]
        if not train:
            inv_std = lax.rsqrt(running["var"] + BN_EPSILON)
            x = jnp.maximum((conv(x, kernel) + conv_bias - running["mean"]) * (bn["scale"] * inv_std) + bn["bias"], 0.0)
            x = _max_pool_2x2(x) if i == POOL_AFTER else x
            continue
        # Training-mode BatchNorm subtracts the batch mean, so the conv bias cancels exactly
        # (and its gradient is exactly zero): it is left out of z and added back where it
        # survives, in the running mean.
        if i == POOL_AFTER:
            x, mean, var = conv_bn_relu_pool_train(x, kernel, bn["scale"], bn["bias"], mask)
        else:
            x, mean, var = bn_relu_train(conv(x, kernel), bn["scale"], bn["bias"], mask)
        new_stats[f"bn{i}"] = jax.tree.map(
            lambda old, new: BN_MOMENTUM * old + (1 - BN_MOMENTUM) * lax.stop_gradient(new),
            running, {"mean": mean + conv_bias, "var": var})
    logits = x.reshape(x.shape[0], -1) @ params["fc"]["kernel"] + params["fc"]["bias"]
    return (logits, {"batch_stats": new_stats if train else stats}) if mutable else logits
