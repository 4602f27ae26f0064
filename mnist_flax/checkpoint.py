"""Model checkpoints: msgpack (flax.serialization) of params and BatchNorm statistics.

A checkpoint `mnist_flax_<UTC time>_acc<test %>.msgpack` has a JSON sidecar of
the same stem with the run's metadata and the msgpack's sha256.

`flax.serialization.from_bytes` does not check shapes or dtypes and silently
drops unknown keys, so loading validates the raw tree against the model's own
structure: same keys, shapes and dtypes, finite values, size within bounds.
msgpack cannot execute code; nothing here unpickles.
"""

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from mnist_flax.atomic import atomic_write_bytes, atomic_write_text
from mnist_flax.errors import CheckpointError
from mnist_flax.model import init_variables

CHECKPOINT_SUFFIX = ".msgpack"
SIDECAR_SUFFIX = ".json"
# The model is ~40 KB; anything far larger is not ours, and unpacking msgpack
# can take several times the file's size in memory.
MAX_CHECKPOINT_BYTES = 16 * 2**20
MAX_SIDECAR_BYTES = 2**20


def checkpoint_name(created: dt.datetime, test_accuracy: float) -> str:
    stamp = created.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"mnist_flax_{stamp}_acc{100 * test_accuracy:.2f}{CHECKPOINT_SUFFIX}"


def sidecar_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix(SIDECAR_SUFFIX)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def variables_to_bytes(variables: dict) -> bytes:
    return serialization.to_bytes(jax.device_get(variables))


def model_template() -> dict:
    """The {'params', 'batch_stats'} structure of the model, as shapes and dtypes only."""
    return jax.eval_shape(init_variables, jax.random.key(0))


def save_checkpoint(output_dir: str | Path, variables: dict, metadata: dict,
                    created: dt.datetime | None = None) -> Path:
    """Writes the msgpack, then its sidecar, each atomically; returns the msgpack path.

    `metadata` must hold `test_accuracy`; `created` and `sha256` are added.
    """
    created = created or dt.datetime.now(dt.timezone.utc)
    check_variables(jax.device_get(variables), model_template(), "the trained model")
    data = variables_to_bytes(variables)
    path = Path(output_dir) / checkpoint_name(created, metadata["test_accuracy"])
    sidecar = {**metadata, "created": created.astimezone(dt.timezone.utc).isoformat(timespec="seconds"),
               "sha256": sha256_hex(data), "file": path.name}
    atomic_write_bytes(path, data)
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(checkpoint: str | Path) -> dict | None:
    """The checkpoint's sidecar metadata, or None when it has none."""
    path = sidecar_path(checkpoint)
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes, far more than a sidecar holds")
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError covers bad JSON and bad UTF-8
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise CheckpointError(f"{path}: unreadable sidecar JSON ({reason}); delete it or restore it "
                              "from the run") from None
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{path}: sidecar is not a JSON object")
    return sidecar


def read_checkpoint_bytes(path: str | Path, missing: str = "no such checkpoint; train one with "
                          "`python -m mnist_flax.train`") -> bytes:
    """The file's bytes, refusing anything far larger than SeedNet's weights (~40 KB) could be."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {missing}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path}: {size:,} bytes is far larger than SeedNet's weights (~40 KB); "
                              "is it the right file?")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e


def load_checkpoint(path: str | Path) -> tuple[dict, dict | None]:
    """(variables, sidecar or None), validated; raises CheckpointError naming the problem."""
    data = read_checkpoint_bytes(path)
    sidecar = read_sidecar(path)
    if sidecar is not None and "sha256" in sidecar and sidecar["sha256"] != sha256_hex(data):
        raise CheckpointError(
            f"{path}: sha256 {sha256_hex(data)} does not match its sidecar's {sidecar['sha256']}; "
            "the file is corrupt or was replaced: download or train it again")
    return variables_from_bytes(data, str(path)), sidecar


def variables_from_bytes(data: bytes, source: str = "checkpoint") -> dict:
    """Decodes and validates msgpack bytes into {'params', 'batch_stats'} of writable arrays."""
    if not data.startswith(b"\x82"):  # a two-entry msgpack map: params and batch_stats
        raise CheckpointError(f"{source}: not an mnist_flax msgpack checkpoint (wrong file type?)")
    try:
        raw = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises many types on malformed input
        raise CheckpointError(f"{source}: corrupt msgpack data ({type(e).__name__}: {e})"[:300]) from None
    check_variables(raw, model_template(), source)
    return jax.tree.map(np.array, raw)  # from_bytes gives read-only views


def check_variables(tree: Any, template: Any, source: str, path: str = "") -> None:
    """Raises CheckpointError unless `tree` has exactly the template's keys, shapes, dtypes; all finite."""
    where = path or "top level"
    if isinstance(template, dict):
        if not isinstance(tree, dict):
            raise CheckpointError(f"{source}: expected a mapping at {where}, found {type(tree).__name__}")
        missing, extra = sorted(set(template) - set(tree)), sorted(set(map(str, tree)) - set(template))
        if missing or extra:
            raise CheckpointError(f"{source}: does not fit the model at {where}: "
                                  f"missing {missing or 'nothing'}, unexpected {extra[:10] or 'nothing'}")
        for key in template:
            check_variables(tree[key], template[key], source, f"{path}/{key}" if path else key)
        return
    if not isinstance(tree, np.ndarray):
        raise CheckpointError(f"{source}: expected an array at {where}, found {type(tree).__name__}")
    if tree.shape != tuple(template.shape) or tree.dtype != template.dtype:
        raise CheckpointError(f"{source}: {where} is {tree.dtype}{list(tree.shape)}, "
                              f"the model needs {template.dtype}{list(template.shape)}")
    if not np.all(np.isfinite(tree)):
        raise CheckpointError(f"{source}: {where} holds NaN or infinite values")
