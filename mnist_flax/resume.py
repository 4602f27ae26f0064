"""Resumable training state: everything an interrupted run needs to continue exactly.

One msgpack file holds the train state (params, BatchNorm statistics, Adam's
moments, step), the loop's position and running metrics, and the config. The
data order and PRNG streams are pure functions of the seed and the position,
so nothing else is needed. The file is written atomically and validated on
load against the structure a fresh run would have.
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import serialization

from mnist_flax import training
from mnist_flax.atomic import atomic_write_bytes
from mnist_flax.checkpoint import check_variables, read_checkpoint_bytes
from mnist_flax.config import TrainConfig
from mnist_flax.errors import CheckpointError
from mnist_flax.loop import Position

RESUME_FILE = "resume.msgpack"


def resume_path(dir_or_file: str | Path) -> Path:
    path = Path(dir_or_file)
    return path / RESUME_FILE if path.is_dir() else path


def state_template(config: TrainConfig):
    return jax.eval_shape(lambda: training.create_train_state(jax.random.key(0), config))


def save_resume_state(output_dir: str | Path, state: training.TrainState, position: Position,
                      config: TrainConfig) -> Path:
    tree = {
        "state": jax.tree.map(np.asarray, serialization.to_state_dict(jax.device_get(state))),
        "position": dataclasses.asdict(position),
        "config": dataclasses.asdict(config),
    }
    check_variables(tree["state"], serialization.to_state_dict(state_template(config)), "the resume state")
    return atomic_write_bytes(Path(output_dir) / RESUME_FILE, serialization.msgpack_serialize(tree))


def _typed_fields(cls, raw, source: str, what: str):
    """Rebuilds a dataclass of numbers from `raw`, refusing missing, extra or non-numeric fields."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise CheckpointError(f"{source}: {what} must have exactly the fields {sorted(fields)}")
    values = {}
    for name, kind in fields.items():
        value = raw[name]
        kind = {"int": int, "float": float, "str": str}.get(kind, kind)
        if kind is str:
            if not isinstance(value, str):
                raise CheckpointError(f"{source}: {what}.{name} must be text: {_brief(value)}")
            values[name] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise CheckpointError(f"{source}: {what}.{name} is not a finite number: {_brief(value)}")
        if kind is int and value != int(value):
            raise CheckpointError(f"{source}: {what}.{name} must be a whole number: {value!r}")
        values[name] = kind(value)
    return cls(**values)


def _brief(value) -> str:
    """A value for a one-line message: an array's repr spans lines and can be long."""
    return " ".join(repr(value).split())[:80]


def load_resume_state(dir_or_file: str | Path) -> tuple[training.TrainState, Position, TrainConfig]:
    """(state, position, config) from a resume file; CheckpointError on anything off."""
    path = resume_path(dir_or_file)
    source = str(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no resume state here; it is written to --output-dir when a run "
                              "is interrupted or with --checkpoint-every N")
    data = read_checkpoint_bytes(path)
    if not data.startswith(b"\x83"):  # a three-entry msgpack map: state, position, config
        raise CheckpointError(f"{source}: not an mnist_flax resume state (wrong file type?)")
    try:
        raw = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises many types on malformed input
        raise CheckpointError(f"{source}: corrupt resume state ({type(e).__name__})") from None
    if not isinstance(raw, dict) or set(raw) != {"state", "position", "config"}:
        raise CheckpointError(f"{source}: not an mnist_flax resume state")
    try:
        config = _typed_fields(TrainConfig, raw["config"], source, "config").validate()
    except ValueError as e:
        raise CheckpointError(f"{source}: bad config: {e}") from None
    position = _typed_fields(Position, raw["position"], source, "position")
    template = state_template(config)
    check_variables(raw["state"], serialization.to_state_dict(template), source)
    fresh = training.create_train_state(jax.random.key(0), config)
    state = serialization.from_state_dict(fresh, jax.tree.map(np.array, raw["state"]))
    return state, position, config


def remove_resume_state(output_dir: str | Path) -> None:
    (Path(output_dir) / RESUME_FILE).unlink(missing_ok=True)
