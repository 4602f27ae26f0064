"""Command line: train SeedNet on MNIST and save a checkpoint.

    python -m mnist_flax.train [--epochs 1] [--batch-size 128] [--learning-rate 0.01]
                               [--recipe seed|onecycle] [--seed 0] [--output-dir artifacts]
                               [--manual-dir DIR] [--checkpoint-every N] [--resume DIR_OR_FILE]

Ctrl-C (SIGINT) or SIGTERM finishes the current call (up to 4 steps), saves a resume state in the
output directory and exits non-zero; `--resume` continues exactly where it stopped.
"""

import argparse
import dataclasses
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from mnist_flax import checkpoint, cli, devices, loop, metrics_log, resume, training
from mnist_flax.atomic import remove_stale_temporaries
from mnist_flax.config import RECIPES, TrainConfig
from mnist_flax.data import load_mnist
from mnist_flax.errors import MnistFlaxError
from mnist_flax.model import count_params, format_parameter_table

PROGRESS_EVERY = 10  # steps between progress-bar refreshes
# Devices per backend when --devices is not given (0: all). See docs/performance.md for CPU's.
DEFAULT_DEVICES = {"cpu": 1}
EXIT_SIGNAL_BASE = 128  # shell convention: killed by signal N exits 128 + N


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m mnist_flax.train", description=__doc__.splitlines()[0])
    # Run settings default to None so that --resume can tell which were given.
    p.add_argument("--epochs", type=int, help=f"default {TrainConfig.epochs}")
    p.add_argument("--batch-size", type=int, help=f"default {TrainConfig.batch_size}")
    p.add_argument("--learning-rate", type=float, help=f"default {TrainConfig.learning_rate}; onecycle peaks at "
                   "ONECYCLE_PEAK_FACTOR (4) times this")
    p.add_argument("--recipe", choices=RECIPES, help="seed: the original's constant-rate Adam (default); "
                   "onecycle: NAdam, linear warm-up then linear decay of the learning rate, smoothed labels")
    p.add_argument("--seed", type=int, help="PRNG seed for initialisation and data order (default 0)")
    p.add_argument("--train-examples", type=int, metavar="N",
                   help="train on the first N examples only, for quick checks (default: all 60,000)")
    p.add_argument("--output-dir", default=None, help="where the checkpoint and its sidecar go (default artifacts)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (default: TFDS's, or $TFDS_DATA_DIR)")
    p.add_argument("--manual-dir", default=None,
                   help="folder with the four MNIST IDX files, for machines without internet "
                        "(default: $MNIST_FLAX_MANUAL_DIR)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save the resume state every N steps, at the end of the compiled call "
                        "(of 4 steps) that reaches them (0: only when interrupted)")
    p.add_argument("--resume", metavar="DIR_OR_FILE", help="continue an interrupted run from its resume state")
    p.add_argument("--devices", type=int, default=0, metavar="N",
                   help="split each batch over N devices (on CPU: N host devices sharing the cores); "
                        "default: 1 on CPU, all GPUs/TPUs otherwise")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (one process per host)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG report at the end")
    cli.add_debug_flag(p)
    return p


SETTINGS = ("seed", "epochs", "batch_size", "learning_rate", "recipe", "train_examples")


def parse_config(args: argparse.Namespace) -> TrainConfig:
    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    try:
        return TrainConfig(**given).validate()
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def check_args(args: argparse.Namespace) -> None:
    if args.devices < 0:
        raise cli.UsageError(f"--devices must be >= 0, got {args.devices}")
    if args.checkpoint_every < 0:
        raise cli.UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.resume:
        given = [f"--{n.replace('_', '-')}" for n in SETTINGS if getattr(args, n) is not None]
        if given:
            raise cli.UsageError(f"--resume continues the saved run with its own settings; drop {' '.join(given)}")


