"""Training report: PNG plots and a Markdown summary of one finished run.

    python -m mnist_flax.report OUTPUT_DIR_OR_CHECKPOINT [--markdown] [--output-dir DIR]
                                [--data-dir DIR] [--manual-dir DIR]

Given a directory, the newest `mnist_flax_*.msgpack` in it is used. Without
`--markdown` the plots are (re)drawn beside the checkpoint and their paths
printed; with it, only the Markdown for a GitHub job summary is printed, which
needs the checkpoint and its sidecar but neither MNIST nor matplotlib.
The plots themselves are plots.py's.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnist_flax import checkpoint, cli, metrics_log, plots, sidecar
from mnist_flax.config import NUM_CLASSES
from mnist_flax.errors import CheckpointError
from mnist_flax.plots import CONFUSION_FILE, CURVES_FILE, MISCLASSIFIED_FILE, PER_CLASS_FILE, PLOT_FILES


# --------------------------------------------------------------------------- inputs

def load_run(path: Path) -> tuple[dict, dict]:
    """(variables, sidecar) of a checkpoint; the report needs the sidecar, most of it is drawn from there."""
    variables, record = checkpoint.load_checkpoint(path)
    if record is None:
        raise CheckpointError(f"{path}: no sidecar {sidecar.path_for(path).name} beside it; the report "
                              "needs the metadata the training run wrote there")
    return variables, record


def note(message: str) -> None:
    print(f"report: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- plots

def write_plots(checkpoint_path: str | Path, data=None, output_dir: str | Path | None = None,
                probabilities: np.ndarray | None = None, painter: plots.Painter | None = None) -> list[Path]:
    """Draws the report's PNGs for a checkpoint; returns the paths written.

    `data` is an `MnistArrays` (only its test split is used); without it MNIST is
    loaded with `load_mnist()`'s defaults. `probabilities` are the checkpoint's on that
    test split, when the caller has them already (training just evaluated it); else they
    are computed. Plots go beside the checkpoint unless `output_dir` is given. A run
    without metrics.jsonl gets no training curves. They are drawn by `painter`'s workers
    if given, else in this process.
    """
    path = Path(checkpoint_path)
    variables, record = load_run(path)
    out = Path(output_dir) if output_dir is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    painter = painter or plots.Painter(workers=0)

    if data is None:
        from mnist_flax.data import load_mnist
        data = load_mnist()
    if probabilities is None:
        from mnist_flax.step import predict_probabilities  # JAX: import only when drawing this
        probabilities = predict_probabilities(variables, data.test_images, model=checkpoint.network_for(record))
    if np.shape(probabilities) != (len(data.test_images), NUM_CLASSES):
        raise ValueError(f"probabilities of shape {np.shape(probabilities)} for {len(data.test_images)} test images")
    # The slowest first: with two workers, the confusion matrix takes one while the other draws the rest.
    if "confusion_matrix" in record:
        painter.draw(CONFUSION_FILE, out / CONFUSION_FILE, record)
    records = metrics_log.read_metrics(path.parent / metrics_log.METRICS_FILE)
    if records:
        check_metrics_match(records, record)
        painter.draw(CURVES_FILE, out / CURVES_FILE, records, record)
    else:
        note(f"no step records in {path.parent / metrics_log.METRICS_FILE}; skipping {CURVES_FILE}")
    if "per_class_test_accuracy" in record:
        painter.draw(PER_CLASS_FILE, out / PER_CLASS_FILE, record)
    mistakes = plots.misclassified(probabilities, data.test_images, data.test_labels)
    if mistakes:
        painter.draw(MISCLASSIFIED_FILE, out / MISCLASSIFIED_FILE, mistakes)
    else:
        note(f"every test image is classified correctly: no {MISCLASSIFIED_FILE}")
    return painter.finish()


def check_metrics_match(records: list[dict], record: dict) -> None:
    """Warns when metrics.jsonl cannot be this checkpoint's: a later run in the same directory rewrote it."""
    expected = record.get("num_batches_tracked")
    if not isinstance(expected, int):  # an imported checkpoint's sidecar: no run to compare with
        return
    last = max(r["step"] for r in records)
    if not expected - 1 <= last <= expected:  # one short: a torn last line, skipped by read_metrics
        note(f"metrics.jsonl ends at step {last} but this checkpoint trained {expected} steps; "
             "the curves may be another run's")


# --------------------------------------------------------------------------- Markdown

