"""Model checkpoints: msgpack (flax.serialization) of params and BatchNorm statistics.

A checkpoint `mnist_flax_<UTC time>_acc<test %>.msgpack` has a JSON sidecar of the same
stem (sidecar.py) with the run's metadata and the msgpack's sha256.

`flax.serialization.from_bytes` does not check shapes or dtypes and silently drops
unknown keys, so loading validates the raw tree against the model's own structure:
same keys, shapes and dtypes, finite values, size within bounds. msgpack cannot
execute code; nothing here unpickles.

Finding and reading checkpoint files needs neither JAX nor the model, so those are imported
in the functions that decode, encode and validate weights: `compare`, which only reads
sidecars, runs without them.
"""

import datetime as dt
import functools
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from mnist_flax import sidecar
from mnist_flax.atomic import atomic_write_bytes
from mnist_flax.errors import CheckpointError, missing_path

SUFFIX = ".msgpack"
GLOB = "mnist_flax_*" + SUFFIX
# The model is ~40 KB; anything far larger is not ours, and unpacking msgpack
# can take several times the file's size in memory.
MAX_BYTES = 16 * 2**20
TRAIN_HINT = "train one with `python -m mnist_flax.train`"


def checkpoint_name(created: dt.datetime, test_accuracy: float) -> str:
    stamp = created.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"mnist_flax_{stamp}_acc{100 * test_accuracy:.2f}{SUFFIX}"


def utc_now_iso(created: dt.datetime | None = None) -> str:
    return (created or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).isoformat(timespec="seconds")


def find(path: str | Path) -> Path:
    """The checkpoint itself, or the newest one in a directory (by the UTC time in its name)."""
    path = Path(path)
    if path.is_dir():
        # Names start mnist_flax_<YYYYmmddTHHMMSSZ>, so name order is time order, unlike
        # mtimes, which copying or downloading an artifact resets.
        found = sorted(path.glob(GLOB))
        if not found:
            raise CheckpointError(f"{path}: no {GLOB} in this directory; train one there with "
                                  f"`python -m mnist_flax.train --output-dir {shlex.quote(str(path))}`")
        return found[-1]
    if not path.exists():
        raise CheckpointError(f"{missing_path(path)}: no such checkpoint or directory; {TRAIN_HINT}")
    if path.suffix == sidecar.SUFFIX:
        weights = path.with_suffix(SUFFIX)
        beside = "" if weights.is_file() else ", which is not beside it"
        raise CheckpointError(f"{path} is a checkpoint's sidecar (its metadata), not the checkpoint; "
                              f"give the {SUFFIX} it describes: {weights}{beside}")
    return path


def variables_to_bytes(variables: dict) -> bytes:
    import jax
    from flax import serialization

    return serialization.to_bytes(jax.device_get(variables))


def model_template() -> dict:
    """The {'params', 'batch_stats'} structure of the model, as shapes and dtypes only (a fresh copy)."""
    import jax

    return jax.tree.map(lambda leaf: leaf, _model_template())


@functools.cache  # the abstract init traces the whole module, and every load checks against it
def _model_template() -> dict:
    import jax

    from mnist_flax.model import init_variables

    return jax.eval_shape(lambda: init_variables(jax.random.key(0)))  # the key too is only traced


def network_for(record: dict | None):
    """The network in the form the run that wrote the checkpoint trained in (its sidecar's
    config.ops; "auto" without one): what evaluating, predicting, serving and exporting it apply."""
    from mnist_flax.model import network

    return network(sidecar.run_config(record or {}).get("ops", "auto"))


def save_checkpoint(output_dir: str | Path, variables: dict, metadata: dict,
                    created: dt.datetime | None = None) -> Path:
    """Writes the msgpack, then its sidecar, each atomically; returns the msgpack path.

    `metadata` (sidecar fields) must hold `test_accuracy`; `created`, `file` and `sha256` are added.
    """
    import jax

    created = created or dt.datetime.now(dt.timezone.utc)
    check_variables(jax.device_get(variables), model_template(), "the trained model")
    data = variables_to_bytes(variables)
    path = Path(output_dir) / checkpoint_name(created, metadata["test_accuracy"])
    atomic_write_bytes(path, data)
    sidecar.write(path, data, {**metadata, "created": utc_now_iso(created)})
    return path


def read_checkpoint_bytes(path: str | Path, missing: str = f"no such checkpoint; {TRAIN_HINT}") -> bytes:
    """The file's bytes, refusing anything far larger than the model's weights (~40 KB) could be."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{missing_path(path)}: {missing}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise CheckpointError(f"{path}: {size:,} bytes is far larger than the model's weights (~40 KB); "
                              "is it the right file?")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e


def load_checkpoint(path: str | Path) -> tuple[dict, dict | None]:
    """(variables, sidecar or None) of a checkpoint, or of a directory's newest; validated."""
    path = find(path)
    data = read_checkpoint_bytes(path)
    record = sidecar.read(path)
    sidecar.verify(path, data, record)
    return variables_from_bytes(data, str(path)), record


def variables_from_bytes(data: bytes, source: str = "checkpoint") -> dict:
    """Decodes and validates msgpack bytes into {'params', 'batch_stats'} of writable arrays."""
    if not data.startswith(b"\x82"):  # a two-entry msgpack map: params and batch_stats
        hint = ("; it is PyTorch weights: turn them into a checkpoint with "
                "`python -m mnist_flax.export --from-torch FILE -o OUT.msgpack`" if _is_safetensors(data) else
                " (wrong file type?)")
        raise CheckpointError(f"{source}: not an mnist_flax msgpack checkpoint{hint}")
    import jax
    from flax import serialization

    try:
        raw = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises many types on malformed input
        raise CheckpointError(f"{source}: corrupt msgpack data ({type(e).__name__}: {e})"[:300]) from None
    check_variables(raw, model_template(), source)
    return jax.tree.map(np.array, raw)  # from_bytes gives read-only views


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


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
