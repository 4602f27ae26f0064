"""The network's contract: shapes, dtypes, parameter counts, input validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PARAMETERS
from mnist_flax.model import (CNN, PARAM_BUDGET, count_params, format_parameter_table, init_variables, layer_order,
                              normalize, parameter_table)

EXPECTED_COUNTS = {  # per layer, as in the original PyTorch network
    "conv1": 8 * 1 * 9 + 8, "bn1": 16,
    "conv2": 16 * 8 * 9 + 16, "bn2": 32,
    "conv3": 8 * 16 * 1 + 8, "bn3": 16,
    "conv4": 16 * 8 * 9 + 16, "bn4": 32,
    "conv5": 8 * 16 * 9 + 8, "bn5": 16,
    "fc": 512 * 10 + 10,
}


@pytest.fixture(scope="module")
def variables():
    return init_variables(jax.random.key(0))


@pytest.mark.parametrize("batch", [1, 3, 128])
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32])
def test_logits_shape_and_dtype(variables, batch, dtype):
    images = jnp.zeros((batch, 28, 28, 1), dtype)
    for train in (False, True):
        out = CNN().apply(variables, images, train=train, mutable=["batch_stats"] if train else False)
        logits = out[0] if train else out
        chex.assert_shape(logits, (batch, 10))
        chex.assert_type(logits, jnp.float32)
        chex.assert_tree_all_finite(logits)


def test_parameter_total_is_the_originals(variables):
    assert count_params(variables["params"]) == PARAMETERS
    assert count_params(variables["params"]) < PARAM_BUDGET


def test_per_layer_counts(variables):
    per_layer = {}
    for name, _, count in parameter_table(variables["params"]):
        per_layer[name.split("/")[0]] = per_layer.get(name.split("/")[0], 0) + count
    assert per_layer == EXPECTED_COUNTS
    assert list(per_layer) == list(EXPECTED_COUNTS)  # table is in layer order
    assert layer_order() == list(EXPECTED_COUNTS)  # ... which is the module's own


def test_parameter_table_text(variables):
    text = format_parameter_table(variables["params"])
    assert "fc/kernel" in text and "(512, 10)" in text
    assert text.splitlines()[-1].split()[-1] == f"{PARAMETERS:,}"


def test_kernel_layouts(variables):
    p = variables["params"]
    chex.assert_shape([p["conv1"]["kernel"], p["conv3"]["kernel"], p["fc"]["kernel"]],
                      [(3, 3, 1, 8), (1, 1, 16, 8), (512, 10)])
    chex.assert_shape(variables["batch_stats"]["bn2"]["mean"], (16,))


def test_uint8_and_unit_float_inputs_agree(variables):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    from_uint8 = CNN().apply(variables, pixels, train=False)
    from_float = CNN().apply(variables, pixels.astype(np.float32) / 255.0, train=False)
    chex.assert_trees_all_close(from_uint8, from_float, atol=1e-5)
    chex.assert_trees_all_close(normalize(jnp.array([[0]], jnp.uint8)), jnp.array([[-0.1307 / 0.3081]]), atol=1e-6)


def test_normalize_keeps_float_precision_where_jax_has_it():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    assert normalize(pixels).dtype == jnp.float32
    assert normalize(pixels.astype(np.float16) / 255).dtype == jnp.float32
    assert normalize(pixels / 255.0).dtype == jnp.float32  # float64 input, JAX in 32 bits
    with jax.enable_x64(True):  # the fused form's exactness tests run both forms in float64
        assert normalize(pixels / 255.0).dtype == jnp.float64
        assert normalize(pixels).dtype == jnp.float32


@pytest.mark.parametrize("shape", [(28, 28, 1), (2, 28, 28), (2, 1, 28, 28), (2, 32, 32, 1), (2, 28, 28, 3)])
def test_wrong_shape_is_a_clear_error(variables, shape):
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 28, 28, 1\)"):
        CNN().apply(variables, jnp.zeros(shape), train=False)


def test_wrong_dtype_is_a_clear_error(variables):
    with pytest.raises(ValueError, match="uint8 or float"):
        CNN().apply(variables, jnp.zeros((1, 28, 28, 1), bool), train=False)


def test_init_is_deterministic_in_the_key():
    chex.assert_trees_all_equal(init_variables(jax.random.key(1)), init_variables(jax.random.key(1)))
    a, b = init_variables(jax.random.key(1)), init_variables(jax.random.key(2))
    assert not np.array_equal(a["params"]["fc"]["kernel"], b["params"]["fc"]["kernel"])


def test_batchnorm_running_stats_follow_pytorch(variables):
    """running = 0.9 running + 0.1 batch, with the unbiased batch variance, as torch.nn.BatchNorm2d."""
    images = np.random.default_rng(1).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    _, updates = CNN().apply(variables, images, train=True, mutable=["batch_stats"])
    x = normalize(images)
    conv = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = conv + variables["params"]["conv1"]["bias"]
    n = conv.shape[0] * conv.shape[1] * conv.shape[2]
    mean = conv.mean(axis=(0, 1, 2))
    unbiased = conv.var(axis=(0, 1, 2)) * n / (n - 1)
    chex.assert_trees_all_close(updates["batch_stats"]["bn1"]["mean"], 0.1 * mean, atol=1e-5)
    chex.assert_trees_all_close(updates["batch_stats"]["bn1"]["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)


def test_mask_makes_padding_irrelevant(variables):
    """A padded batch with a mask trains exactly as the real examples alone would."""
    rng = np.random.default_rng(2)
    real = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    padded = np.concatenate([real, rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)])
    mask = np.array([True] * 5 + [False] * 3)
    alone, s1 = CNN().apply(variables, real, train=True, mutable=["batch_stats"])
    masked, s2 = CNN().apply(variables, padded, train=True, mask=mask, mutable=["batch_stats"])
    chex.assert_trees_all_close(masked[:5], alone, atol=1e-5)
    chex.assert_trees_all_close(s1, s2, atol=1e-5)


def test_kernels_are_drawn_within_pytorchs_bound(variables):
    """Each kernel uniform in +-1/sqrt(fan_in), PyTorch's default, and filling most of it."""
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc"):
        kernel = variables["params"][name]["kernel"]
        bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
        assert 0.9 * bound < float(jnp.abs(kernel).max()) <= bound, name
