"""metrics.jsonl: one JSON object per training step, beside the checkpoint.

Lines are appended as training goes and flushed every few steps; a killed run
can leave a torn last line, which readers skip. A resumed run first rewrites
the file (atomically) without the steps it is about to redo.
"""

import json
from pathlib import Path

from mnist_flax.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
FLUSH_EVERY = 50


def read_metrics(path: str | Path) -> list[dict]:
    """The valid records of a metrics.jsonl, skipping a torn or foreign line."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a torn or foreign line
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class MetricsLog:
    """Appends step records to <output_dir>/metrics.jsonl; keeps earlier steps on resume."""

    def __init__(self, output_dir: str | Path | None, keep_until_step: int = 0):
        if output_dir is None:  # a process that does not write (not the primary host)
            self.file = None
            return
        self.path = Path(output_dir) / METRICS_FILE
        kept = [r for r in read_metrics(self.path) if r["step"] <= keep_until_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.pending = 0

    def write(self, **record) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}) + "\n")
        self.pending += 1
        if self.pending >= FLUSH_EVERY:
            self.file.flush()
            self.pending = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
