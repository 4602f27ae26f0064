"""The report's four plots, and worker processes that draw them while the caller goes on.

Each plot is a function of plain data (the sidecar's record, the metrics records, a few
images) to a PNG, written atomically. This module imports neither JAX nor anything that
does, so that a worker (this module run by `Painter`) is ready in a
fraction of a second, and draws while the training process evaluates and saves.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas, never
through pyplot: pyplot would pick (or switch) a global, possibly interactive,
backend and keep every figure alive until closed, which a library called at the
end of a training run should not do. Agg needs no display.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mnist_flax import sidecar
from mnist_flax.atomic import atomic_write_bytes
from mnist_flax.config import NUM_CLASSES
from mnist_flax.errors import MnistFlaxError

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
    # Loss falls by orders of magnitude in one epoch: a log axis shows the late progress a linear one flattens.
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



def misclassified(probabilities: np.ndarray, images: np.ndarray, labels: np.ndarray) -> dict | None:
    """The most confident mistakes, as plain data for plot_misclassified; None when there are none."""
    predicted = probabilities.argmax(-1)
    wrong = np.flatnonzero(predicted != labels)
    if len(wrong) == 0:
        return None
    confidence = probabilities[wrong, predicted[wrong]]
    rows, cols = MISCLASSIFIED_GRID
    shown = wrong[np.argsort(-confidence, kind="stable")][: rows * cols]
    return {"wrong": len(wrong), "images": images[shown, :, :, 0].tolist(),
            "captions": [f"true {labels[i]} / pred {predicted[i]} ({probabilities[i, predicted[i]]:.2f})" for i in shown]}


def plot_misclassified(selection: dict, path: Path) -> Path:
    """misclassified()'s images as one grid: one axes, not one per digit, which draws far faster."""
    images = np.asarray(selection["images"], np.uint8)
    cols = min(MISCLASSIFIED_GRID[1], len(images))  # a handful of mistakes: no empty columns
    rows = -(-len(images) // cols)
    side, gap, title = images.shape[1], 4, 9  # pixels: digit, gap between digits, room for the caption
    cell_w, cell_h = side + gap, side + gap + title
    grid = np.full((rows * cell_h, cols * cell_w), np.nan)  # NaN: background
    fig = new_figure(1.45 * cols, 1.65 * rows + 0.5)
    ax = fig.subplots()
    ax.axis("off")
    for k, (image, caption) in enumerate(zip(images, selection["captions"])):
        top, left = (k // cols) * cell_h + title, (k % cols) * cell_w
        grid[top:top + side, left:left + side] = image
        ax.text(left + side / 2, top - 1, caption, ha="center", va="bottom", fontsize=8)
    ax.imshow(np.ma.masked_invalid(grid), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    fig.suptitle(f"Most confident mistakes: {len(images)} of {selection['wrong']:,} misclassified test images",
                 fontsize=11)
    return save_figure(fig, path)


def run_description(record: dict) -> str:
    run = sidecar.run_config(record)
    parts = [f"recipe {run.get('recipe', '?')}", f"seed {run.get('seed', '?')}",
             f"epochs {run.get('epochs', '?')}", f"batch {run.get('batch_size', '?')}",
             f"lr {run.get('learning_rate', '?')}"]
    if run.get("schedule", "constant") != "constant":
        parts[-1] += f" ({run['schedule']})"
    return ", ".join(parts)


# --------------------------------------------------------------------------- workers

PLOTS = {CURVES_FILE: plot_training_curves, PER_CLASS_FILE: plot_per_class_accuracy,
         CONFUSION_FILE: plot_confusion_matrix, MISCLASSIFIED_FILE: plot_misclassified}
WORKERS = 2  # the confusion matrix, the slowest plot, takes one while the other draws the rest
WORKER_EXIT_S = 30
# A worker's command. From its first line it ignores Ctrl-C, which a terminal sends to the whole
# process group (the training process decides what it means), and runs at the lowest priority,
# so that its start-up and warm-up take only the CPU that training leaves idle (its single-threaded
# moments) instead of slowing training by as much as the workers save at its end. (It stays in
# the trainer's session: with Linux's autogroups, a new session would be scheduled as an equal.)
WORKER = ("import os, runpy, signal; signal.signal(signal.SIGINT, signal.SIG_IGN); os.nice(19); "
          "runpy.run_module('mnist_flax.plots', run_name='__main__')")


class Painter:
    """Draws plots in worker processes: `draw` returns at once, `finish` waits for the files.

    Started before the plots are due (the train command starts it before training), so that
    each worker has imported matplotlib and loaded its fonts by then. A job is one JSON line
    to a worker's stdin, and one back from its stdout naming the file written or the error.
    The workers ignore Ctrl-C (see WORKER) and exit when their stdin closes, which it does
    when this process exits or dies. With `workers=0` nothing starts and `draw` draws here.
    """

    def __init__(self, workers: int = WORKERS):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # the package these workers belong to
            [str(Path(__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.procs = [subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env) for _ in range(workers)]
        self.jobs: list[tuple[str, subprocess.Popen | None, Path | None]] = []

    def draw(self, name: str, path: str | Path, *args) -> None:
        """Plot `name` (a key of PLOTS) of `args` (plain JSON data) into `path`."""
        if not self.procs:
            self.jobs.append((name, None, PLOTS[name](*args, Path(path))))
            return
        proc = self.procs[len(self.jobs) % len(self.procs)]
        try:
            proc.stdin.write(json.dumps({"plot": name, "path": str(path), "args": args}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:  # the worker is gone: finish() reports it, with the plot's name
            pass
        self.jobs.append((name, proc, None))

    def finish(self) -> list[Path]:
        """The files written, in the order drawn; MnistFlaxError if a plot failed."""
        written, failed = [], []
        for name, proc, path in self.jobs:
            if proc is not None:
                line = proc.stdout.readline()
                reply = json.loads(line) if line else {"error": f"its worker exited ({proc.poll()})"}
                if "error" in reply:
                    failed.append(f"{name}: {reply['error']}")
                    continue
                path = Path(reply["path"])
            written.append(path)
        self.jobs = []
        if failed:
            raise MnistFlaxError("drawing the plots failed: " + "; ".join(failed))
        return written

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()
            except BrokenPipeError:  # it died with a job unread
                pass
        for proc in self.procs:
            try:
                proc.wait(WORKER_EXIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()

    def __enter__(self) -> "Painter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def warm_up() -> None:
    """Loads what a first figure loads (matplotlib's modules, the font), before any job arrives."""
    fig = new_figure(1, 1)
    fig.text(0.2, 0.5, "0", fontsize=9)
    fig.text(0.6, 0.5, "0", fontsize=9, fontweight="bold")
    fig.savefig(io.BytesIO(), format="png", dpi=DPI)


def serve(lines, out) -> None:
    """The worker's loop: each JSON job line in `lines` drawn, one JSON reply line to `out`."""
    for line in lines:
        job = json.loads(line)
        try:
            reply = {"path": str(PLOTS[job["plot"]](*job["args"], Path(job["path"])))}
        except Exception as e:  # reported to the training process, which raises it there
            reply = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}  # one line
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    warm_up()
    serve(sys.stdin, sys.stdout)
    os._exit(0)  # stdin closed, every reply flushed, every file written: skip the interpreter's teardown
