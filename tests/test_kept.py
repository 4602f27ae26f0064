"""What conftest.py keeps between sessions: the trained checkpoint, used only while everything
that decides its bits is unchanged and only when it loads; and the prepared MNIST, used only
while the code that writes it is unchanged."""

import os
import shutil
import time

import pytest

import conftest
from conftest import REPO
from mnist_flax import checkpoint, data, sidecar


def copy_of_the_sources(root):
    shutil.copytree(REPO / "mnist_flax", root / "mnist_flax", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tests").mkdir()
    shutil.copy2(REPO / "tests" / "conftest.py", root / "tests" / "conftest.py")
    return root


def test_the_key_changes_with_the_code_and_the_flags(tmp_path, monkeypatch):
    root = copy_of_the_sources(tmp_path)
    assert conftest.trained_checkpoint_key(root) == conftest.trained_checkpoint_key(REPO)
    model = root / "mnist_flax" / "model.py"
    model.write_text(model.read_text() + "\n# edited\n")
    edited = conftest.trained_checkpoint_key(root)
    assert edited != conftest.trained_checkpoint_key(REPO)
    (root / "tests" / "conftest.py").write_text((root / "tests" / "conftest.py").read_text().replace(
        f"TRAIN_STEPS = {conftest.TRAIN_STEPS}", f"TRAIN_STEPS = {conftest.TRAIN_STEPS + 1}"))
    assert conftest.trained_checkpoint_key(root) != edited
    before = conftest.trained_checkpoint_key(REPO)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=true")
    assert conftest.trained_checkpoint_key(REPO) != before
    monkeypatch.delenv("XLA_FLAGS")
    before = conftest.trained_checkpoint_key(REPO)
    assert conftest.trained_checkpoint_key(REPO, "--train-examples", "10240") != before  # another run's flags
    if hasattr(os, "sched_getaffinity"):  # the cores XLA may split a convolution among
        cores = len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores + 1)))
        assert conftest.trained_checkpoint_key(REPO) != before


