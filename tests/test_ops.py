"""The network's fused form (ops.py) computes the same training step as its plain form.

Exactness is checked in float64, where rounding is too small to matter: one step's
gradients and three Adam steps agree to about 1e-9 relative. In float32 the two paths
sum in different orders, so a pre-activation within rounding of zero can land on the
other side of a ReLU in one of them. That moves a gradient by one element's share
(under 1% of its largest entry here), so float32 gradients get a tolerance that
allows it, while the forward pass, which is continuous, is held tight.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_flax import ops, step
from mnist_flax import config as config_lib
from mnist_flax.batches import Batch
from mnist_flax.model import CNN, network

PLAIN, FUSED = CNN(fused=False).apply, CNN(fused=True).apply

STEPS = 3


def conv_bias(path: str) -> bool:
    # A conv bias feeds BatchNorm, which subtracts the batch mean: its gradient is exactly zero
    # in exact arithmetic and rounding noise in any float implementation (PyTorch's too).
    return path.startswith("conv") and path.endswith("bias")


def flat(tree) -> dict:
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def batches(count, real_last=97, dtype=np.uint8):
    """Random batches; the last has `real_last` real examples. Float dtypes give pixels in [0, 1]."""
    rng = np.random.default_rng(0)
    for i in range(count):
        real = 128 if i < count - 1 else real_last
        images = rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8)
        if dtype != np.uint8:
            images = (images / 255.0).astype(dtype)
        yield Batch(images, rng.integers(0, 10, 128).astype(np.int32), np.arange(128) < real)


@pytest.fixture(scope="module")
def initial():
    return step.create_train_state(config_lib.resolve())


def to_float64(state):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


# One function for every test: jit reuses a trace only for the same function object.
GRAD_FN = jax.jit(jax.value_and_grad(step.loss_and_updates, has_aux=True))


def gradients(state, apply_fn, batch):
    state = state.replace(apply_fn=apply_fn)
    (loss, (logits, stats)), grads = GRAD_FN(state.params, state, batch)
    return loss, logits, stats, grads


def assert_gradients_close(quick, plain, rtol):
    """Each gradient within rtol of its largest entry; conv biases against their kernel's."""
    plain, quick = flat(plain), flat(quick)
    for path, g in plain.items():
        scale = np.abs(plain[path[:-4] + "kernel"] if conv_bias(path) else g).max()
        np.testing.assert_allclose(quick[path], g, rtol=0, atol=rtol * scale, err_msg=path)


@pytest.mark.parametrize("real", [128, 97])
def test_one_step_is_exact_in_float64(initial, real):
    with jax.enable_x64(True):
        state = to_float64(initial)
        batch = next(batches(1, real_last=real, dtype=np.float64))
        plain = gradients(state, PLAIN, batch)
        quick = gradients(state, FUSED, batch)
        assert quick[3]["conv2"]["kernel"].dtype == jnp.float64  # really computed in 64 bits
        np.testing.assert_allclose(quick[0], plain[0], rtol=1e-12)
        np.testing.assert_allclose(quick[1][:real], plain[1][:real], rtol=1e-10, atol=1e-10)
        chex.assert_trees_all_close(quick[2], plain[2], rtol=1e-10, atol=1e-12)
        assert_gradients_close(quick[3], plain[3], rtol=1e-9)


def test_a_few_adam_steps_are_exact_in_float64(initial):
    with jax.enable_x64(True):
        state = to_float64(initial)
        plain, quick = state.replace(apply_fn=PLAIN), state.replace(apply_fn=FUSED)
        train_step = jax.jit(step.train_step)
        for batch in batches(STEPS, dtype=np.float64):
            plain, m_plain = train_step(plain, batch)
            quick, m_quick = train_step(quick, batch)
            np.testing.assert_allclose(m_quick["loss_sum"], m_plain["loss_sum"], rtol=1e-12)
        for path, value in flat(plain.params).items():
            if not conv_bias(path):  # Adam turns their rounding-noise gradients into lr-sized steps
                np.testing.assert_allclose(flat(quick.params)[path], value, rtol=0, atol=1e-9, err_msg=path)
        for path, value in flat(plain.batch_stats).items():
            if path.endswith("var"):  # running means absorb the conv-bias noise; variances do not
                np.testing.assert_allclose(flat(quick.batch_stats)[path], value, rtol=1e-9, err_msg=path)