def percent(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def table(header: Sequence[str], rows: Sequence[Sequence], align: str = "") -> list[str]:
    """A Markdown table; `align` holds one of l/r per column (default: left)."""
    marks = {"l": ":--", "r": "--:"}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(marks[a] for a in (align or "l" * len(header))) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def markdown_summary(checkpoint_path: str | Path) -> str:
    """Markdown for a GitHub job summary, from the checkpoint, its sidecar and the plots beside it."""
    path = Path(checkpoint_path)
    variables, record = load_run(path)
    matrix = np.array(record["confusion_matrix"]) if "confusion_matrix" in record else None
    test = percent(record.get("test_accuracy"))
    if matrix is not None:
        test += f" ({int(np.trace(matrix)):,} / {int(matrix.sum()):,})"
    epoch_seconds = record.get("epoch_seconds") or []
    versions = record.get("versions", {})
    loss = record.get("train_loss")
    run = sidecar.run_config(record)

    lines = [f"## MNIST Flax: {percent(record.get('test_accuracy'))} test accuracy", "",
             f"Checkpoint `{path.name}`", ""]
    lines += table(["run", ""], [
        ["test accuracy", f"**{test}**"],
        ["train accuracy", f"{percent(record.get('train_accuracy'))} (running, last epoch)"],
        ["train loss", "n/a" if loss is None else f"{loss:.4f}"],
        ["parameters", f"{record['params']:,}" if "params" in record else "n/a"],
        ["epoch time", ", ".join(f"{s:.1f} s" for s in epoch_seconds) or "n/a"],
        ["recipe", run.get("recipe", "n/a")],
        ["seed", run.get("seed", "n/a")],
        ["epochs", run.get("epochs", "n/a")],
        ["batch size", run.get("batch_size", "n/a")],
        ["learning rate", f"{run.get('learning_rate', 'n/a')}" + (f" ({run['schedule']})" if "schedule" in run else "")],
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "n/a"],
        ["created", record.get("created", "n/a")],
        ["sha256", f"`{record['sha256']}`" if "sha256" in record else "n/a"],
    ])

    from mnist_flax.model import parameter_table  # flax: imported when a report is made, not for --help

    params = parameter_table(variables["params"])
    rows = [[name, "×".join(map(str, shape)), f"{count:,}"] for name, shape, count in params]
    rows.append(["**total**", "", f"**{sum(count for _, _, count in params):,}**"])
    # Collapsed: 21 rows would push the per-digit table off the first screen.
    lines += ["", "<details><summary>Parameters, layer by layer</summary>", ""]
    lines += table(["layer/param", "shape", "count"], rows, "llr")
    lines += ["", "</details>"]

    if "per_class_test_accuracy" in record:
        lines += ["", "### Test accuracy per digit", ""]
        rows = []
        for digit, accuracy in enumerate(record["per_class_test_accuracy"]):
            row = [digit, percent(accuracy)]
            if matrix is not None:
                errors = matrix[digit].copy()
                errors[digit] = 0
                confused = int(errors.argmax())
                row += [f"{int(matrix[digit].sum()):,}", f"{int(errors.sum()):,}",
                        f"{confused} ({errors[confused]})" if errors.any() else "–"]
            rows.append(row)
        header = ["digit", "accuracy"] + (["test images", "wrong", "most often taken for"] if matrix is not None
                                          else [])
        lines += table(header, rows, "r" * len(header))

    present = [name for name in PLOT_FILES if (path.parent / name).is_file()]
    lines += ["", "### Plots", ""]
    if present:
        lines.append("In the uploaded artifact, beside the checkpoint:")
        lines += [""] + [f"- `{name}`: {PLOT_FILES[name]}" for name in present]
    else:
        lines.append(f"None beside the checkpoint; draw them with `python -m mnist_flax.report {path.parent}`.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m mnist_flax.report", description=__doc__.splitlines()[0])
    p.add_argument("path", metavar="OUTPUT_DIR_OR_CHECKPOINT",
                   help="a training output directory (its newest checkpoint is used) or a .msgpack")
    p.add_argument("--markdown", action="store_true",
                   help="print the Markdown summary only (no plots, no MNIST needed)")
    p.add_argument("--output-dir", default=None, help="where the PNGs go (default: beside the checkpoint)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (for misclassified.png)")
    p.add_argument("--manual-dir", default=None, help="folder with the four MNIST IDX files "
                   "(default: $MNIST_FLAX_MANUAL_DIR)")
    cli.add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = checkpoint.find(args.path)
    if args.markdown:
        sys.stdout.write(markdown_summary(path))
        return 0
    load_run(path)  # fail on a bad checkpoint before MNIST is loaded
    from mnist_flax.data import load_mnist
    data = load_mnist(data_dir=args.data_dir, manual_dir=args.manual_dir)
    # The plot workers import matplotlib while the model runs on the test set, then draw side by
    # side, as after training (train.py).
    with plots.Painter() as painter:
        for written in write_plots(path, data=data, output_dir=args.output_dir, painter=painter):
            print(written)
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
