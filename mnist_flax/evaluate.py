"""Command line: test-set accuracy of a saved checkpoint.

    python -m mnist_flax.evaluate CHECKPOINT [--manual-dir DIR] [--data-dir DIR]
"""

import sys
from collections.abc import Sequence

from mnist_flax import checkpoint, cli, training
from mnist_flax.data import load_mnist


def evaluate_checkpoint(path: str, data_dir: str | None = None, manual_dir: str | None = None) -> dict:
    """{'accuracy', 'correct', 'count'} of the checkpoint on the MNIST test set."""
    variables, _ = checkpoint.load_checkpoint(path)
    data = load_mnist(data_dir=data_dir, manual_dir=manual_dir)
    return training.evaluate(variables, data.test_images, data.test_labels)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a .msgpack written by mnist_flax.train")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--manual-dir", default=None, help="folder with the four MNIST IDX files")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    metrics = evaluate_checkpoint(args.checkpoint, args.data_dir, args.manual_dir)
    sidecar = checkpoint.read_sidecar(args.checkpoint) or {}
    print(f"test accuracy: {100 * metrics['accuracy']:.2f}% ({metrics['correct']:,}/{metrics['count']:,})")
    if "test_accuracy" in sidecar:
        print(f"sidecar says:  {100 * sidecar['test_accuracy']:.2f}%")
    return 0


def run() -> None:
    sys.exit(cli.run_main(main))


if __name__ == "__main__":
    run()