def test_a_kept_checkpoint_is_used_only_while_it_loads(trained_checkpoint, tmp_path):
    kept = tmp_path / "kept" / "digest"
    conftest.keep_checkpoint(trained_checkpoint, kept)
    first = tmp_path / "session-1"
    first.mkdir()
    assert conftest.copy_valid_checkpoint(kept, first)
    (copied,) = first.glob("*.msgpack")
    assert copied.read_bytes() == trained_checkpoint.read_bytes()
    assert sidecar.path_for(copied).read_bytes() == sidecar.path_for(trained_checkpoint).read_bytes()
    checkpoint.load_checkpoint(copied)

    (entry,) = kept.glob("*.msgpack")
    damaged = bytearray(entry.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    entry.write_bytes(bytes(damaged))
    second = tmp_path / "session-2"
    second.mkdir()
    assert not conftest.copy_valid_checkpoint(kept, second)
    assert not list(second.glob("*.msgpack"))  # the fixture trains anew
    assert not conftest.copy_valid_checkpoint(tmp_path / "kept" / "never-published", second)


def test_publishing_keeps_the_newest_digests_and_sweeps_abandoned_staging(trained_checkpoint, tmp_path):
    kept = tmp_path / "kept"
    abandoned = kept / ".staging-abandoned"
    abandoned.mkdir(parents=True)
    os.utime(abandoned, (time.time() - 7200,) * 2)
    for i in range(conftest.KEEP_AT_MOST + 2):
        conftest.keep_checkpoint(trained_checkpoint, kept / f"digest-{i}")
        os.utime(kept / f"digest-{i}", (1_000_000 + i,) * 2)  # publication order, whatever the clock's resolution
    last = kept / f"digest-{conftest.KEEP_AT_MOST + 1}"
    before = {p.name: p.stat().st_mtime_ns for p in last.iterdir()}
    conftest.keep_checkpoint(trained_checkpoint, last)  # already published: left as it is
    assert {p.name: p.stat().st_mtime_ns for p in last.iterdir()} == before
    names = sorted(p.name for p in kept.iterdir())
    assert names == [f"digest-{i}" for i in range(2, conftest.KEEP_AT_MOST + 2)]


def test_the_prepared_data_key_changes_with_the_code_that_writes_it(tmp_path):
    root = copy_of_the_sources(tmp_path)
    assert conftest.prepared_data_key(root) == conftest.prepared_data_key(REPO)
    for name in ("model.py", "training.py"):  # training code does not touch the prepared files
        (root / "mnist_flax" / name).write_text("# edited\n")
    assert conftest.prepared_data_key(root) == conftest.prepared_data_key(REPO)
    keys = set()
    for name in ("data.py", "decoded.py", "atomic.py"):  # data.py, and what it imports, directly or not
        path = root / "mnist_flax" / name
        path.write_text(path.read_text() + "\n# edited\n")
        keys.add(conftest.prepared_data_key(root))
    assert len(keys) == 3 and conftest.prepared_data_key(REPO) not in keys


def test_the_session_data_dir_is_the_kept_one_and_holds_mnist(mnist_data_dir, mnist_manual_dir):
    assert mnist_data_dir == conftest.kept_data_dir() / conftest.prepared_data_key()
    arrays = data.load_mnist(data_dir=str(mnist_data_dir), manual_dir=str(mnist_manual_dir))
    assert arrays.train_images.shape == (60_000, 28, 28, 1) and arrays.test_labels.shape == (10_000,)


def test_only_the_newest_kept_data_dirs_stay(tmp_path):
    for i in range(conftest.KEEP_DATA_AT_MOST + 2):
        (tmp_path / f"digest-{i}").mkdir()
        os.utime(tmp_path / f"digest-{i}", (1_000_000 + i,) * 2)
    conftest.drop_all_but_newest(tmp_path, conftest.KEEP_DATA_AT_MOST)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        [f"digest-{i}" for i in range(2, conftest.KEEP_DATA_AT_MOST + 2)]


def test_a_kept_data_dir_that_fails_to_load_is_emptied_and_prepared_again(tmp_path):
    """A real one cut short fails in TFDS's reader ("ArrayRecord file should be at least 64KB big")."""
    (tmp_path / "mnist_idx").mkdir()
    (tmp_path / "mnist_idx" / "damaged.array_record").write_bytes(b"cut short")
    (tmp_path / "dataset_info.json").write_text("{}")
    seen = []

    def load(fails: int):
        seen.append(sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock"))
        if len(seen) <= fails:
            raise RuntimeError("ArrayRecord file should be at least 64KB big")
    conftest.prepare_or_repair(tmp_path, lambda: load(fails=1))  # repaired by another worker meanwhile
    assert seen == [["dataset_info.json", "mnist_idx"]] * 2
    seen.clear()
    conftest.prepare_or_repair(tmp_path, lambda: load(fails=2))
    assert seen == [["dataset_info.json", "mnist_idx"]] * 2 + [[]]

    def broken():
        raise RuntimeError("a fault of data.py")
    with pytest.raises(RuntimeError, match="a fault of data.py"):
        conftest.prepare_or_repair(tmp_path, broken)
    (tmp_path / "dataset_info.json").write_text("{}")
    conftest.prepare_or_repair(tmp_path, lambda: seen.append("read"))  # loads: nothing is removed
    assert seen[-1] == "read" and (tmp_path / "dataset_info.json").is_file()


def test_a_cached_program_without_its_access_time_no_longer_stops_the_cache(tmp_path):
    """A process killed between writing a program and its atime file left jax 0.10's bounded
    cache refusing every later write; conftest restores the atime, and the cache works again,
    evicting that program first."""
    from jax._src.lru_cache import LRUCache

    cache = LRUCache(str(tmp_path), max_size=250)
    cache.put("old", b"x" * 100)
    cache.put("orphan", b"x" * 100)
    (tmp_path / "orphan-atime").unlink()
    with pytest.raises(FileNotFoundError):  # the jax bug; once jax has the fix, this helper can go
        cache.put("new", b"x" * 100)
    assert conftest.restore_missing_access_times(str(tmp_path)) == 1
    assert conftest.restore_missing_access_times(str(tmp_path)) == 0
    cache.put("new", b"x" * 100)
    assert cache.get("new") and cache.get("old") and cache.get("orphan") is None
