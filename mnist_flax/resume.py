"""Resumable training state: everything an interrupted run needs to continue exactly.

One msgpack file holds the train state (params, BatchNorm statistics, the optimiser's
moments, step, dropout key), the loop's position and running metrics, and the config.
The data order and PRNG streams are pure functions of the seed and the position, so
nothing else is needed. The file is written atomically and validated on load against the
structure a fresh run of that config would have.
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import serialization

from mnist_flax import config as config_lib
from mnist_flax import step
from mnist_flax.atomic import atomic_write_bytes
from mnist_flax.checkpoint import check_variables, read_checkpoint_bytes
from mnist_flax.config import Config
from mnist_flax.errors import CheckpointError, brief
from mnist_flax.loop import Position

RESUME_FILE = "resume.msgpack"
# Version 2: the config holds every setting, and the state a dropout key. Version 1 files (three
# entries, no version) are refused: their config lacks the settings a resumed run must keep.
VERSION = 2
ENTRIES = ("version", "state", "position", "config")


def resume_path(dir_or_file: str | Path) -> Path:
    path = Path(dir_or_file)
    return path / RESUME_FILE if path.is_dir() else path


def state_template(config: Config):
    return step.train_state_shapes(config)


def save_resume_state(output_dir: str | Path, state: step.TrainState, position: Position, config: Config) -> Path:
    tree = {
        "version": VERSION,
        "state": jax.tree.map(np.asarray, serialization.to_state_dict(jax.device_get(state))),
        "position": dataclasses.asdict(position),
        "config": config.to_dict(),
    }
    check_variables(tree["state"], serialization.to_state_dict(state_template(config)), "the resume state")
    return atomic_write_bytes(Path(output_dir) / RESUME_FILE, serialization.msgpack_serialize(tree))


def _position(raw, source: str) -> Position:
    """A Position from `raw`, refusing missing, extra or non-numeric fields."""
    fields = {f.name: f.type for f in dataclasses.fields(Position)}
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise CheckpointError(f"{source}: position must have exactly the fields {sorted(fields)}")
    values = {}
    for name, kind in fields.items():
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise CheckpointError(f"{source}: position.{name} is not a finite number: {brief(value)}")
        if kind is int and value != int(value):
            raise CheckpointError(f"{source}: position.{name} must be a whole number: {value!r}")
        values[name] = (int if kind is int else float)(value)
    return Position(**values)


def load_resume_state(dir_or_file: str | Path) -> tuple[step.TrainState, Position, Config]:
    """(state, position, config) from a resume file; CheckpointError on anything off."""
    path = resume_path(dir_or_file)
    source = str(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no resume state here; it is written to --output-dir when a run "
                              "is interrupted or with --checkpoint-every N")
    data = read_checkpoint_bytes(path)
    if data.startswith(b"\x83"):  # version 1: a three-entry map (state, position, config)
        raise CheckpointError(f"{source}: a resume state from an earlier mnist_flax, whose config lacks "
                              "settings a resumed run must keep; it cannot be continued: start the run again")
    if not data.startswith(b"\x84"):  # a four-entry msgpack map
        raise CheckpointError(f"{source}: not an mnist_flax resume state (wrong file type?)")
    try:
        raw = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises many types on malformed input
        raise CheckpointError(f"{source}: corrupt resume state ({type(e).__name__})") from None
    if not isinstance(raw, dict) or set(raw) != set(ENTRIES):
        raise CheckpointError(f"{source}: not an mnist_flax resume state")
    if raw["version"] != VERSION:
        raise CheckpointError(f"{source}: resume state version {brief(raw['version'])}; this mnist_flax "
                              f"continues version {VERSION} only: start the run again")
    try:
        config = config_lib.from_dict(raw["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: bad config: {e}") from None
    position = _position(raw["position"], source)
    template = state_template(config)
    check_variables(raw["state"], serialization.to_state_dict(template), source)
    # Restored into the abstract template: a real train state would compile and run the init for nothing.
    state = serialization.from_state_dict(template, jax.tree.map(np.array, raw["state"]))
    return state, position, config


def remove_resume_state(output_dir: str | Path) -> None:
    (Path(output_dir) / RESUME_FILE).unlink(missing_ok=True)
