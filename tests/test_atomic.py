"""A writer killed at any moment leaves the old file or the new one, never a torn one."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mnist_flax.atomic import atomic_write_bytes, atomic_write_text, remove_stale_temporaries

SIZE = 8 * 2**20  # large enough that a kill often lands mid-write

WRITER = textwrap.dedent("""
    import sys
    from mnist_flax.atomic import atomic_write_bytes
    target, size = sys.argv[1], int(sys.argv[2])
    for i in range(10**9):
        atomic_write_bytes(target, bytes([i % 251]) * size)
        if i == 0:
            print("first", flush=True)
""")


def test_killed_writer_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "model.bin"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(SIZE)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "first\n"
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == SIZE and data == data[:1] * SIZE  # one whole version, never a mix
    atomic_write_text(tmp_path / "other.json", "{}")
    remove_stale_temporaries(tmp_path)  # what a successful run does after saving
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "other.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")
    try:
        atomic_write_bytes(target, 12345)  # fails inside the write, after the temporary exists
    except TypeError:
        pass
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_files_get_the_usual_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "x.txt", "hi")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