def prepare_output_dir(path: str | Path) -> Path:
    """Creates the output directory and proves it writable before any training time is spent."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"x" * 1_000_000)  # a checkpoint's size, with room: a full disk fails here
        probe.unlink()
    except OSError as e:
        raise MnistFlaxError(f"output directory {out} is not writable ({e.strerror}); "
                             "choose another with --output-dir or free some space") from None
    return out


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal = signum

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def start_or_resume(args):
    """(state, position, config, output_dir) for a fresh run or the one being resumed.

    Runs before MNIST is loaded, so a bad flag, resume file or output directory fails at once.
    """
    if args.resume:
        state, position, config = resume.load_resume_state(args.resume)
        output_dir = Path(args.output_dir) if args.output_dir else resume.resume_path(args.resume).parent
    else:
        config = parse_config(args)
        state = training.create_train_state(jax.random.split(jax.random.key(config.seed))[0], config)
        position, output_dir = loop.Position(), Path(args.output_dir or "artifacts")
    return state, position, config, prepare_output_dir(output_dir)


def learning_rates(config: TrainConfig) -> np.ndarray:
    """The learning rate of every step of the run."""
    steps = np.arange(config.epochs * config.steps_per_epoch())
    return np.asarray(jax.vmap(training.learning_rate_schedule(config))(steps))


def data_key(config: TrainConfig) -> jax.Array:
    return jax.random.split(jax.random.key(config.seed))[1]


def train(args, start: tuple, data, stop: "StopRequest") -> dict:
    state, position, config, output_dir = start
    if config.train_examples > len(data.train_images):
        raise cli.UsageError(f"--train-examples {config.train_examples} is more than the "
                             f"{len(data.train_images):,} training examples")
    if config.train_examples:
        data = data._replace(train_images=data.train_images[:config.train_examples],
                             train_labels=data.train_labels[:config.train_examples])
    default_count = 0 if jax.process_count() > 1 else DEFAULT_DEVICES.get(jax.default_backend(), 0)
    mesh = devices.make_mesh(args.devices or default_count)
    devices.check_batch_size(config.batch_size, mesh)
    state = devices.replicate(state, mesh)
    primary = jax.process_index() == 0  # on many hosts, one process writes the files
    steps_per_epoch = config.steps_per_epoch()
    rates = learning_rates(config)  # evaluated once: one JAX call per step would slow the loop
    log = metrics_log.MetricsLog(output_dir if primary else None, keep_until_step=int(state.step))
    print(f"training from step {int(state.step)} of {steps_per_epoch * config.epochs}", file=sys.stderr, flush=True)
    bar = tqdm(total=steps_per_epoch * config.epochs, initial=int(state.step), unit="step",
               disable=args.no_progress, dynamic_ncols=True)
    epoch_seconds, epoch_metrics, epoch_start = [], {}, [time.perf_counter()]

    def on_step(r: loop.StepReport):
        log.write(step=r.step, epoch=r.epoch, loss=r.loss, accuracy=r.accuracy,
                  learning_rate=float(rates[r.step - 1]), images_per_second=r.images_per_second)
        if r.step % PROGRESS_EVERY == 0 or r.batch == r.batches_per_epoch:
            live = r.position.epoch_metrics()
            bar.set_description(f"epoch {r.epoch + 1}/{config.epochs}")
            bar.set_postfix(loss=f"{live['loss']:.4f}", acc=f"{live['accuracy']:.4f}", refresh=False)
            bar.update(r.step - bar.n)

    def on_epoch_end(epoch, metrics):
        epoch_seconds.append(time.perf_counter() - epoch_start[0])
        epoch_metrics.update(metrics)
        epoch_start[0] = time.perf_counter()

    saved_at = [int(state.step)]

    def should_pause(state, position):
        # Called after each compiled call of training.STEPS_PER_CALL steps: save at the end of the
        # call that reaches each multiple of --checkpoint-every.
        step, every = int(state.step), args.checkpoint_every
        due = every and step // every > saved_at[0] // every
        if (stop.signal is not None or due) and primary:
            resume.save_resume_state(output_dir, state, position, config)
            saved_at[0] = step
        return stop.signal is not None

    try:
        state, position, finished = loop.run_epochs(
            state, data.train_images, data.train_labels, data_key(config), config.epochs, config.batch_size,
            position, on_step=on_step, on_epoch_end=on_epoch_end, should_pause=should_pause,
            shard_batch=devices.batch_sharder(mesh))
    except loop.NonFiniteLoss as e:
        if primary:
            resume.save_resume_state(output_dir, e.state, e.position, config)
        raise MnistFlaxError(f"{e} The last good state (before step {e.step}) is in "
                             f"{resume.resume_path(output_dir)}.") from None
    finally:
        bar.close()
        log.close()
    return {"state": state, "position": position, "finished": finished, "config": config, "mesh": mesh,
            "output_dir": output_dir, "stop_signal": stop.signal, "epoch_seconds": epoch_seconds,
            "train": epoch_metrics or position.epoch_metrics()}


def run_metadata(config: TrainConfig, result: dict, test: dict) -> dict:
    import flax
    import optax
    return {
        "test_accuracy": test["accuracy"],
        "train_accuracy": result["train"]["accuracy"],
        "train_loss": result["train"]["loss"],
        "per_class_test_accuracy": test["per_class_accuracy"],
        "confusion_matrix": test["confusion_matrix"],
        "params": count_params(result["state"].params),
        **dataclasses.asdict(config),
        "peak_learning_rate": float(learning_rates(config).max()),
        "epoch_seconds": [round(s, 3) for s in result["epoch_seconds"]],
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "python": sys.version.split()[0]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    # Signals become a flag from here on: interrupting the data loader's threads can crash
    # the interpreter, and a signal during training must let the current step finish.
    stop = StopRequest()
    stop.install()
    devices.configure_runtime(args.devices)
    devices.enable_compilation_cache()  # start-up 11 s -> under 5 s on the second run (docs/performance.md)
    if args.distributed:
        devices.initialize_distributed()
    start = start_or_resume(args)
    data = load_mnist(data_dir=args.data_dir, manual_dir=args.manual_dir)
    if stop.signal is not None:
        print("interrupted before training started; nothing to resume", file=sys.stderr)
        return EXIT_SIGNAL_BASE + stop.signal
    result = train(args, start, data, stop)
    config, output_dir = result["config"], result["output_dir"]
    if not result["finished"]:
        step = int(result["state"].step)
        print(f"\nstopped at step {step} by signal {result['stop_signal']}; the state is saved. Resume with:\n"
              f"  python -m mnist_flax.train --resume {output_dir}", file=sys.stderr)
        return EXIT_SIGNAL_BASE + (result["stop_signal"] or signal.SIGINT)

    variables = jax.device_get(training.model_variables(result["state"]))
    test = training.evaluate(variables, data.test_images, data.test_labels)
    metadata = run_metadata(config, result, test)
    if jax.process_index() != 0:
        return 0  # the primary process saves and reports
    path = checkpoint.save_checkpoint(output_dir, variables, metadata)
    resume.remove_resume_state(output_dir)  # the run is complete: nothing left to resume
    remove_stale_temporaries(output_dir)  # left by a writer killed mid-write in an earlier run
    print(format_parameter_table(variables["params"]))
    print(f"parameters:     {metadata['params']:,}")
    print(f"epoch time:     {', '.join(f'{s:.1f} s' for s in result['epoch_seconds'])}")
    print(f"train accuracy: {100 * metadata['train_accuracy']:.2f}% (running, last epoch)")
    print(f"test accuracy:  {100 * metadata['test_accuracy']:.2f}% ({test['correct']:,}/{test['count']:,})")
    print(f"checkpoint:     {path}")
    if not args.no_plots:  # after the summary, so a plotting failure cannot hide it
        from mnist_flax import report  # matplotlib is slow to import: only when used
        plots = report.write_plots(path, data=data)
        print(f"plots:          {', '.join(p.name for p in plots)}")
    return 0


def run() -> None:
    sys.exit(cli.run_main(main))


if __name__ == "__main__":
    run()