@pytest.mark.parametrize("real", [128, 97])
def test_one_step_agrees_in_float32(initial, real):
    batch = next(batches(1, real_last=real))
    plain = gradients(initial, PLAIN, batch)
    quick = gradients(initial, FUSED, batch)
    np.testing.assert_allclose(quick[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(quick[1][:real], plain[1][:real], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(quick[2], plain[2], rtol=1e-5, atol=1e-6)
    assert_gradients_close(quick[3], plain[3], rtol=2e-2)  # room for a ReLU flip (module docstring)


def test_a_few_adam_steps_agree_in_float32(initial):
    plain, quick = initial.replace(apply_fn=PLAIN), initial.replace(apply_fn=FUSED)
    train_step = jax.jit(step.train_step)
    for batch in batches(STEPS):
        plain, m_plain = train_step(plain, batch)
        quick, m_quick = train_step(quick, batch)
        np.testing.assert_allclose(m_quick["loss_sum"], m_plain["loss_sum"], rtol=1e-5)
    for path, value in flat(plain.params).items():
        if not conv_bias(path):  # each step moves a parameter by up to the learning rate, 0.01
            np.testing.assert_allclose(flat(quick.params)[path], value, atol=1e-3, err_msg=path)


def test_evaluation_in_either_form_gives_the_same_logits(initial):
    """In evaluation the fused form differs only in conv1, summed as nine shifted products."""
    variables = step.model_variables(initial)
    variables = {**variables, "batch_stats": jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])}
    logits = jax.jit(step.predict_logits, static_argnums=2)
    with jax.enable_x64(True):
        images = next(batches(1, dtype=np.float64)).images
        np.testing.assert_allclose(logits(to_float64(variables), images, CNN(fused=True)),
                                   logits(to_float64(variables), images, CNN()), rtol=1e-12, atol=1e-12)
    images = next(batches(1)).images
    np.testing.assert_allclose(logits(variables, images, CNN(fused=True)), logits(variables, images, CNN()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a fact of XLA:CPU")
def test_evaluation_gives_xla_no_convolution_of_one_channel(initial):
    """XLA:CPU's convolution of a one-channel input took 7x as long as the fused form's shifted
    products: evaluation takes the fused form, whose conv1 is not a convolution."""
    assert network() == FUSED.__self__
    images = np.zeros((step.EVAL_BATCH_SIZE, 28, 28, 1), np.uint8)
    program = jax.jit(step.predict_logits).lower(step.model_variables(initial), images).compile().as_text()
    outputs = re.findall(r"= f32(\[[\d,]+\])\S* convolution\(", program)  # conv3's 1x1 is a dot
    assert outputs == [f"[{len(images)},{n},{n},{c}]" for n, c in ((24, 16), (10, 16), (8, 8))], outputs


def test_the_form_is_chosen_by_backend_and_overridable():
    assert ops.use_fused("auto", backend="cpu") and not ops.use_fused("auto", backend="gpu")
    assert ops.use_fused("fused", backend="tpu") and not ops.use_fused("plain", backend="cpu")
    with pytest.raises(ValueError, match="auto, fused or plain"):
        ops.use_fused("fast")
    assert network(config_lib.resolve(ops="plain").ops) == CNN(fused=False)
    assert network(config_lib.resolve(ops="fused").ops) == CNN(fused=True)


@pytest.mark.parametrize("form", ["plain", "fused"])
def test_a_run_evaluates_in_the_form_it_trained_in(tmp_path, monkeypatch, mnist_arrays, form):
    """`--ops plain` trains plain and evaluates plain; its checkpoint is then applied plain too."""
    from mnist_flax import checkpoint, training

    applied = []
    original = step.predict_probabilities

    def spy(variables, images, batch_size=step.EVAL_BATCH_SIZE, model=None):
        applied.append(model)
        return original(variables, images, batch_size, model)

    monkeypatch.setattr(step, "predict_probabilities", spy)
    config = config_lib.resolve(ops=form, train_examples=2 * 128)
    result = training.train_and_evaluate(config, tmp_path, mnist_arrays,
                                         options=training.RunOptions(progress=False, plots=False))
    assert applied == [network(form)] and network(form).fused == (form == "fused")
    assert checkpoint.network_for(checkpoint.load_checkpoint(result.checkpoint)[1]) == network(form)
    assert checkpoint.network_for(None) == network()  # no sidecar: "auto"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a fact of XLA:CPU")
@pytest.mark.parametrize("form", ["fused", "plain"])
def test_every_convolution_of_the_training_call_is_in_eigens_layout(form):
    """XLA:CPU runs a convolution through Eigen only in its NHWC/HWIO layout, and puts one into
    that layout only outside loops: in the scan of steps, one in another layout runs ten times
    slower. The fused form's are all in it (ops._lax_conv); the plain form's steps are unrolled."""
    config = config_lib.resolve(ops=form, batch_size=8, steps_per_call=2)
    state = step.create_train_state(config)
    group = Batch(np.zeros((2, 8, 28, 28, 1), np.uint8), np.zeros((2, 8), np.int32), np.ones((2, 8), bool))
    program = step.make_train_steps(config).lower(state, group).compile().as_text()
    layouts = re.findall(r"= \S+ convolution\(.*?dim_labels=([^,\s]+)", program)
    assert len(layouts) >= 5 and set(layouts) == {"b01f_01io->b01f"}, layouts
    assert (" while(" in program) == (form == "fused")  # a scan, unless unrolled


def test_the_train_state_applies_the_module(initial):
    """The state trains the linen module itself, in the form picked for this backend."""
    assert initial.apply_fn.__func__ is CNN.apply
    assert initial.apply_fn.__self__ == CNN(fused=ops.use_fused("auto"))


def test_the_fused_form_validates_input(initial):
    with pytest.raises(ValueError, match=r"\(N, 28, 28, 1\)"):
        FUSED(step.model_variables(initial), jnp.zeros((2, 28, 28)), train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pooling_routes_ties_like_max_pool(sign):
    """Tied windows (flat image regions) send the gradient to their first maximum, as
    nn.max_pool (select_and_scatter) and PyTorch do, for rising and falling BatchNorm scales."""
    import flax.linen as nn

    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        z = rng.integers(0, 3, (4, 6, 6, 3)).astype(np.float64)  # few distinct values: many ties
        scale, bias = sign * np.array([1.0, 0.5, 2.0]), np.array([0.3, -0.1, 0.2])
        mask = np.array([True, True, True, False])
        cotangent = rng.normal(size=(4, 3, 3, 3)) * mask[:, None, None, None]

        def reference(z, scale, bias):
            w = mask.astype(z.dtype)[:, None, None, None]
            n = 36 * w.sum()
            mean = (z * w).sum((0, 1, 2)) / n
            var = (jnp.square(z - mean) * w).sum((0, 1, 2)) / n
            y = jnp.maximum((z - mean) * (scale * jax.lax.rsqrt(var + 1e-5)) + bias, 0.0)
            return nn.max_pool(y, (2, 2), strides=(2, 2))

        def fused(z, scale, bias):  # through an identity 1x1 convolution, which negates falling channels
            return ops.conv_bn_relu_pool_train(z, jnp.eye(3).reshape(1, 1, 3, 3), scale, bias, mask, 1e-5)[0]

        expected, expected_vjp = jax.vjp(reference, z, scale, bias)
        actual, actual_vjp = jax.vjp(fused, z, scale, bias)
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
        real = z[mask]
        _, mean, var, n = ops.conv_bn_relu_pool_train(z, jnp.eye(3).reshape(1, 1, 3, 3), scale, bias, mask, 1e-5)
        assert float(n) == 36 * mask.sum()
        np.testing.assert_allclose(mean, real.mean((0, 1, 2)), rtol=1e-12)
        np.testing.assert_allclose(var, real.var((0, 1, 2)), rtol=1e-12)  # biased: what normalises
        for got, want in zip(actual_vjp(cotangent), expected_vjp(cotangent)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
