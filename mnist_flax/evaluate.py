"""Command line: test-set accuracy of a saved checkpoint.

    python -m mnist_flax.evaluate CHECKPOINT_OR_DIR [--manual-dir DIR] [--data-dir DIR]

Given a directory (a training run's output, an unpacked CI artifact), its newest checkpoint is used.
"""

from collections.abc import Sequence

from mnist_flax import checkpoint, cli, sidecar


def evaluate_checkpoint(path: str, data_dir: str | None = None, manual_dir: str | None = None) -> dict:
    """{'accuracy', 'correct', 'count', ...} of the checkpoint on the MNIST test set (step.evaluate)."""
    variables, record = checkpoint.load_checkpoint(path)
    # JAX and TFDS load here, not with the module: `--help`, a bad flag and a file that is no
    # checkpoint at all answer at once.
    from mnist_flax import step
    from mnist_flax.data import load_mnist

    data = load_mnist(data_dir=data_dir, manual_dir=manual_dir)
    return step.evaluate(variables, data.test_images, data.test_labels, model=checkpoint.network_for(record))


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_DIR",
                   help="a .msgpack written by mnist_flax.train, or a directory (its newest one is used)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--manual-dir", default=None, help="folder with the four MNIST IDX files")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    path = checkpoint.find(args.checkpoint)
    metrics = evaluate_checkpoint(str(path), args.data_dir, args.manual_dir)
    record = sidecar.read(path) or {}
    print(f"checkpoint:    {path}")
    print(f"test accuracy: {100 * metrics['accuracy']:.2f}% ({metrics['correct']:,}/{metrics['count']:,})")
    if "test_accuracy" in record:
        print(f"sidecar says:  {100 * record['test_accuracy']:.2f}%")
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
