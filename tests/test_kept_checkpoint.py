"""The session's trained checkpoint, kept between sessions (conftest.py): used only while
everything that decides its bits is unchanged, and only when it loads."""

import os
import shutil
import time

import conftest
from conftest import REPO
from mnist_flax import checkpoint, sidecar


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
