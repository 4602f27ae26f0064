"""Helper for test_runtime.py: a few train steps on N host devices, results saved as .npz.

Run as a subprocess because the number of CPU devices is fixed when JAX starts.
"""

import sys

import jax
import numpy as np

from mnist_flax import parallel, runtime, step
from mnist_flax import config as config_lib
from mnist_flax.batches import Batch

STEPS = 4
STEPS_PER_CALL = 2


def main(count: int, out: str) -> None:
    runtime.set_up_process()
    parallel.configure(count)
    runtime.enable_compilation_cache()  # the session's, as the commands use it
    mesh = parallel.make_mesh(count)
    assert mesh.size == count, (mesh.size, count)
    shard = parallel.batch_sharder(mesh)
    config = config_lib.resolve(steps_per_call=STEPS_PER_CALL)
    state = parallel.replicate(step.create_train_state(config), mesh)
    train_steps = step.make_train_steps(config)
    rng = np.random.default_rng(0)
    batches = [Batch(rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8),
                              rng.integers(0, 10, 128).astype(np.int32),
                              np.arange(128) < (128 if i < STEPS - 1 else 96))  # the last: a padded epoch end
               for i in range(STEPS)]
    losses = []
    for first in range(0, STEPS, STEPS_PER_CALL):  # as the training loop calls them
        stacked = jax.tree.map(lambda *x: np.stack(x), *batches[first:first + STEPS_PER_CALL])
        state, metrics = train_steps(state, shard(stacked))
        losses.extend((metrics["loss_sum"] / metrics["count"]).tolist())
    probe = rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    variables = jax.device_get(step.model_variables(state))
    flat = {"/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    np.savez(out, losses=np.array(losses), eval_probs=step.predict_probabilities(variables, probe),
             **{f"var:{k}": v for k, v in flat.items()})


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
