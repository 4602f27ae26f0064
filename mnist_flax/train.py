"""Command line: train SeedNet on MNIST and save a checkpoint.

    python -m mnist_flax.train [--epochs 1] [--batch-size 128] [--learning-rate 0.01]
                               [--seed 0] [--output-dir artifacts] [--manual-dir DIR]
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
from tqdm import tqdm

from mnist_flax import checkpoint, cli, training
from mnist_flax.config import TrainConfig
from mnist_flax.data import load_mnist
from mnist_flax.errors import MnistFlaxError
from mnist_flax.model import count_params, format_parameter_table

PROGRESS_EVERY = 10  # steps between progress-bar refreshes; each one waits for the device


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m mnist_flax.train", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--seed", type=int, default=defaults.seed, help="PRNG seed for init and data order")
    p.add_argument("--output-dir", default="artifacts", help="where the checkpoint and its sidecar go")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (default: TFDS's, or $TFDS_DATA_DIR)")
    p.add_argument("--manual-dir", default=None,
                   help="folder with the four MNIST IDX files, for machines without internet "
                        "(default: $MNIST_FLAX_MANUAL_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    cli.add_debug_flag(p)
    return p


def parse_config(args: argparse.Namespace) -> TrainConfig:
    try:
        return TrainConfig(seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                           learning_rate=args.learning_rate).validate()
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def prepare_output_dir(path: str) -> Path:
    """Creates the output directory and proves it writable before any training time is spent."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise MnistFlaxError(f"output directory {out} is not writable ({e.strerror}); "
                                 "choose another with --output-dir") from None
    return out


def train_and_evaluate(config: TrainConfig, data, show_progress: bool = True) -> dict:
    """Trains for config.epochs and returns the final state, metrics and timings."""
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    state = training.create_train_state(init_key, config)
    steps_per_epoch = -(-len(data.train_images) // config.batch_size)
    epoch_seconds = []
    for epoch in range(config.epochs):
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                   disable=not show_progress, dynamic_ncols=True)

        def on_step(i, totals):
            if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == steps_per_epoch:
                live = training.summarize(totals)
                bar.set_postfix(loss=f"{live['loss']:.4f}", acc=f"{live['accuracy']:.4f}", refresh=False)
                bar.update(i + 1 - bar.n)

        start = time.perf_counter()
        state, train_metrics = training.train_epoch(state, data.train_images, data.train_labels,
                                                    data_key, epoch, config.batch_size, on_step=on_step)
        jax.block_until_ready(state)
        epoch_seconds.append(time.perf_counter() - start)
        bar.close()
    variables = training.model_variables(state)
    test_metrics = training.evaluate(variables, data.test_images, data.test_labels)
    return {"state": state, "variables": variables, "train": train_metrics, "test": test_metrics,
            "epoch_seconds": epoch_seconds}


def run_metadata(config: TrainConfig, result: dict) -> dict:
    import flax
    import optax
    return {
        "test_accuracy": result["test"]["accuracy"],
        "train_accuracy": result["train"]["accuracy"],
        "train_loss": result["train"]["loss"],
        "params": count_params(result["variables"]["params"]),
        "seed": config.seed, "epochs": config.epochs, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "epoch_seconds": [round(s, 3) for s in result["epoch_seconds"]],
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "python": sys.version.split()[0]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = parse_config(args)
    output_dir = prepare_output_dir(args.output_dir)
    data = load_mnist(data_dir=args.data_dir, manual_dir=args.manual_dir)
    result = train_and_evaluate(config, data, show_progress=not args.no_progress)
    metadata = run_metadata(config, result)
    path = checkpoint.save_checkpoint(output_dir, result["variables"], metadata)
    print(format_parameter_table(result["variables"]["params"]))
    print(f"parameters:     {metadata['params']:,}")
    print(f"epoch time:     {', '.join(f'{s:.1f} s' for s in result['epoch_seconds'])}")
    print(f"train accuracy: {100 * metadata['train_accuracy']:.2f}% (running, last epoch)")
    print(f"test accuracy:  {100 * metadata['test_accuracy']:.2f}% "
          f"({result['test']['correct']:,}/{result['test']['count']:,})")
    print(f"checkpoint:     {path}")
    return 0


def run() -> None:
    sys.exit(cli.run_main(main))


if __name__ == "__main__":
    run()
