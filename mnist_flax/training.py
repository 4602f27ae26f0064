"""Training as a library: `train_and_evaluate(config, workdir, data)` trains, evaluates, saves and plots.

`python -m mnist_flax.train` (train.py) turns flags into its arguments; scripts and tests
call it, or its parts, directly.
"""

import dataclasses
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from mnist_flax import batches, checkpoint, loop, metrics_log, parallel, plots, report, resume, step
from mnist_flax.atomic import remove_stale_temporaries
from mnist_flax.config import Config
from mnist_flax.data import MnistArrays
from mnist_flax.errors import MnistFlaxError, UsageError
from mnist_flax.model import count_params, format_parameter_table, network

PROGRESS_EVERY = 10  # steps between progress-bar refreshes
MIN_FREE_BYTES = 1_000_000  # a checkpoint's size, with room


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run, as opposed to what to train (Config): none of these change the result."""

    devices: int = 0  # split each batch over this many devices; 0: parallel.default_device_count()
    checkpoint_every: int = 0  # also save the resume state every N steps; 0: only when interrupted
    progress: bool = True
    plots: bool = True


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a run made. `checkpoint` is None when it stopped early or on a non-primary host."""

    config: Config
    state: step.TrainState
    position: loop.Position
    finished: bool
    epoch_seconds: tuple[float, ...] = ()
    train_metrics: dict = dataclasses.field(default_factory=dict)
    test_metrics: dict | None = None
    metadata: dict | None = None
    checkpoint: Path | None = None
    plots: tuple[Path, ...] = ()


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between calls."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal = signum

    def install(self) -> "StopRequest":
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)
        return self


def learning_rates(state: step.TrainState, total_steps: int) -> np.ndarray:
    """The learning rate of every step of the run: the optimiser's own schedule, evaluated once
    (one JAX call per step would slow the loop)."""
    return np.asarray(jax.vmap(state.learning_rate)(np.arange(total_steps)))


def batch_source(config: Config, images: np.ndarray, labels: np.ndarray, place=lambda b: b):
    """epoch_batches(epoch, start) for loop.run: the config's batches, placed on the devices."""
    data_key = step.data_order_key(config.seed)

    def epoch_batches(epoch: int, start: int):
        return map(place, batches.epoch_batches(images, labels, data_key, epoch, batch_size=config.batch_size,
                                                group=config.steps_per_call, start=start))

    return epoch_batches


def check_output_dir(path: Path) -> None:
    """Fails before any training time is spent unless `path` can be created and written.

    Nothing is created here: a run that fails before training leaves no empty directory.
    """
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    elif shutil.disk_usage(existing).free < MIN_FREE_BYTES:
        problem = f"no space left on {existing}"
    if problem:
        raise MnistFlaxError(f"output directory {path} cannot be written ({problem}); "
                             "choose another with --output-dir or free some space")


def run_metadata(result: TrainResult, test: dict, state: step.TrainState, rates: np.ndarray) -> dict:
    import flax
    import optax
    config = result.config
    return {
        "config": config.to_dict(),
        "test_accuracy": test["accuracy"],
        "per_class_test_accuracy": test["per_class_accuracy"],
        "confusion_matrix": test["confusion_matrix"],
        "train_accuracy": result.train_metrics["accuracy"],
        "train_loss": result.train_metrics["loss"],
        "params": count_params(state.params),
        "num_batches_tracked": int(state.step),
        "peak_learning_rate": float(rates.max()),
        "epoch_seconds": [round(s, 3) for s in result.epoch_seconds],
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "python": sys.version.split()[0]},
    }


