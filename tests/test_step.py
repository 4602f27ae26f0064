"""The train step is pure, deterministic, compiles once, learns, and trains whatever the module holds."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_flax import batches, loop, optim, step, training
from mnist_flax import config as config_lib
from mnist_flax.batches import Batch
from mnist_flax.model import ConvBNReLU, check_images, network, normalize


def fixed_batch(seed=0, size=32):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (size, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, (size,), dtype=np.int32)
    return Batch(images, labels, np.ones(size, bool))


@pytest.fixture(scope="module")
def state():
    return step.create_train_state(config_lib.resolve())


def test_the_run_once_programs_give_the_same_numbers_however_they_are_compiled(state):
    """The init, the data order key and the permutation compile for a quick start
    (runtime.RUN_ONCE_COMPILER_OPTIONS); compiled as every other program is, they give the same bits."""
    config = config_lib.resolve()
    optimised = jax.jit(step._create_train_state.__wrapped__, static_argnums=(0, 1))(config, network(config.ops))
    for field in ("params", "batch_stats", "opt_state", "dropout_key", "step"):
        chex.assert_trees_all_equal(getattr(state, field), getattr(optimised, field))
    key = step.data_order_key(config.seed)
    chex.assert_trees_all_equal(jax.random.key_data(key), jax.random.key_data(step.rng_streams(config.seed)[1]))
    chex.assert_trees_all_equal(batches._permutation(key, 3, 60_000),
                                jax.random.permutation(jax.random.fold_in(key, 3), 60_000))


def test_step_is_pure_and_bit_for_bit_deterministic(state):
    batch = fixed_batch()
    train_step = jax.jit(step.train_step)
    before = jax.tree.map(np.array, state)
    s1, m1 = train_step(state, batch)
    s2, m2 = train_step(state, batch)
    chex.assert_trees_all_equal(s1.params, s2.params)
    chex.assert_trees_all_equal(s1.batch_stats, s2.batch_stats)
    chex.assert_trees_all_equal(s1.opt_state, s2.opt_state)
    chex.assert_trees_all_equal(m1, m2)
    chex.assert_trees_all_equal(jax.tree.map(np.array, state), before)  # input untouched
    assert int(s1.step) == int(state.step) + 1


def test_step_changes_params_and_batch_stats(state):
    new, _ = jax.jit(step.train_step)(state, fixed_batch())
    chex.assert_trees_all_equal_shapes_and_dtypes(new.params, state.params)
    assert not np.array_equal(new.params["conv1"]["kernel"], state.params["conv1"]["kernel"])
    assert not np.array_equal(new.batch_stats["bn1"]["mean"], state.batch_stats["bn1"]["mean"])


def test_loss_goes_down_on_a_fixed_batch(state):
    batch = fixed_batch(size=64)
    train_step = jax.jit(step.train_step)
    losses = []
    s = state
    for _ in range(20):
        s, m = train_step(s, batch)
        losses.append(float(m["loss_sum"] / m["count"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_step_compiles_once(state):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(s, b):
        return step.train_step(s, b)

    s = state
    for seed in range(3):
        s, _ = train_step(s, fixed_batch(seed))


def test_metrics_count_only_real_examples(state):
    batch = fixed_batch(size=8)
    mask = np.array([True] * 5 + [False] * 3)
    _, m = jax.jit(step.train_step)(state, batch._replace(mask=mask))
    assert float(m["count"]) == 5
    assert 0 <= float(m["correct"]) <= 5


@pytest.mark.parametrize("n,batch", [(60000, 128), (10, 4), (8, 4), (3, 128)])
def test_epoch_order_sees_every_example_once(n, batch):
    order, mask = batches.epoch_order(jax.random.key(0), 0, n, batch)
    assert order.shape == mask.shape == (-(-n // batch), batch)
    assert sorted(order[mask].tolist()) == list(range(n))
    assert mask.sum() == n


def test_epoch_order_depends_on_key_and_epoch():
    a, _ = batches.epoch_order(jax.random.key(0), 0, 100, 10)
    assert np.array_equal(a, batches.epoch_order(jax.random.key(0), 0, 100, 10)[0])
    assert not np.array_equal(a, batches.epoch_order(jax.random.key(0), 1, 100, 10)[0])
    assert not np.array_equal(a, batches.epoch_order(jax.random.key(1), 0, 100, 10)[0])


def test_train_epoch_on_tiny_data_is_reproducible(state):
    batch = fixed_batch(size=20)

    def run():
        metrics = {}
        config = config_lib.resolve(batch_size=8, seed=3)
        final, _, _ = loop.run(state, step.make_train_steps(config), training.batch_source(config, batch.images,
                               batch.labels), 1, on_epoch_end=lambda epoch, m: metrics.update(m))
        return final, metrics

    (s1, m1), (s2, m2) = run(), run()
    chex.assert_trees_all_equal(s1.params, s2.params)
    assert m1 == m2 and m1["count"] == 20
    assert int(s1.step) == 3


def test_evaluate_counts_correct_predictions(state):
    batch = fixed_batch(size=30)
    variables = step.model_variables(state)
    predicted = np.argmax(jax.jit(step.predict_logits)(variables, batch.images), -1)
    result = step.evaluate(variables, batch.images, predicted.astype(np.int32), batch_size=7)
    assert (result["accuracy"], result["correct"], result["count"]) == (1.0, 30, 30)
    confusion = np.array(result["confusion_matrix"])
    assert confusion.sum() == 30 and np.trace(confusion) == 30
    wrong = (predicted + 1) % 10
    result = step.evaluate(variables, batch.images, wrong.astype(np.int32))
    assert result["correct"] == 0 and np.array(result["confusion_matrix"])[wrong[0], predicted[0]] >= 1
    assert all(a == 0 for a in result["per_class_accuracy"])


def test_onecycle_schedule_rises_linearly_then_falls_to_the_final_rate():
    config = config_lib.resolve("onecycle", train_examples=1280)  # 10 steps: 2 warm-up, 8 down
    schedule = step.create_train_state(config).learning_rate  # the optimiser's own, which the run logs
    peak = config.learning_rate
    rates = np.array([float(schedule(i)) for i in range(11)])
    np.testing.assert_allclose(rates[[0, 1, 2]], [peak / 25, (peak / 25 + peak) / 2, peak], rtol=1e-5)
    np.testing.assert_allclose(rates[10], peak / config.final_div, rtol=1e-5)
    assert np.all(np.diff(rates[2:]) < 0)
    np.testing.assert_allclose(np.diff(rates[2:]), np.diff(rates[2:])[0], rtol=1e-4)  # a straight line


@pytest.mark.parametrize("recipe, first_step_factor", [("original", 1.0), ("onecycle", 1 + 0.9 / 1.9)])
def test_first_update_is_adam_or_nadam(recipe, first_step_factor):
    # Adam's first step moves each parameter by the rate (times the gradient's sign); NAdam's
    # looks one momentum step ahead, 1 + b1 / (1 + b1) times as far.
    config = config_lib.resolve(recipe)
    params = {"w": np.zeros(3, np.float32)}
    grads = {"w": np.array([0.5, -2.0, 1e-3], np.float32)}
    optimizer, schedule = optim.make_optimizer(config)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    rate = float(schedule(0))
    chex.assert_trees_all_close(updates["w"], -rate * first_step_factor * np.sign(grads["w"]), rtol=1e-4)


def stacked(batch_list):
    return jax.tree.map(lambda *x: np.stack(x), *batch_list)


def test_multi_step_equals_single_steps_and_skips_empty_batches(state):
    """Steps with a real example run in order; an all-masked batch (an epoch's padding) changes nothing."""
    group = [fixed_batch(seed=i, size=16) for i in range(3)]
    empty = group[0]._replace(mask=np.zeros(16, bool))
    steps = jax.jit(step.multi_step(step.train_step))
    untouched, _ = steps(state, stacked([empty] * 4))  # the length of the call below: one program, compiled once
    chex.assert_trees_all_equal(untouched, state)
    grouped, metrics = steps(state, stacked(group + [empty]))
    one_by_one = state
    for batch in group:
        one_by_one, last = jax.jit(step.train_step)(one_by_one, batch)
    assert int(grouped.step) == int(state.step) + 3
    # Another program, so float32 rounding may differ.
    chex.assert_trees_all_close(grouped.params, one_by_one.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss_sum"][2], last["loss_sum"], rtol=1e-5)
    assert metrics["count"].tolist() == [16, 16, 16, 0]


def test_steps_per_call_changes_no_bit_of_training():
    """Every call runs the same compiled step (a scan), so how many steps a call holds is only a
    matter of speed: 7 steps as 7 calls or as calls of 3 (the last padded with empty batches)
    give the same state and metrics, bit for bit."""
    batch = fixed_batch(size=7 * 16)
    runs = {}
    for steps_per_call in (1, 3):
        config = config_lib.resolve(batch_size=16, steps_per_call=steps_per_call)
        reports = []
        final, position, _ = loop.run(step.create_train_state(config), step.make_train_steps(config),
                                      training.batch_source(config, batch.images, batch.labels), 1,
                                      on_step=lambda report: reports.append(report[1:3]))
        runs[steps_per_call] = (jax.tree.leaves(final), reports)  # the arrays: each run has its own optimiser object
    assert len(runs[1][1]) == 7
    chex.assert_trees_all_equal(runs[1], runs[3])


@pytest.mark.parametrize("n, batch, group, start", [(10, 2, 4, 0), (10, 2, 4, 4), (9, 2, 4, 0), (3, 8, 4, 0),
                                                    (8, 2, 1, 2)])
def test_epoch_batches_cover_the_epoch_in_groups(n, batch, group, start):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 28, 28, 1), np.uint8)
    labels = np.arange(n, dtype=np.int32)
    order, mask = batches.epoch_order(jax.random.key(0), 0, n, batch)
    groups = list(batches.epoch_batches(images, labels, jax.random.key(0), 0, batch_size=batch, group=group,
                                        start=start))
    steps = config_lib.num_batches(n, batch)
    assert len(groups) == -(-(steps - start) // group)
    for g in groups:
        chex.assert_shape([g.images, g.labels, g.mask], [(group, batch, 28, 28, 1), (group, batch), (group, batch)])
        np.testing.assert_array_equal(g.images[..., 0, 0, 0], g.labels)  # images and labels stay paired
    real = np.concatenate([g.labels[g.mask] for g in groups])
    np.testing.assert_array_equal(real, order[start:][mask[start:]])  # the epoch's order, from `start`
    last = groups[-1]
    assert all(last.mask[i].any() for i in range((steps - start - 1) % group + 1))
    assert not last.mask[(steps - start - 1) % group + 1:].any()  # the call's empty steps


def test_resuming_at_a_group_boundary_gives_the_same_groups():
    images, labels = np.zeros((40, 28, 28, 1), np.uint8), np.arange(40, dtype=np.int32)
    whole = list(batches.epoch_batches(images, labels, jax.random.key(1), 2, batch_size=4, group=4))
    rest = list(batches.epoch_batches(images, labels, jax.random.key(1), 2, batch_size=4, group=4, start=8))
    for a, b in zip(whole[2:], rest, strict=True):
        chex.assert_trees_all_equal(a, b)


def test_nan_in_the_middle_of_a_call_falls_back_to_the_state_before_that_step():
    """The NaN guard is exact whatever step of a call the loss blows up in."""
    batch = fixed_batch(size=64)

    def blow_up(steps_per_call):
        config = config_lib.resolve(learning_rate=1e30, batch_size=8, steps_per_call=steps_per_call, seed=3)
        state = step.create_train_state(config)
        with pytest.raises(loop.NonFiniteLoss) as caught:
            loop.run(state, step.make_train_steps(config), training.batch_source(config, batch.images, batch.labels), 1)
        return caught.value

    grouped, single = blow_up(4), blow_up(1)
    assert 1 < grouped.step < 8 and grouped.step % 4 != 1  # not at a call's first step
    assert (grouped.step, grouped.position) == (single.step, single.position)
    assert int(grouped.state.step) == grouped.step - 1 == grouped.position.batch
    chex.assert_tree_all_finite(grouped.state.params)
    chex.assert_trees_all_close(grouped.state.params, single.state.params, rtol=1e-5)


class CNNWithHiddenDense(nn.Module):
    """The network with one more layer: a hidden Dense with dropout before the classifier."""

    @nn.compact
    def __call__(self, images, *, train, mask=None):
        check_images(images)
        x = normalize(images)
        for block in (ConvBNReLU(8, 3, index=1, fused=True), ConvBNReLU(16, 3, index=2, pool=True, fused=True)):
            nn.share_scope(self, block)
            x = block(x, train=train, mask=mask)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(32, name="hidden")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(10, name="fc")(x)


def test_a_layer_added_to_the_module_trains_as_written():
    """The train state applies the module it is given: a new layer's parameters get gradients and move,
    through the real compiled call, and dropout draws a new mask each step from the state's key."""
    config = config_lib.resolve(batch_size=16)
    model = CNNWithHiddenDense()
    state = step.create_train_state(config, model)
    assert "hidden" in state.params and state.apply_fn.__self__ is model
    batch = fixed_batch(size=16)
    grads = jax.jit(jax.grad(lambda p: step.loss_and_updates(p, state, batch)[0]))(state.params)
    assert float(jnp.abs(grads["hidden"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["bn2"]["scale"]).max()) > 0  # the fused blocks train beneath it
    new, metrics = step.make_train_steps(config)(state, stacked([batch] * config.steps_per_call))
    assert int(new.step) == config.steps_per_call
    assert not np.allclose(new.params["hidden"]["kernel"], state.params["hidden"]["kernel"])
    assert not np.allclose(new.params["hidden"]["bias"], state.params["hidden"]["bias"])
    assert len(set(np.round(metrics["loss_sum"], 6).tolist())) == config.steps_per_call  # each step differs
    # Eval mode is deterministic: dropout is off.
    variables = step.model_variables(new)
    logits = jax.jit(step.predict_logits, static_argnums=2)
    np.testing.assert_array_equal(logits(variables, batch.images, model), logits(variables, batch.images, model))
    train_logits = jax.jit(lambda key: model.apply(variables, batch.images, train=True, mutable=["batch_stats"],
                                                   rngs={"dropout": key})[0])
    dropped = [train_logits(jax.random.key(k)) for k in (0, 1)]
    assert not np.allclose(dropped[0], dropped[1])
