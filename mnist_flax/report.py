"""Training report: PNG plots and a Markdown summary of one finished run.

    python -m mnist_flax.report OUTPUT_DIR_OR_CHECKPOINT [--markdown] [--output-dir DIR]
                                [--data-dir DIR] [--manual-dir DIR]

Given a directory, the newest `mnist_flax_*.msgpack` in it is used. Without
`--markdown` the plots are (re)drawn beside the checkpoint and their paths
printed; with it, only the Markdown for a GitHub job summary is printed, which
needs the checkpoint and its sidecar but neither MNIST nor matplotlib.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas, never
through pyplot: pyplot would pick (or switch) a global, possibly interactive,
backend and keep every figure alive until closed, which a library called at the
end of a training run should not do. Agg needs no display.
"""

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnist_flax import checkpoint, cli, metrics_log, sidecar
from mnist_flax.atomic import atomic_write_bytes
from mnist_flax.config import NUM_CLASSES, NUM_TRAIN_EXAMPLES, num_batches
from mnist_flax.errors import CheckpointError
from mnist_flax.model import parameter_table

CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
MISCLASSIFIED_FILE = "misclassified.png"
PER_CLASS_FILE = "per_class_accuracy.png"
PLOT_FILES = {  # file name -> what it shows, in the order the summary lists them
    CURVES_FILE: "loss and batch accuracy per step, raw and smoothed",
    PER_CLASS_FILE: "test accuracy per digit",
    CONFUSION_FILE: "test-set confusion matrix (rows true, columns predicted)",
    MISCLASSIFIED_FILE: "the test digits the model got wrong most confidently",
}
DPI = 120
MISCLASSIFIED_GRID = (4, 6)  # rows, columns


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