def train_and_evaluate(config: Config, workdir: str | Path, data: MnistArrays, *,
                       resumed: tuple[step.TrainState, loop.Position] | None = None,
                       options: RunOptions = RunOptions(), stop: StopRequest | None = None,
                       painter: plots.Painter | None = None) -> TrainResult:
    """Trains `config` (or continues `resumed`), then evaluates, saves and plots into `workdir`.

    The plots are drawn by `painter`'s workers if given, else in this process.
    """
    workdir, stop = Path(workdir), stop or StopRequest()
    state, position = resumed or (step.create_train_state(config), loop.Position())
    if config.train_examples > len(data.train_images):
        raise UsageError(f"--train-examples {config.train_examples} is more than the "
                             f"{len(data.train_images):,} training examples")
    count = config.train_examples or len(data.train_images)
    images, labels = data.train_images[:count], data.train_labels[:count]
    mesh = parallel.make_mesh(options.devices or parallel.default_device_count())
    parallel.check_batch_size(config.batch_size, mesh)
    state = parallel.replicate(state, mesh)
    epoch_batches = batch_source(config, images, labels, parallel.batch_sharder(mesh))
    primary = jax.process_index() == 0  # on many hosts, one process writes the files
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    rates = learning_rates(state, config.total_steps())
    log = metrics_log.MetricsLog(workdir if primary else None, keep_until_step=int(state.step))
    total = config.total_steps()
    print(f"training from step {int(state.step)} of {total}", file=sys.stderr, flush=True)
    bar = tqdm(total=total, initial=int(state.step), unit="step", disable=not options.progress, dynamic_ncols=True)
    epoch_seconds, epoch_metrics, epoch_start, saved_at = [], {}, time.perf_counter(), int(state.step)

    def on_step(r: loop.StepReport):
        log.write(step=r.step, epoch=r.position.epoch, loss=r.loss, accuracy=r.accuracy,
                  learning_rate=float(rates[r.step - 1]), images_per_second=r.images_per_second)
        if r.step % PROGRESS_EVERY == 0 or r.position.batch == config.steps_per_epoch():
            live = r.position.epoch_metrics()
            bar.set_description(f"epoch {r.position.epoch + 1}/{config.epochs}")
            bar.set_postfix(loss=f"{live['loss']:.4f}", acc=f"{live['accuracy']:.4f}", refresh=False)
            bar.update(r.step - bar.n)

    def on_epoch_end(epoch, metrics):
        nonlocal epoch_start
        epoch_seconds.append(time.perf_counter() - epoch_start)
        epoch_metrics.update(metrics)
        epoch_start = time.perf_counter()

    def should_pause(state, position):
        # After each compiled call: save at the end of the call that reaches each multiple of
        # --checkpoint-every, and when a signal asks to stop.
        nonlocal saved_at
        now, every = int(state.step), options.checkpoint_every
        due = every and now // every > saved_at // every
        if (stop.signal is not None or due) and primary:
            resume.save_resume_state(workdir, state, position, config)
            saved_at = now
        return stop.signal is not None

    try:
        state, position, finished = loop.run(state, step.make_train_steps(config), epoch_batches, config.epochs,
                                             position, on_step, on_epoch_end, should_pause)
    except loop.NonFiniteLoss as e:
        if primary:
            resume.save_resume_state(workdir, e.state, e.position, config)
        raise MnistFlaxError(f"{e} The last good state (before step {e.step}) is in "
                             f"{resume.resume_path(workdir)}.") from None
    finally:
        bar.close()
        log.close()
    result = TrainResult(config, state, position, finished, tuple(epoch_seconds),
                         epoch_metrics or position.epoch_metrics())
    if not finished:
        return result

    variables = jax.device_get(step.model_variables(state))
    probabilities = step.predict_probabilities(variables, data.test_images, model=network(config.ops))  # plots reuse them
    test = step.metrics_from_probabilities(probabilities, data.test_labels)
    result = dataclasses.replace(result, test_metrics=test, metadata=run_metadata(result, test, state, rates))
    if not primary:
        return result
    path = checkpoint.save_checkpoint(workdir, variables, result.metadata)
    resume.remove_resume_state(workdir)  # the run is complete: nothing left to resume
    remove_stale_temporaries(workdir)  # left by a writer killed mid-write in an earlier run
    result = dataclasses.replace(result, checkpoint=path)
    print(summary(result), flush=True)  # before the plots, so a plotting failure cannot hide it
    if options.plots:
        written = report.write_plots(path, data=data, probabilities=probabilities, painter=painter)
        result = dataclasses.replace(result, plots=tuple(written))
        print(f"plots:          {', '.join(p.name for p in result.plots)}")
    return result


def summary(result: TrainResult) -> str:
    meta, test = result.metadata, result.test_metrics
    return "\n".join([
        format_parameter_table(result.state.params),
        f"parameters:     {meta['params']:,}",
        f"epoch time:     {', '.join(f'{s:.1f} s' for s in result.epoch_seconds)}",
        f"train accuracy: {100 * meta['train_accuracy']:.2f}% (running, last epoch)",
        f"test accuracy:  {100 * meta['test_accuracy']:.2f}% ({test['correct']:,}/{test['count']:,})",
        f"checkpoint:     {result.checkpoint}",
    ])
