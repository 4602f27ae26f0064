"""Command line: this run's model beside a baseline's, as Markdown, failing on a regression.

    python -m mnist_flax.compare RUN_DIR BASELINE_DIR [--max-drop 0.5] [--baseline-name TEXT]
    python -m mnist_flax.compare RUN_DIR --no-baseline REASON [--baseline-name TEXT]

Prints the test accuracy, the accuracy of each digit and the parameter count of both
models with the differences, read from their sidecars (the checkpoints' sha256 must match).
Exits 1 when the test accuracy fell by more than `--max-drop` percentage points. With no
baseline (a first run, an offline one), it says so and exits 0. CI appends the output to
the job summary (.github/workflows/ci.yml).
"""

import sys
from collections.abc import Sequence
from pathlib import Path

from mnist_flax import checkpoint, cli, sidecar
from mnist_flax.errors import MnistFlaxError

# Percentage points of test accuracy a change may cost before CI fails. CI trains with the
# same seed every time, so this only has to cover what a change of rounding alone does to that
# run: 0.25 points was the largest seen (docs/recipes.md), and seeds differ by about 0.2.
MAX_DROP = 0.5


def run_record(directory: str | Path) -> tuple[Path, dict]:
    """The newest checkpoint in `directory` and its sidecar, verified against the file."""
    path = checkpoint.find(directory)
    record = sidecar.read(path)
    sidecar.verify(path, checkpoint.read_checkpoint_bytes(path), record, required=True)
    if not isinstance(record.get("test_accuracy"), (int, float)):
        raise MnistFlaxError(f"{sidecar.path_for(path)}: no test_accuracy to compare")
    return path, record


def _points(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _change(new, old) -> str:
    if new is None or old is None:
        return "n/a"
    return f"{100 * (new - old):+.2f} pp"


def heading(baseline_name: str) -> str:
    return f"### Against {baseline_name}"


def markdown(current: dict, baseline: dict, baseline_name: str, baseline_file: str) -> str:
    lines = [heading(baseline_name), "", f"Baseline: `{baseline_file}`", "",
             "| | this run | baseline | change |", "|:--|--:|--:|--:|",
             f"| **test accuracy** | {_points(current['test_accuracy'])} | {_points(baseline['test_accuracy'])} | "
             f"**{_change(current['test_accuracy'], baseline['test_accuracy'])}** |"]
    new_digits, old_digits = current.get("per_class_test_accuracy"), baseline.get("per_class_test_accuracy")
    if isinstance(new_digits, list) and isinstance(old_digits, list) and len(new_digits) == len(old_digits):
        for digit, (new, old) in enumerate(zip(new_digits, old_digits)):
            lines.append(f"| digit {digit} | {_points(new)} | {_points(old)} | {_change(new, old)} |")
    new_params, old_params = current.get("params"), baseline.get("params")
    if isinstance(new_params, int) and isinstance(old_params, int):
        lines.append(f"| parameters | {new_params:,} | {old_params:,} | {new_params - old_params:+,} |")
    return "\n".join(lines) + "\n"


def regression(current: dict, baseline: dict, max_drop: float) -> str | None:
    drop = 100 * (baseline["test_accuracy"] - current["test_accuracy"])
    if drop > max_drop:
        return (f"test accuracy fell by {drop:.2f} percentage points against the baseline "
                f"({_points(baseline['test_accuracy'])} -> {_points(current['test_accuracy'])}), "
                f"more than --max-drop {max_drop:g}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.compare", description=__doc__.splitlines()[0])
    p.add_argument("run", metavar="RUN_DIR", help="the run's output directory (or checkpoint)")
    p.add_argument("baseline", metavar="BASELINE_DIR", nargs="?", help="the baseline's directory (or checkpoint)")
    p.add_argument("--no-baseline", metavar="REASON", help="there is no baseline; say why in the summary")
    p.add_argument("--baseline-name", metavar="TEXT",
                   help="what the baseline is, for the heading (default: its directory; CI: the default branch's model)")
    p.add_argument("--max-drop", type=float, default=MAX_DROP,
                   help="fail when test accuracy falls by more percentage points (default %(default)s)")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if (args.baseline is None) == (args.no_baseline is None):
        raise cli.UsageError("give a BASELINE_DIR or --no-baseline REASON, not both or neither")
    if not args.max_drop >= 0:
        raise cli.UsageError(f"--max-drop must be >= 0, got {args.max_drop}")
    _, current = run_record(args.run)
    if args.no_baseline is not None:
        sys.stdout.write(f"{heading(args.baseline_name or 'a baseline')}\n\nNo baseline: {args.no_baseline}.\n")
        return 0
    path, baseline = run_record(args.baseline)
    sys.stdout.write(markdown(current, baseline, args.baseline_name or f"`{args.baseline}`", path.name))
    problem = regression(current, baseline, args.max_drop)
    if problem:
        sys.stdout.write(f"\n**Regression:** {problem}.\n")
        sys.stdout.flush()
        raise MnistFlaxError(problem)
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
