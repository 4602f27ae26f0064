"""Training and evaluation throughput of mnist_flax, comparable with ../shared/bench/torch_seed.py.

    python scripts/benchmark.py [--steps 100] [--warmup 5] [--devices N]
    python ../shared/bench/torch_seed.py --steps 100      # the PyTorch original, same machine

Times `--steps` steady-state training steps of batch 128 after warm-up and
compilation, exactly as `python -m mnist_flax.train` runs them (the same compiled
calls of several steps, host-side batch gather, metrics fetch and NaN check after
each call), then the test-set evaluation. The timed window runs from the end of the
call holding step `--warmup` to the end of the call holding `--warmup + --steps`;
`timed_steps` is the number of steps in it. Prints one JSON line;
`images_per_second`, `seconds`, `timed_steps` and `params` mean the same as in
torch_seed.py's output.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_flax import devices as mnist_devices  # noqa: E402
from mnist_flax.config import TrainConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first one compiles)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--devices", type=int, default=0, help="devices to split each batch over (0: the default)")
    p.add_argument("--steps-per-call", type=int, default=None,
                   help="training steps per compiled call (default: the training loop's, 4)")
    p.add_argument("--plain", action="store_true", help="the linen module's apply instead of mnist_flax.fast")
    p.add_argument("--manual-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 1 or (a.steps_per_call is not None and a.steps_per_call < 1):
        p.error("--steps, --warmup and --steps-per-call must be at least 1")
    if a.warmup + a.steps > TrainConfig(batch_size=a.batch_size).steps_per_epoch():
        p.error(f"--warmup + --steps must fit in one epoch "
                f"({TrainConfig(batch_size=a.batch_size).steps_per_epoch()} steps of {a.batch_size})")
    mnist_devices.configure_runtime(a.devices)  # before JAX computes anything

    import jax
    from mnist_flax import fast, loop, training
    from mnist_flax.data import load_mnist
    from mnist_flax.model import SeedNet, count_params

    data = load_mnist(data_dir=a.data_dir, manual_dir=a.manual_dir)
    config = TrainConfig(batch_size=a.batch_size)
    mesh = mnist_devices.make_mesh(a.devices or 1)
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    apply_fn = SeedNet().apply if a.plain else fast.apply
    state = mnist_devices.replicate(training.create_train_state(init_key, config, apply_fn), mesh)
    steps_per_call = a.steps_per_call or training.STEPS_PER_CALL
    steps = a.warmup + a.steps
    images, labels = data.train_images, data.train_labels
    marks = {}

    def on_step(report):
        marks[report.step] = time.perf_counter()

    start = time.perf_counter()
    # The loop pauses after `steps` steps: exactly the training loop's own per-step work.
    state, _, _ = loop.run_epochs(state, images, labels, data_key, 1, config.batch_size,
                                  steps_per_call=steps_per_call, on_step=on_step,
                                  should_pause=lambda s, pos: int(s.step) >= steps,
                                  shard_batch=mnist_devices.batch_sharder(mesh))
    compile_seconds = marks[1] - start  # the first call: compilation plus its steps

    def call_end(step):  # the last step of the call that holds `step`: calls start at multiples
        return min(-(-step // steps_per_call) * steps_per_call, config.steps_per_epoch())

    timed_steps = call_end(steps) - call_end(a.warmup)
    timed = marks[call_end(steps)] - marks[call_end(a.warmup)]

    variables = training.model_variables(state)
    training.evaluate(variables, data.test_images, data.test_labels)  # compile
    t0 = time.perf_counter()
    training.evaluate(variables, data.test_images, data.test_labels)
    eval_seconds = time.perf_counter() - t0

    print(json.dumps({
        "impl": "mnist-flax" + ("-plain" if a.plain else ""),
        "jax": jax.__version__,
        "devices": len(mesh.devices.flat),
        "backend": jax.default_backend(),
        "timed_steps": timed_steps,
        "steps_per_call": steps_per_call,
        "seconds": round(timed, 3),
        "images_per_second": round(timed_steps * config.batch_size / timed, 1),
        "compile_seconds": round(compile_seconds, 3),
        "eval_images_per_second": round(len(data.test_images) / eval_seconds, 1),
        "params": count_params(state.params),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }))


if __name__ == "__main__":
    main()
