"""Training and evaluation throughput of mnist_flax, comparable with the PyTorch original's.

    python scripts/benchmark.py [--steps 100] [--warmup 5] [--devices N] [--steps-per-call K] [--ops plain]
    python -m pytorch_original.train --steps 100      # the PyTorch original, same machine

Times `--steps` steady-state training steps after warm-up and compilation, exactly as
`python -m mnist_flax.train` runs them (training.batch_source's batches, step.make_train_steps'
compiled calls, loop.run's metrics fetch and NaN check after each call), then the test-set
evaluation. The timed window runs from the end of the call holding step `--warmup` to the
end of the call holding `--warmup + --steps`; `timed_steps` is the number of steps in it.
Prints one JSON line; `images_per_second`, `seconds`, `timed_steps` and `params` mean the
same as in the PyTorch original's output. `compile_seconds` is the first call: compiling it, or
loading it from the compilation cache as the train command does (MNIST_FLAX_COMPILATION_CACHE=off
to time the compile).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_flax import parallel, runtime  # noqa: E402
from mnist_flax import config as config_lib  # noqa: E402


def main() -> None:
    defaults = config_lib.Config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first call compiles)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--devices", type=int, default=0, help="devices to split each batch over (0: the default)")
    p.add_argument("--steps-per-call", type=int, default=defaults.steps_per_call,
                   help="training steps per compiled call (default: the config's)")
    p.add_argument("--ops", choices=config_lib.OPS, default=defaults.ops, help="the blocks' form (default: auto)")
    p.add_argument("--manual-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 1 or a.steps_per_call < 1:
        p.error("--steps, --warmup and --steps-per-call must be at least 1")
    config = config_lib.resolve(batch_size=a.batch_size, steps_per_call=a.steps_per_call, ops=a.ops)
    if a.warmup + a.steps > config.steps_per_epoch():
        p.error(f"--warmup + --steps must fit in one epoch ({config.steps_per_epoch()} steps of {a.batch_size})")
    runtime.set_up_process()  # before JAX computes anything, as every command does
    parallel.configure(a.devices)
    runtime.enable_compilation_cache()  # as the train command does (MNIST_FLAX_COMPILATION_CACHE=off: compile)

    import jax
    from mnist_flax import loop, step, training
    from mnist_flax.data import load_mnist
    from mnist_flax.model import count_params

    data = load_mnist(data_dir=a.data_dir, manual_dir=a.manual_dir)
    mesh = parallel.make_mesh(a.devices or parallel.default_device_count())
    state = parallel.replicate(step.create_train_state(config), mesh)
    steps = a.warmup + a.steps
    marks = {}

    def on_step(report):
        marks[report.step] = time.perf_counter()

    start = time.perf_counter()
    # The loop pauses after `steps` steps: exactly the training loop's own per-step work.
    epoch_batches = training.batch_source(config, data.train_images, data.train_labels, parallel.batch_sharder(mesh))
    state, _, _ = loop.run(state, step.make_train_steps(config), epoch_batches, 1, on_step=on_step,
                           should_pause=lambda s, position: position.batch >= steps)
    compile_seconds = marks[1] - start  # the first call: compilation plus its steps

    def call_end(n):  # the last step of the call that holds step n: calls start at multiples
        return min(-(-n // config.steps_per_call) * config.steps_per_call, config.steps_per_epoch())

    timed_steps = call_end(steps) - call_end(a.warmup)
    timed = marks[call_end(steps)] - marks[call_end(a.warmup)]

    variables = step.model_variables(state)
    step.evaluate(variables, data.test_images, data.test_labels)  # compile
    t0 = time.perf_counter()
    step.evaluate(variables, data.test_images, data.test_labels)
    eval_seconds = time.perf_counter() - t0

    print(json.dumps({
        "impl": "mnist-flax" + ("" if a.ops == "auto" else f"-{a.ops}"),
        "jax": jax.__version__,
        "devices": len(mesh.devices.flat),
        "backend": jax.default_backend(),
        "timed_steps": timed_steps,
        "steps_per_call": config.steps_per_call,
        "seconds": round(timed, 3),
        "images_per_second": round(timed_steps * config.batch_size / timed, 1),
        "compile_seconds": round(compile_seconds, 3),
        "eval_images_per_second": round(len(data.test_images) / eval_seconds, 1),
        "params": count_params(state.params),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }))


if __name__ == "__main__":
    main()
