"""The JSON sidecar beside every checkpoint: what the run was, and the sha256 of the file.

`<stem>.json` sits beside `<stem>.msgpack`. It is written after the checkpoint, atomically,
and read back with a size cap and a check that it is a JSON object. No JAX here: the
artifact downloader verifies checksums without starting it.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from mnist_flax.atomic import atomic_write_text
from mnist_flax.errors import CheckpointError

SUFFIX = ".json"
MAX_BYTES = 2**20

# Every field a sidecar may hold, and what it means. training.py writes the run's; export.py's
# `--from-torch` writes the provenance ones. Readers treat every field but `sha256` as optional.
FIELDS = {
    "file": "the checkpoint's file name",
    "sha256": "sha256 of the checkpoint's bytes",
    "created": "UTC time the checkpoint was written (ISO 8601)",
    "config": "the run's config.Config, as a mapping",
    "test_accuracy": "accuracy on the 10,000 MNIST test images (0-1)",
    "per_class_test_accuracy": "test accuracy of each digit, 0-9",
    "confusion_matrix": "test-set confusion matrix, rows true, columns predicted",
    "train_accuracy": "running accuracy over the last epoch",
    "train_loss": "running mean loss over the last epoch",
    "params": "number of trainable parameters",
    "num_batches_tracked": "training steps taken, which is BatchNorm's update count",
    "peak_learning_rate": "the schedule's largest learning rate",
    "epoch_seconds": "wall time of each epoch",
    "versions": "versions of jax, flax, optax and Python that trained it",
    "imported_from": "the PyTorch weights file an imported checkpoint came from",
    "source_sha256": "sha256 of that file",
}


def path_for(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix(SUFFIX)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(checkpoint: str | Path, data: bytes, fields: dict[str, Any]) -> Path:
    """Writes the sidecar of `checkpoint`, whose bytes are `data`; `file` and `sha256` are added."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"not sidecar fields: {', '.join(unknown)} (sidecar.FIELDS lists them)")
    record = {**fields, "file": Path(checkpoint).name, "sha256": sha256_hex(data)}
    return atomic_write_text(path_for(checkpoint), json.dumps(record, indent=2, sort_keys=True) + "\n")


def read(checkpoint: str | Path) -> dict | None:
    """The checkpoint's sidecar, or None when it has none; CheckpointError if it is unreadable."""
    path = path_for(checkpoint)
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes, far more than a sidecar holds")
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError covers bad JSON and bad UTF-8
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise CheckpointError(f"{path}: unreadable sidecar JSON ({reason}); delete it or restore it "
                              "from the run") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: sidecar is not a JSON object")
    return record


def verify(checkpoint: str | Path, data: bytes, record: dict | None, required: bool = False) -> None:
    """Raises CheckpointError unless `data` has the sha256 the sidecar records.

    Without a sidecar (or one without a sha256) there is nothing to check, which is an
    error only when `required`: a downloaded artifact must prove its integrity.
    """
    expected = (record or {}).get("sha256")
    if expected is None:
        if required:
            raise CheckpointError(f"{checkpoint}: no sidecar {path_for(checkpoint).name} with a sha256 "
                                  "beside it; cannot verify it")
        return
    actual = sha256_hex(data)
    if str(expected).lower() != actual:
        raise CheckpointError(f"{checkpoint}: sha256 {actual} does not match its sidecar's {expected}; "
                              "the file is corrupt or was replaced: download or train it again")


def run_config(record: dict) -> dict:
    """The run's settings, the `config` mapping (config.Config.to_dict); {} when the sidecar has none
    (a checkpoint imported from PyTorch)."""
    config = record.get("config")
    return config if isinstance(config, dict) else {}
