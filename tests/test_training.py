"""The train step is pure, deterministic, compiles once, and learns."""

import chex
import jax
import numpy as np
import pytest

from mnist_flax import loop, training
from mnist_flax.config import TrainConfig


def fixed_batch(seed=0, size=32):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (size, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, (size,), dtype=np.int32)
    return training.Batch(images, labels, np.ones(size, bool))


@pytest.fixture(scope="module")
def state():
    return training.create_train_state(jax.random.key(0), TrainConfig())


def test_step_is_pure_and_bit_for_bit_deterministic(state):
    batch = fixed_batch()
    step = jax.jit(training.train_step)
    before = jax.tree.map(np.array, state)
    s1, m1 = step(state, batch)
    s2, m2 = step(state, batch)
    chex.assert_trees_all_equal(s1.params, s2.params)
    chex.assert_trees_all_equal(s1.batch_stats, s2.batch_stats)
    chex.assert_trees_all_equal(s1.opt_state, s2.opt_state)
    chex.assert_trees_all_equal(m1, m2)
    chex.assert_trees_all_equal(jax.tree.map(np.array, state), before)  # input untouched
    assert int(s1.step) == int(state.step) + 1


def test_step_changes_params_and_batch_stats(state):
    new, _ = jax.jit(training.train_step)(state, fixed_batch())
    chex.assert_trees_all_equal_shapes_and_dtypes(new.params, state.params)
    assert not np.array_equal(new.params["conv1"]["kernel"], state.params["conv1"]["kernel"])
    assert not np.array_equal(new.batch_stats["bn1"]["mean"], state.batch_stats["bn1"]["mean"])


