"""Command line: train the network on MNIST, evaluate it, save a checkpoint and its plots.

    python -m mnist_flax.train [--recipe original|onecycle] [--seed 0] [--epochs 1] [...any setting]
                               [--output-dir artifacts] [--manual-dir DIR]
                               [--checkpoint-every N] [--resume DIR_OR_FILE]

Every field of config.Config is a flag. Ctrl-C (SIGINT) or SIGTERM finishes the current
compiled call (a few steps), saves a resume state in the output directory and exits
non-zero; `--resume` continues exactly where it stopped, with the saved settings. The
training itself is training.py's `train_and_evaluate`.
"""

import argparse
import dataclasses
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnist_flax import cli
from mnist_flax import config as config_lib
from mnist_flax.config import Config

EXIT_SIGNAL_BASE = 128  # shell convention: killed by signal N exits 128 + N
DEFAULT_OUTPUT_DIR = "artifacts"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m mnist_flax.train", description=__doc__.splitlines()[0])
    settings = p.add_argument_group("settings (config.Config; default: the recipe's)")
    for f in dataclasses.fields(Config):
        choices = tuple(config_lib.RECIPES) if f.name == "recipe" else f.metadata["choices"]
        default = getattr(Config, f.name)
        # Default None, so that --resume can tell which were given.
        settings.add_argument(_flag(f.name), type=f.type, choices=choices, default=None,
                              metavar=None if choices else f.name.upper(),
                              help=f"{f.metadata['help']} (" + ("default" if f.name == "recipe" else "original recipe:") + f" {default})")
    p.add_argument("--output-dir", default=None, help=f"where the checkpoint and its sidecar go "
                   f"(default {DEFAULT_OUTPUT_DIR}; with --resume, the resume state's directory)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (default: TFDS's, or $TFDS_DATA_DIR)")
    p.add_argument("--manual-dir", default=None,
                   help="folder with the four MNIST IDX files, for machines without internet "
                        "(default: $MNIST_FLAX_MANUAL_DIR)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save the resume state every N steps, at the end of the compiled call "
                        "that reaches them (0: only when interrupted)")
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


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    given = given_settings(args)
    try:
        return config_lib.resolve(given.pop("recipe", "original"), **given)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def check_args(args: argparse.Namespace) -> None:
    if args.devices < 0:
        raise cli.UsageError(f"--devices must be >= 0, got {args.devices}")
    if args.checkpoint_every < 0:
        raise cli.UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.resume and given_settings(args):
        flags = " ".join(_flag(name) for name in given_settings(args))
        raise cli.UsageError(f"--resume continues the saved run with its own settings; drop {flags}")


def resume_hint(output_dir: Path) -> str:
    """The resume command in a form that works from any shell, inside a virtualenv or not."""
    return f"{shlex.quote(sys.executable)} -m mnist_flax.train --resume {shlex.quote(str(output_dir))}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    config = None if args.resume else config_from_args(args)  # a bad setting fails before the imports
    # Imported only now: JAX, TFDS and the training code take about a second to import, which
    # --help and a bad flag need not wait for.
    import jax

    from mnist_flax import parallel, plots, resume, runtime, training
    from mnist_flax.data import load_mnist

    # Signals become a flag from here on: interrupting the data loader's threads can crash
    # the interpreter, and a signal during training must let the current call finish.
    stop = training.StopRequest().install()
    parallel.configure(args.devices)
    runtime.enable_compilation_cache()
    if args.distributed:
        parallel.initialize_distributed()
    # The resume state and the output directory are checked before MNIST is loaded, so that
    # a bad flag or file fails at once.
    if args.resume:
        state, position, config = resume.load_resume_state(args.resume)
        resumed = (state, position)
        workdir = Path(args.output_dir) if args.output_dir else resume.resume_path(args.resume).parent
    else:
        resumed, workdir = None, Path(args.output_dir or DEFAULT_OUTPUT_DIR)
    training.check_output_dir(workdir)
    data = load_mnist(data_dir=args.data_dir, manual_dir=args.manual_dir, progress=not args.no_progress)
    if stop.signal is not None:
        print("interrupted before training started; nothing to resume", file=sys.stderr)
        return EXIT_SIGNAL_BASE + stop.signal
    options = training.RunOptions(devices=args.devices, checkpoint_every=args.checkpoint_every,
                                  progress=not args.no_progress, plots=not args.no_plots)
    # Plot workers start now, so that they have imported matplotlib when training ends; only
    # the process that writes the files needs them.
    workers = plots.WORKERS if options.plots and jax.process_index() == 0 else 0
    with plots.Painter(workers) as painter:
        result = training.train_and_evaluate(config, workdir, data, resumed=resumed, options=options, stop=stop,
                                             painter=painter)
    if not result.finished:
        print(f"\nstopped at step {int(result.state.step)} by signal {stop.signal}; the state is saved. "
              f"Resume with:\n  {resume_hint(workdir)}", file=sys.stderr)
        return EXIT_SIGNAL_BASE + (stop.signal or signal.SIGINT)
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
