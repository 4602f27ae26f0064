"""The operations model.py's blocks are made of: BatchNorm statistics, and fused forms for XLA:CPU.

Each fused form computes what its plain form in model.py computes (nn.Conv, BatchNorm,
nn.relu, nn.max_pool), in the shape XLA:CPU runs fastest; tests/test_ops.py holds them
equal, exactly in float64 and tightly in float32. Why each looks the way it does:

* On CPU the step is bound by passes over the activations, not by the convolutions'
  FLOPs, so the forms below remove passes.
* BatchNorm (training mode) and ReLU are one `jax.custom_vjp` with the textbook backward
  pass: two reductions and one elementwise pass, where autodiff of the forward emits many.
* Max-pooling after BatchNorm+ReLU pools the convolution's output first. That is exact,
  because the map is monotone (made rising by negating the channels whose scale is
  negative), so the full-size activation is never written. Each window's gradient goes to
  its first maximum, as nn.max_pool's select_and_scatter and PyTorch send it.
* The convolution is one `jax.custom_vjp` that picks, per product, the form XLA:CPU runs
  fastest: a single input channel as shifted multiply-adds (one fused pass), small input
  gradients as per-tap matrix products, everything else as `lax.conv_general_dilated` in
  the one layout XLA:CPU hands to Eigen inside a loop too (`_lax_conv`).

docs/performance.md has the measurements behind each choice and the command that
reproduces them.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

FORMS = ("fused", "plain")


def use_fused(setting: str = "auto", backend: str | None = None) -> bool:
    """The one place that picks the blocks' form: "fused"/"plain" as given; "auto" by backend.

    The fused forms were written and measured for XLA:CPU; elsewhere the plain forms let
    XLA's GPU and TPU compilers fuse as they see fit.
    """
    if setting == "auto":
        return (backend or jax.default_backend()) == "cpu"
    if setting not in FORMS:
        raise ValueError(f"ops must be auto, fused or plain, got {setting!r}")
    return setting == "fused"


def steps_need_unrolling(fused: bool, backend: str | None = None) -> bool:
    """Whether a loop of training steps (step.multi_step) must be written out to run fast.

    Only the plain form on CPU: its convolutions' gradients are autodiff's, in layouts that
    XLA:CPU rewrites into Eigen's only outside loops (`_lax_conv`); the fused form's are all
    in Eigen's layout already, and GPUs and TPUs have no such limit.
    """
    return not fused and (backend or jax.default_backend()) == "cpu"


# --------------------------------------------------------------------------- BatchNorm statistics

def example_weights(z: jax.Array, mask: jax.Array | None) -> tuple[jax.Array | None, jax.Array]:
    """Per-example weights (None: every example real) and the number of real positions in z."""
    positions = z.shape[1] * z.shape[2]
    if mask is None:
        return None, jnp.asarray(positions * z.shape[0], z.dtype)
    w = mask.astype(z.dtype)
    return w, positions * jnp.sum(w)


def _channel_sum(values: jax.Array, w: jax.Array | None) -> jax.Array:
    """Sum over batch and positions, each example weighted by w (None: all 1)."""
    if w is None:
        return jnp.sum(values, (0, 1, 2))
    # Per-example sums, then one dot with the weights: the mask is never broadcast to the
    # activations' full size.
    return w @ jnp.sum(values, (1, 2))


def batch_statistics(z: jax.Array, mask: jax.Array | None):
    """(weights, count, mean, biased variance) of z per channel, over the real examples.

    Two-pass variance: stable where E[z^2] - E[z]^2 is not.
    """
    w, n = example_weights(z, mask)
    mean = _channel_sum(z, w) / n
    var = _channel_sum(jnp.square(z - mean), w) / n
    return w, n, mean, var


def running_average(running: dict, mean: jax.Array, var: jax.Array, n: jax.Array, momentum: float) -> dict:
    """PyTorch's BatchNorm2d update: momentum * running + (1 - momentum) * batch, with the
    unbiased batch variance. The statistics are not differentiated (as in flax and PyTorch)."""
    batch = {"mean": mean, "var": var * n / jnp.maximum(n - 1, 1)}
    return jax.tree.map(lambda old, new: momentum * old + (1 - momentum) * lax.stop_gradient(new), running, batch)


# --------------------------------------------------------------------------- convolution

def _computed_once(fn, *args) -> jax.Array:
    """fn(*args), written to memory once, where its consumers read it.

    XLA:CPU otherwise recomputes fn's chain of elementwise operations inside each consumer,
    and for the transposed copies that the weight gradients need it runs that chain in a
    cache-hostile order. XLA fuses nothing across a conditional, whereas it removes
    `lax.optimization_barrier` before fusing. The predicate is true for every float, NaN
    included, but XLA cannot prove it, so the conditional stays and the other branch never
    runs. fn runs inside the branch: passing a finished value through would copy it.
    """
    first = args[0].ravel()[0]
    out = jax.eval_shape(fn, *args)
    return lax.cond((first == first) | (first != first), fn, lambda *_: jnp.zeros(out.shape, out.dtype), *args)


# From this many output positions on (conv2's 24x24, not conv4's 10x10), an input gradient is
# one Eigen convolution rather than per-tap products: on two cores it is the faster of the two
# there, and it splits over more cores better (docs/performance.md).
EIGEN_INPUT_GRADIENT_POSITIONS = 16 * 16


def _lax_conv(x: jax.Array, kernel: jax.Array, padding: str | tuple = "VALID") -> jax.Array:
    """The one convolution XLA:CPU is given: NHWC by HWIO, the layout it hands to Eigen.

    XLA:CPU rewrites a convolution in another layout (autodiff's transposed ones) into this
    one only in a program's top level (its ConvCanonicalization pass); inside a loop, such as
    the scan of step.multi_step, it runs in XLA's own loop nest, far slower. So
    every product below is one of these, or matrix products.
    """
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _single_channel_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID convolution of (N, H, W, 1) images as a sum of shifted, scaled copies."""
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return sum(x[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(kh) for j in range(kw))


def _conv_input_gradient(kernel: jax.Array, dz: jax.Array) -> jax.Array:
    """d(conv)/dx. Over a large activation: the "full" convolution of dz with the flipped kernel,
    one Eigen convolution, which splits over the cores. Over small ones: a sum of per-tap
    matrix products, each shifted into place by padding, which costs less to start."""
    kh, kw = kernel.shape[:2]
    if dz.shape[1] * dz.shape[2] >= EIGEN_INPUT_GRADIENT_POSITIONS:
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # HWIO with I and O swapped
        return _lax_conv(dz, flipped, ((kh - 1, kh - 1), (kw - 1, kw - 1)))
    return sum(jnp.pad(jnp.einsum("nhwo,io->nhwi", dz, kernel[i, j]),
                       ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
               for i in range(kh) for j in range(kw))


def _kernel_gradient(x: jax.Array, dz: jax.Array) -> jax.Array:
    """d(conv)/d(kernel): x correlated with dz over the positions, the batch contracted.

    The batch is the contracted feature and the input channels the batch of `_lax_conv`,
    which is how XLA rewrites autodiff's weight gradient outside a loop: the same products.
    """
    by_input_channel = _lax_conv(x.transpose(3, 1, 2, 0), dz.transpose(1, 2, 0, 3))  # (I, kh, kw, O)
    return by_input_channel.transpose(1, 2, 0, 3)


def _conv_forward(x, kernel):
    y = _single_channel_conv(x, kernel) if x.shape[-1] == 1 else _lax_conv(x, kernel)
    return y, (x, kernel)


def _conv_backward(saved, dz):
    x, kernel = saved
    # For the first layer dx is the images' gradient, which nothing uses: XLA drops it.
    return _conv_input_gradient(kernel, dz), _kernel_gradient(x, dz)


@jax.custom_vjp
def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID, stride-1 NHWC/HWIO convolution without bias, as `lax.conv_general_dilated`."""
    return _conv_forward(x, kernel)[0]


conv.defvjp(_conv_forward, _conv_backward)


# --------------------------------------------------------------------------- BatchNorm + ReLU

def _bn_relu(z, mean, factor, bias):
    return jnp.maximum((z - mean) * factor + bias, 0.0)


def _normalisation_gradient(g, z, mean, inv_std, scale, w, n, sum_g, sum_g_normed):
    """The textbook BatchNorm backward: d/dz from g, the gradient at the normalised output."""
    w = 1.0 if w is None else w[:, None, None, None]
    # Recomputed from z rather than passed in: one more multiply is cheaper than a pass to memory.
    normed = (z - mean) * inv_std
    return (scale * inv_std) * (g - w * (sum_g / n) - (w * normed) * (sum_g_normed / n))


def _statistics(z, mask, epsilon):
    w, n, mean, var = batch_statistics(z, mask)
    return w, n, mean, var, lax.rsqrt(var + epsilon)


def _bn_relu_forward(z, scale, bias, mask, epsilon):
    w, n, mean, var, inv_std = _statistics(z, mask, epsilon)
    # y is the next convolution's input, which its weight gradient reads again, transposed.
    y = _computed_once(_bn_relu, z, mean, scale * inv_std, bias)
    return (y, mean, var, n), (z, mean, inv_std, scale, bias, w, n)


def _bn_relu_backward(epsilon, saved, cotangents):
    # Only y's cotangent matters: the statistics feed the running averages, which are not
    # differentiated.
    z, mean, inv_std, scale, bias, w, n = saved
    normed = (z - mean) * inv_std
    g = jnp.where(normed * scale + bias > 0, cotangents[0], 0.0)  # through the ReLU
    sum_g, sum_g_normed = jnp.sum(g, (0, 1, 2)), jnp.sum(g * normed, (0, 1, 2))
    dz = _computed_once(_normalisation_gradient, g, z, mean, inv_std, scale, w, n, sum_g, sum_g_normed)
    return dz, sum_g_normed, sum_g, None  # the mask gets no gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def bn_relu_train(z, scale, bias, mask, epsilon):
    """relu(batch_norm(z)) over the real examples; also the batch mean, biased variance and count."""
    return _bn_relu_forward(z, scale, bias, mask, epsilon)[0]


bn_relu_train.defvjp(_bn_relu_forward, _bn_relu_backward)


# --------------------------------------------------------------------------- BatchNorm + ReLU + max-pool

def _windows(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H/2, 2, W/2, 2, C): the 2x2 pooling windows."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _first_max_slot(windows: jax.Array, chosen: jax.Array) -> jax.Array:
    """For each 2x2 window, the slot (0-3, row-major) of the first position equal to chosen."""
    hit = [windows[:, :, i, :, j] == chosen for i in range(2) for j in range(2)]
    return jnp.where(hit[0], 0, jnp.where(hit[1], 1, jnp.where(hit[2], 2, 3)))


def _bn_relu_pool_forward(z, scale, bias, mask, epsilon):
    w, n, mean, var, inv_std = _statistics(z, mask, epsilon)
    factor = scale * inv_std
    # relu((z - mean) * factor + bias) rises with z (scale >= 0), and so does each rounded
    # step of it: pooling z first is exact, and the full-size activation is never written.
    chosen = _windows(z).max(axis=(2, 4))
    y = _computed_once(_bn_relu, chosen, mean, factor, bias)
    return (y, mean, var, n), (z, chosen, mean, inv_std, scale, bias, w, n)


def _pooled_normalisation_gradient(g, z, chosen, mean, inv_std, scale, w, n, sum_g, sum_g_normed):
    """`_normalisation_gradient` with g, given per pooling window, routed to the window's position."""
    # Selecting by slot number keeps this one elementwise expression that XLA fuses into dz's
    # pass; building the four slots and concatenating them would be a pass of its own.
    slot = jnp.arange(4).reshape(1, 1, 2, 1, 2, 1)  # 2 * row + column, on the windows' axes
    first = _first_max_slot(_windows(z), chosen)[:, :, None, :, None, :]
    routed = jnp.where(slot == first, g[:, :, None, :, None, :], 0.0).reshape(z.shape)
    return _normalisation_gradient(routed, z, mean, inv_std, scale, w, n, sum_g, sum_g_normed)


def _bn_relu_pool_backward(epsilon, saved, cotangents):
    z, chosen, mean, inv_std, scale, bias, w, n = saved
    factor = scale * inv_std
    g = jnp.where((chosen - mean) * factor + bias > 0, cotangents[0], 0.0)  # through the ReLU
    sum_g, sum_g_normed = jnp.sum(g, (0, 1, 2)), jnp.sum(g * ((chosen - mean) * inv_std), (0, 1, 2))
    dz = _computed_once(_pooled_normalisation_gradient, g, z, chosen, mean, inv_std, scale, w, n, sum_g, sum_g_normed)
    return dz, sum_g_normed, sum_g, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bn_relu_pool_train(z, scale, bias, mask, epsilon):
    """max_pool_2x2(relu(batch_norm(z))) for scale >= 0; `conv_bn_relu_pool_train` makes it so."""
    return _bn_relu_pool_forward(z, scale, bias, mask, epsilon)[0]


_bn_relu_pool_train.defvjp(_bn_relu_pool_forward, _bn_relu_pool_backward)


def conv_bn_relu_pool_train(x, kernel, scale, bias, mask, epsilon):
    """max_pool_2x2(relu(batch_norm(conv(x, kernel)))) over the real examples, for any sign of
    scale; also the batch mean, biased variance and count, as `bn_relu_train`.

    Channels whose scale is negative are computed negated: kernel and scale times -1, which
    is exact in floating point, as is every step after it (the batch statistics, the pooling,
    both products in the normalisation, and their gradients). BatchNorm+ReLU then rises with
    z in every channel, and pooling takes one maximum instead of a maximum and a minimum.
    The negated channels' batch mean is negated back.
    """
    sign = jnp.where(scale >= 0, 1.0, -1.0).astype(scale.dtype)
    y, mean, var, n = _bn_relu_pool_train(conv(x, kernel * sign), scale * sign, bias, mask, epsilon)
    return y, mean * sign, var, n