def test_loss_goes_down_on_a_fixed_batch(state):
    batch = fixed_batch(size=64)
    step = jax.jit(training.train_step)
    losses = []
    s = state
    for _ in range(20):
        s, m = step(s, batch)
        losses.append(float(m["loss_sum"] / m["count"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_step_compiles_once(state):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, b):
        return training.train_step(s, b)

    s = state
    for seed in range(3):
        s, _ = step(s, fixed_batch(seed))


def test_metrics_count_only_real_examples(state):
    batch = fixed_batch(size=8)
    mask = np.array([True] * 5 + [False] * 3)
    _, m = jax.jit(training.train_step)(state, batch._replace(mask=mask))
    assert float(m["count"]) == 5
    assert 0 <= float(m["correct"]) <= 5


@pytest.mark.parametrize("n,batch", [(60000, 128), (10, 4), (8, 4), (3, 128)])
def test_epoch_order_sees_every_example_once(n, batch):
    order, mask = training.epoch_order(jax.random.key(0), 0, n, batch)
    assert order.shape == mask.shape == (-(-n // batch), batch)
    assert sorted(order[mask].tolist()) == list(range(n))
    assert mask.sum() == n


def test_epoch_order_depends_on_key_and_epoch():
    a, _ = training.epoch_order(jax.random.key(0), 0, 100, 10)
    assert np.array_equal(a, training.epoch_order(jax.random.key(0), 0, 100, 10)[0])
    assert not np.array_equal(a, training.epoch_order(jax.random.key(0), 1, 100, 10)[0])
    assert not np.array_equal(a, training.epoch_order(jax.random.key(1), 0, 100, 10)[0])


def test_train_epoch_on_tiny_data_is_reproducible(state):
    batch = fixed_batch(size=20)

    def run():
        metrics = {}
        final, _, _ = loop.run_epochs(state, batch.images, batch.labels, jax.random.key(3), 1, batch_size=8,
                                      steps_fn=jax.jit(training.train_steps),
                                      on_epoch_end=lambda epoch, m: metrics.update(m))
        return final, metrics

    (s1, m1), (s2, m2) = run(), run()
    chex.assert_trees_all_equal(s1.params, s2.params)
    assert m1 == m2 and m1["count"] == 20
    assert int(s1.step) == 3


def test_evaluate_counts_correct_predictions(state):
    batch = fixed_batch(size=30)
    variables = training.model_variables(state)
    predicted = np.argmax(training.predict_logits(variables, batch.images), -1)
    result = training.evaluate(variables, batch.images, predicted.astype(np.int32), batch_size=7)
    assert (result["accuracy"], result["correct"], result["count"]) == (1.0, 30, 30)
    confusion = np.array(result["confusion_matrix"])
    assert confusion.sum() == 30 and np.trace(confusion) == 30
    wrong = (predicted + 1) % 10
    result = training.evaluate(variables, batch.images, wrong.astype(np.int32))
    assert result["correct"] == 0 and np.array(result["confusion_matrix"])[wrong[0], predicted[0]] >= 1
    assert all(a == 0 for a in result["per_class_accuracy"])


def test_onecycle_schedule_rises_linearly_then_falls_to_the_final_rate():
    config = TrainConfig(recipe="onecycle", train_examples=1280)  # 10 steps: 2 warm-up, 8 down
    schedule = training.learning_rate_schedule(config)
    peak = training.ONECYCLE_PEAK_FACTOR * config.learning_rate
    rates = np.array([float(schedule(step)) for step in range(11)])
    np.testing.assert_allclose(rates[[0, 1, 2]], [peak / 25, (peak / 25 + peak) / 2, peak], rtol=1e-5)
    np.testing.assert_allclose(rates[10], peak / training.ONECYCLE_FINAL_DIV, rtol=1e-5)
    assert np.all(np.diff(rates[2:]) < 0)
    np.testing.assert_allclose(np.diff(rates[2:]), np.diff(rates[2:])[0], rtol=1e-4)  # a straight line


@pytest.mark.parametrize("recipe, first_step_factor", [("seed", 1.0), ("onecycle", 1 + 0.9 / 1.9)])
def test_first_update_is_adam_or_nadam(recipe, first_step_factor):
    # Adam's first step moves each parameter by the rate (times the gradient's sign); NAdam's
    # looks one momentum step ahead, 1 + b1 / (1 + b1) times as far.
    config = TrainConfig(recipe=recipe)
    params = {"w": np.zeros(3, np.float32)}
    grads = {"w": np.array([0.5, -2.0, 1e-3], np.float32)}
    optimizer = training.make_optimizer(config)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    rate = float(training.learning_rate_schedule(config)(0))
    chex.assert_trees_all_close(updates["w"], -rate * first_step_factor * np.sign(grads["w"]), rtol=1e-4)


def stacked(batches):
    return jax.tree.map(lambda *x: np.stack(x), *batches)


def test_train_steps_runs_the_active_steps_and_leaves_the_state_alone_elsewhere(state):
    batches = [fixed_batch(seed=i, size=16) for i in range(4)]
    steps = jax.jit(training.train_steps)
    untouched, _ = steps(state, stacked(batches), np.zeros(4, bool))
    chex.assert_trees_all_equal(untouched, state)
    # Slots 1 and 2 active: the same two steps as one at a time (another program: float32 rounding).
    middle, metrics = steps(state, stacked(batches), np.array([False, True, True, False]))
    one_by_one = state
    for batch in batches[1:3]:
        one_by_one, last = jax.jit(training.train_step)(one_by_one, batch)
    assert int(middle.step) == int(state.step) + 2
    chex.assert_trees_all_close(middle.params, one_by_one.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss_sum"][2], last["loss_sum"], rtol=1e-5)


@pytest.mark.parametrize("step, batch, batches, expected", [
    (0, 0, 10, ([0, 1, 2, 3], 0, 4)),
    (6, 6, 10, ([6, 6, 6, 7], 2, 2)),  # resumed mid-call: the steps keep their slots
    (8, 8, 10, ([8, 9, 9, 9], 0, 2)),  # the epoch's end cuts the call
    (10, 0, 10, ([0, 0, 0, 1], 2, 2)),  # the next epoch starts mid-call, in step order
])
def test_calls_align_to_global_steps(step, batch, batches, expected):
    assert loop._call_slots(step, batch, batches, 4) == expected


def test_nan_in_the_middle_of_a_call_falls_back_to_the_state_before_that_step():
    """The loop's NaN guard is exact whatever step of a call the loss blows up in."""
    batch = fixed_batch(size=64)
    state = training.create_train_state(jax.random.key(0), TrainConfig(learning_rate=1e30))

    def blow_up(steps_per_call):
        with pytest.raises(loop.NonFiniteLoss) as caught:
            loop.run_epochs(state, batch.images, batch.labels, jax.random.key(3), 1, batch_size=8,
                            steps_per_call=steps_per_call)
        return caught.value

    grouped, single = blow_up(4), blow_up(1)
    assert 1 < grouped.step < 8 and grouped.step % 4 != 1  # not at a call's first step
    assert (grouped.step, grouped.position) == (single.step, single.position)
    assert int(grouped.state.step) == grouped.step - 1
    chex.assert_tree_all_finite(grouped.state.params)
    chex.assert_trees_all_close(grouped.state.params, single.state.params, rtol=1e-5)