def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return atomic_write_bytes(path, buffer.getvalue())


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Exponential moving average with TensorBoard's bias correction, so the start isn't pulled to 0."""
    decay = 1 - 1 / window
    out, average = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        average = decay * average + (1 - decay) * v
        out[i] = average / (1 - decay ** (i + 1))
    return out


def plot_training_curves(records: list[dict], record: dict, path: Path) -> Path:
    records = sorted(records, key=lambda r: r["step"])
    steps = np.array([r["step"] for r in records])
    epochs = np.array([r.get("epoch", 0) for r in records])
    window = int(np.clip(len(steps) // 20, 1, 100))  # ~5% of the run: visible trend, little lag
    fig = new_figure(9, 6.5)
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    for ax, key, colour, label in ((loss_ax, "loss", "tab:blue", "loss (cross-entropy)"),
                                   (acc_ax, "accuracy", "tab:green", "batch accuracy")):
        values = np.array([r.get(key, np.nan) for r in records], float)
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.7, label="per batch")
        ax.plot(steps, smooth(values, window), color=colour, linewidth=2.2, label=f"EMA over ~{window} steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if key == "loss" else "lower right", fontsize=9)
    # Loss falls by ~50x in one epoch: a log axis shows the late progress a linear one flattens.
    loss_ax.set_yscale("log")
    acc_ax.yaxis.set_major_formatter(lambda y, _: f"{100 * y:.0f}%")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_xlabel("training step")
    acc_ax.set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
    starts = steps[1:][np.diff(epochs) != 0]  # first step of each later epoch
    for step, epoch in zip(starts, epochs[1:][np.diff(epochs) != 0]):
        for ax in (loss_ax, acc_ax):
            ax.axvline(step - 0.5, color="0.4", linestyle="--", linewidth=0.9)
        loss_ax.annotate(f"epoch {epoch + 1}", (step - 0.5, 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -3), textcoords="offset points", va="top", fontsize=8, color="0.3")
    fig.suptitle(f"Training: {run_description(record)}", fontsize=11)
    return save_figure(fig, path)


def plot_confusion_matrix(record: dict, path: Path) -> Path:
    from matplotlib.colors import LogNorm
    matrix = np.array(record["confusion_matrix"], dtype=np.int64)
    fig = new_figure(7, 6)
    ax = fig.subplots()
    # The diagonal holds ~1,000 per digit, mistakes a handful: on a linear scale every
    # mistake would be the same white. A log scale (zeros left blank) shows them.
    norm = LogNorm(vmin=1, vmax=max(int(matrix.max()), 10))
    image = ax.imshow(np.ma.masked_equal(matrix, 0), cmap="Blues", norm=norm)
    fig.colorbar(image, ax=ax, label="test images (log scale)", shrink=0.85)
    for (true, pred), count in np.ndenumerate(matrix):
        dark = count > 0 and norm(count) > 0.6
        ax.text(pred, true, f"{count}" if count else "·", ha="center", va="center",
                fontsize=9, color="white" if dark else ("0.6" if count == 0 else "black"),
                fontweight="bold" if true != pred and count else "normal")
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_yticks(range(NUM_CLASSES))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    total, correct = int(matrix.sum()), int(np.trace(matrix))
    ax.set_title(f"Confusion matrix, test set: {correct:,} of {total:,} right, {total - correct:,} wrong",
                 fontsize=11, pad=12)
    return save_figure(fig, path)


def plot_per_class_accuracy(record: dict, path: Path) -> Path:
    accuracy = 100 * np.array(record["per_class_test_accuracy"], float)
    overall = 100 * float(record["test_accuracy"])
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    bars = ax.bar(range(NUM_CLASSES), accuracy, color="tab:blue", width=0.7)
    ax.bar_label(bars, [f"{a:.1f}" for a in accuracy], padding=2, fontsize=9)
    ax.axhline(overall, color="tab:red", linestyle="--", linewidth=1, label=f"all digits: {overall:.2f}%")
    # Every digit is near 100%: bars from 0 would all look equal, so the axis starts
    # a little below the worst digit, and the label says so.
    floor = max(0.0, np.floor(min(accuracy.min(), overall) - 1))
    ax.set_ylim(floor, 100.9)  # room above 100 for the bars' labels; no tick there
    ax.set_yticks([t for t in ax.get_yticks() if floor <= t <= 100])
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_xlabel("digit")
    ax.set_ylabel(f"test accuracy (%); axis starts at {floor:g}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)  # the worst digit's bar is often the last one
    ax.set_title("Test accuracy per digit", fontsize=11)
    return save_figure(fig, path)


def plot_misclassified(probabilities: np.ndarray, images: np.ndarray, labels: np.ndarray, path: Path) -> Path | None:
    """The most confident mistakes as one image grid: one axes, not one per digit, which is ~5x faster."""
    predicted = probabilities.argmax(-1)
    wrong = np.flatnonzero(predicted != labels)
    if len(wrong) == 0:
        note(f"every test image is classified correctly: no {path.name}")
        return None
    confidence = probabilities[wrong, predicted[wrong]]
    rows, cols = MISCLASSIFIED_GRID
    shown = wrong[np.argsort(-confidence, kind="stable")][: rows * cols]
    cols = min(cols, len(shown))  # a handful of mistakes: no empty columns
    rows = -(-len(shown) // cols)
    side, gap, title = images.shape[1], 4, 9  # pixels: digit, gap between digits, room for the caption
    cell_w, cell_h = side + gap, side + gap + title
    grid = np.full((rows * cell_h, cols * cell_w), np.nan)  # NaN: background
    fig = new_figure(1.45 * cols, 1.65 * rows + 0.5)
    ax = fig.subplots()
    ax.axis("off")
    for k, i in enumerate(shown):
        top, left = (k // cols) * cell_h + title, (k % cols) * cell_w
        grid[top:top + side, left:left + side] = images[i, :, :, 0]
        ax.text(left + side / 2, top - 1, f"true {labels[i]} / pred {predicted[i]} ({probabilities[i, predicted[i]]:.2f})",
                ha="center", va="bottom", fontsize=8)
    ax.imshow(np.ma.masked_invalid(grid), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    fig.suptitle(f"Most confident mistakes: {len(shown)} of {len(wrong):,} misclassified test images",
                 fontsize=11)
    return save_figure(fig, path)


def write_plots(checkpoint_path: str | Path, data=None, output_dir: str | Path | None = None,
                probabilities: np.ndarray | None = None) -> list[Path]:
    """Draws the report's PNGs for a checkpoint; returns the paths written.

    `data` is an `MnistArrays` (only its test split is used); without it MNIST is
    loaded with `load_mnist()`'s defaults. `probabilities` are the checkpoint's on that
    test split, when the caller has them already (training just evaluated it); else they
    are computed. Plots go beside the checkpoint unless `output_dir` is given. A run
    without metrics.jsonl gets no training curves.
    """
    path = Path(checkpoint_path)
    variables, record = load_run(path)
    out = Path(output_dir) if output_dir is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    written = []

    records = metrics_log.read_metrics(path.parent / metrics_log.METRICS_FILE)
    if records:
        check_metrics_match(records, record)
        written.append(plot_training_curves(records, record, out / CURVES_FILE))
    else:
        note(f"no step records in {path.parent / metrics_log.METRICS_FILE}; skipping {CURVES_FILE}")
    if "per_class_test_accuracy" in record:
        written.append(plot_per_class_accuracy(record, out / PER_CLASS_FILE))
    if "confusion_matrix" in record:
        written.append(plot_confusion_matrix(record, out / CONFUSION_FILE))
    if data is None:
        from mnist_flax.data import load_mnist
        data = load_mnist()
    if probabilities is None:
        from mnist_flax.step import predict_probabilities  # JAX: import only when drawing this
        probabilities = predict_probabilities(variables, data.test_images)
    if np.shape(probabilities) != (len(data.test_images), NUM_CLASSES):
        raise ValueError(f"probabilities of shape {np.shape(probabilities)} for {len(data.test_images)} test images")
    drawn = plot_misclassified(probabilities, data.test_images, data.test_labels, out / MISCLASSIFIED_FILE)
    written += [drawn] if drawn else []
    return written


def check_metrics_match(records: list[dict], record: dict) -> None:
    """Warns when metrics.jsonl cannot be this checkpoint's: a later run in the same directory rewrote it."""
    expected = record.get("num_batches_tracked")
    if not isinstance(expected, int):
        run = sidecar.run_config(record)
        try:
            expected = run["epochs"] * num_batches(run.get("train_examples") or NUM_TRAIN_EXAMPLES, run["batch_size"])
        except (KeyError, TypeError):
            return
    last = max(r["step"] for r in records)
    if not expected - 1 <= last <= expected:  # one short: a torn last line, skipped by read_metrics
        note(f"metrics.jsonl ends at step {last} but this checkpoint trained {expected} steps; "
             "the curves may be another run's")


# --------------------------------------------------------------------------- Markdown

def percent(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def run_description(record: dict) -> str:
    run = sidecar.run_config(record)
    parts = [f"recipe {run.get('recipe', '?')}", f"seed {run.get('seed', '?')}",
             f"epochs {run.get('epochs', '?')}", f"batch {run.get('batch_size', '?')}",
             f"lr {run.get('learning_rate', '?')}"]
    if run.get("schedule", "constant") != "constant":
        parts[-1] += f" ({run['schedule']})"
    return ", ".join(parts)


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
    for written in write_plots(path, data=data, output_dir=args.output_dir):
        print(written)
    return 0


def run() -> None:
    sys.exit(cli.run_main(main))


if __name__ == "__main__":
    run()
