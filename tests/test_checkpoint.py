"""Checkpoints round-trip exactly and refuse anything that is not this model."""

import datetime as dt
import json

import chex
import jax
import numpy as np
import pytest
from flax import serialization

from mnist_flax import checkpoint, sidecar
from mnist_flax.errors import CheckpointError
from mnist_flax.model import init_variables

META = {"test_accuracy": 0.98567, "train_accuracy": 0.97, "config": {"seed": 0}}


@pytest.fixture(scope="module")
def variables():
    return jax.device_get(init_variables(jax.random.key(0)))


def test_name_has_utc_time_and_accuracy():
    when = dt.datetime(2026, 11, 26, 22, 30, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert checkpoint.checkpoint_name(when, 0.98567) == "mnist_flax_20261126T213000Z_acc98.57.msgpack"


def test_round_trip_is_identical(tmp_path, variables):
    path = checkpoint.save_checkpoint(tmp_path, variables, META)
    restored, record = checkpoint.load_checkpoint(path)
    chex.assert_trees_all_equal(restored, variables)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, variables)
    assert restored["params"]["fc"]["kernel"].flags.writeable
    assert record["sha256"] == sidecar.sha256_hex(path.read_bytes())
    assert record["test_accuracy"] == META["test_accuracy"]
    assert checkpoint.load_checkpoint(tmp_path)[1] == record  # a directory: its newest checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.with_suffix(".json").name, path.name]


def test_sidecar_takes_only_its_documented_fields(tmp_path):
    with pytest.raises(ValueError, match="not sidecar fields: seed"):
        sidecar.write(tmp_path / "x.msgpack", b"", {"seed": 0})
    assert not list(tmp_path.iterdir())


def save_raw(tmp_path, tree, name="bad.msgpack"):
    path = tmp_path / name
    path.write_bytes(serialization.msgpack_serialize(tree))
    return path


def mutated(variables, fn):
    tree = jax.tree.map(np.array, variables)
    fn(tree)
    return tree


@pytest.mark.parametrize("mutation,message", [
    (lambda t: t["params"]["fc"].update(kernel=np.zeros((10, 512), np.float32)), r"fc/kernel is float32\[10, 512\]"),
    (lambda t: t["params"]["fc"].update(kernel=np.zeros((512, 10), np.float64)), r"fc/kernel is float64"),
    (lambda t: t["params"].pop("conv3"), r"missing \['conv3'\]"),
    (lambda t: t["params"].update(conv6={"bias": np.zeros(3, np.float32)}), r"unexpected \['conv6'\]"),
    (lambda t: t["batch_stats"]["bn1"].update(var=np.full(8, np.nan, np.float32)), "NaN or infinite"),
    (lambda t: t["params"].update(fc=np.zeros(3, np.float32)), "expected a mapping at params/fc"),
])
def test_mismatched_tree_is_rejected(tmp_path, variables, mutation, message):
    path = save_raw(tmp_path, mutated(variables, mutation))
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04zipfile", b"\x82\xa6params", b"\x82" + bytes(range(256)) * 4])
def test_garbage_is_rejected(tmp_path, data):
    path = tmp_path / "garbage.msgpack"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="garbage.msgpack"):
        checkpoint.load_checkpoint(path)


def test_truncated_checkpoint_is_rejected(tmp_path, variables):
    path = checkpoint.save_checkpoint(tmp_path, variables, META)
    data = path.read_bytes()
    path.with_suffix(".json").unlink()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt msgpack"):
        checkpoint.load_checkpoint(path)


def test_sha256_mismatch_with_sidecar_is_rejected(tmp_path, variables):
    path = checkpoint.save_checkpoint(tmp_path, variables, META)
    other = mutated(variables, lambda t: t["params"]["fc"]["bias"].__setitem__(0, 1.0))
    path.write_bytes(checkpoint.variables_to_bytes(other))
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        checkpoint.load_checkpoint(path)


def test_missing_and_oversized_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "nope.msgpack")
    big = tmp_path / "big.msgpack"
    with open(big, "wb") as f:
        f.truncate(checkpoint.MAX_BYTES + 1)
    with pytest.raises(CheckpointError, match="far larger"):
        checkpoint.load_checkpoint(big)


def test_bad_sidecar_is_reported(tmp_path, variables):
    path = checkpoint.save_checkpoint(tmp_path, variables, META)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable sidecar"):
        checkpoint.load_checkpoint(path)


def test_refuses_to_save_nan_weights(tmp_path, variables):
    bad = mutated(variables, lambda t: t["params"]["conv1"]["bias"].__setitem__(0, np.inf))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        checkpoint.save_checkpoint(tmp_path, bad, META)
    assert list(tmp_path.iterdir()) == []


def test_sidecar_is_json_with_required_fields(tmp_path, variables):
    path = checkpoint.save_checkpoint(tmp_path, variables, META)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert {"test_accuracy", "created", "sha256"} <= set(sidecar)
    assert sidecar["created"].endswith("+00:00")


@pytest.mark.parametrize("content", [b"[" * 100_000, b"\xff\xfe junk", b"{" + b" " * (2**20 + 1) + b"}"])
def test_hostile_sidecar_is_a_checkpoint_error(tmp_path, variables, content):
    path = checkpoint.save_checkpoint(tmp_path, variables, META)
    path.with_suffix(".json").write_bytes(content)
    with pytest.raises(CheckpointError, match="unreadable sidecar JSON"):
        checkpoint.load_checkpoint(path)
