"""Where `python -m mnist_flax.train` spends its wall time: one line per phase.

    python scripts/time_phases.py [any train flags, e.g. --output-dir /tmp/run --no-progress]

Runs the train command in this process with its phases wrapped in timers: imports, loading
MNIST, creating the train state, the training loop (its first call loads or compiles the
step), evaluation, the checkpoint write and the plots (waiting for the plot workers). Whatever is not wrapped (argument
parsing, the summary, interpreter start-up before this script) is the rest. Prints JSON.
"""

import json
import sys
import time
from pathlib import Path

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_flax import cli, runtime  # noqa: E402

runtime.add_xla_flags()  # as run_main does, before JAX starts

# Everything the command imports once its flags are parsed, so that "imports" is all of them.
from mnist_flax import checkpoint, data, loop, report, step, train, training  # noqa: E402, F401

PHASES = [(data, "load_mnist", "data"), (step, "create_train_state", "init"), (loop, "run", "train loop"),
          (step, "evaluate", "evaluation"), (step, "predict_probabilities", "evaluation"),
          (checkpoint, "save_checkpoint", "checkpoint"), (report, "write_plots", "plots")]
seconds = {"imports": time.perf_counter() - START}
depth = [0]


def timed(function, phase):
    def wrapper(*args, **kwargs):
        depth[0] += 1
        t = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:  # a phase inside another (the plots' evaluation) counts once, in the outer
                seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t
    return wrapper


for module, name, phase in PHASES:
    if hasattr(module, name):
        setattr(module, name, timed(getattr(module, name), phase))

code = cli.run_main(train.main)
seconds["total (from this script's start)"] = time.perf_counter() - START
seconds["rest"] = 2 * seconds["total (from this script's start)"] - sum(seconds.values())
print(json.dumps({k: round(v, 2) for k, v in seconds.items()}), file=sys.stderr)
sys.exit(code)
