"""Interrupted training resumes bit for bit; the NaN guard keeps the last good state."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest

from mnist_flax import resume, step, training
from mnist_flax import config as config_lib
from mnist_flax.errors import CheckpointError
from mnist_flax.loop import Position

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS = 80  # the signal tests send theirs by the progress bar, in the first half, so it lands mid-run on any machine
QUICK = ["--train-examples", str(STEPS * 128), "--no-plots", "--no-progress"]
BAR_STEP = re.compile(rb"(\d+)/%d \[" % STEPS)  # tqdm's "n/total [elapsed<left...]"


def train_cmd(out, data_dir, manual_dir, *extra):
    return [sys.executable, "-m", "mnist_flax.train", "--output-dir", str(out), "--data-dir", str(data_dir),
            "--manual-dir", str(manual_dir), *extra]


def resume_cmd(out, data_dir, manual_dir):
    return [sys.executable, "-m", "mnist_flax.train", "--resume", str(out), "--no-plots", "--no-progress",
            "--data-dir", str(data_dir), "--manual-dir", str(manual_dir)]


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def interrupt_at_random_step(cmd, sig, rng):
    """Starts training with its progress bar on and sends `sig` once the bar has passed a random
    step of the first half (step 0: as soon as training starts); returns the process result."""
    at = rng.randrange(0, STEPS // 2, training.PROGRESS_EVERY)
    proc = subprocess.Popen([arg for arg in cmd if arg != "--no-progress"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"training from step" not in seen or max(map(int, BAR_STEP.findall(seen)), default=0) < at:
        chunk = os.read(proc.stderr.fileno(), 65536)  # what the process has written so far, or b"" at its exit
        if not chunk:
            break
        seen += chunk
    assert b"training from step" in seen, seen.decode(errors="replace")[-2000:]
    # Held where the bar showed it, the run is still going when the signal lands, on any machine:
    # a stopped process takes the signal as it continues.
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "training ended before its bar reached step %d of %d" % (at, STEPS)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout.decode(errors="replace"), (seen + stderr).decode(errors="replace")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_data_dir, mnist_manual_dir):
    """The checkpoint of the same command run through without a signal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run(train_cmd(out, mnist_data_dir, mnist_manual_dir, *QUICK))
    assert result.returncode == 0, result.stderr[-2000:]
    return next(out.glob("*.msgpack"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_bit_identical(tmp_path, uninterrupted, mnist_data_dir, mnist_manual_dir, sig):
    rng = random.Random(int(sig) * 7919 + os.getpid())
    out = tmp_path / "run"
    code, _, stderr = interrupt_at_random_step(train_cmd(out, mnist_data_dir, mnist_manual_dir, *QUICK), sig, rng)
    assert code == 128 + sig, stderr[-2000:]
    assert "--resume" in stderr and (out / resume.RESUME_FILE).is_file()
    _, position, _ = resume.load_resume_state(out)
    assert 0 < position.batch < STEPS

    resumed = run(resume_cmd(out, mnist_data_dir, mnist_manual_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = next(out.glob("*.msgpack"))
    assert final.read_bytes() == uninterrupted.read_bytes()  # bit for bit: params and BatchNorm statistics
    assert not (out / resume.RESUME_FILE).exists()  # a finished run leaves nothing to resume
    steps = [int(line.split(",")[0].split(":")[1]) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice or missing


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through Linux's /proc")
def test_ctrl_c_in_a_terminal_leaves_no_plot_worker_behind(tmp_path, mnist_data_dir, mnist_manual_dir):
    """With plots on, the command runs plot workers. A terminal's Ctrl-C goes to the whole
    foreground process group: the command still saves its resume state and exits 130, with
    nothing on stderr from a worker, and none of its processes outlives it."""
    mark = f"mnist-flax-test-{os.getpid()}-{time.monotonic_ns()}"
    cmd = train_cmd(tmp_path, mnist_data_dir, mnist_manual_dir, "--train-examples", str(STEPS * 128), "--no-progress")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MNIST_FLAX_TEST_MARK": mark}, start_new_session=True)
    line = proc.stderr.readline()
    assert line.startswith("training from step"), line + proc.stderr.read()
    assert len(processes_marked(mark)) == 3  # the command and its two plot workers
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert (tmp_path / resume.RESUME_FILE).is_file()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    assert processes_marked(mark) == []


def processes_marked(mark: str) -> list[int]:
    """The live processes whose environment holds `mark` (children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"MNIST_FLAX_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def test_checkpoint_every_and_resume_flags_conflict(tmp_path, mnist_data_dir, mnist_manual_dir):
    result = run(train_cmd(tmp_path, mnist_data_dir, mnist_manual_dir, "--resume", str(tmp_path), "--epochs", "2"))
    assert result.returncode == 2 and "drop --epochs" in result.stderr


@pytest.mark.slow
def test_checkpoint_every_survives_sigkill(tmp_path, mnist_data_dir, mnist_manual_dir, uninterrupted):
    """--checkpoint-every N saves as it goes; after a SIGKILL the last save resumes bit-identical."""
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(out, mnist_data_dir, mnist_manual_dir, *QUICK, "--checkpoint-every", "20"),
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / resume.RESUME_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # where it is: a kill of a stopped process lands before its next step
    assert proc.poll() is None, "training ended before its first --checkpoint-every save was seen"
    proc.kill()
    proc.wait()
    state, position, _ = resume.load_resume_state(out)  # complete, never torn
    assert position.batch % 20 == 0 and int(state.step) == position.batch > 0
    resumed = run(resume_cmd(out, mnist_data_dir, mnist_manual_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert next(out.glob("mnist_flax_*.msgpack")).read_bytes() == uninterrupted.read_bytes()
    assert not list(out.glob(".*.tmp"))  # the successful run cleared any stray temporary


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(tmp_path, mnist_data_dir, mnist_manual_dir):
    result = run(train_cmd(tmp_path, mnist_data_dir, mnist_manual_dir, *QUICK, "--learning-rate", "1e30"))
    assert result.returncode == 1
    assert "NaN or infinite at step" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.msgpack")) or [p.name for p in tmp_path.glob("*.msgpack")] == ["resume.msgpack"]
    state, position, _ = resume.load_resume_state(tmp_path)  # validated: every value finite
    chex.assert_tree_all_finite(state.params)


def test_resume_state_round_trip(tmp_path):
    config = config_lib.resolve("onecycle", seed=3, label_smoothing=0.2, steps_per_call=2)
    state = step.create_train_state(config)
    resume.save_resume_state(tmp_path, state, Position(0, 7, 1.5, 2.0, 3.0), config)
    restored, position, restored_config = resume.load_resume_state(tmp_path / resume.RESUME_FILE)
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
    chex.assert_trees_all_equal(restored.dropout_key, state.dropout_key)
    assert position == Position(0, 7, 1.5, 2.0, 3.0) and restored_config == config  # every setting, edited or not


def test_resume_state_of_an_earlier_version_is_refused_with_the_reason(tmp_path):
    from flax import serialization
    old = {"state": {"step": np.int32(3)}, "position": {"epoch": 0, "batch": 3},
           "config": {"seed": 0, "epochs": 1, "batch_size": 128, "learning_rate": 0.01, "recipe": "seed",
                      "train_examples": 0}}
    (tmp_path / resume.RESUME_FILE).write_bytes(serialization.msgpack_serialize(old))
    with pytest.raises(CheckpointError, match="earlier mnist_flax.*start the run again"):
        resume.load_resume_state(tmp_path)


@pytest.mark.parametrize("corrupt", [lambda b: b[:len(b) // 2], lambda b: b"\x85" + b[1:], lambda b: b"junk"])
def test_corrupt_resume_state_is_rejected(tmp_path, corrupt):
    config = config_lib.resolve()
    state = step.create_train_state(config)
    path = resume.save_resume_state(tmp_path, state, Position(), config)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError, match="resume.msgpack"):
        resume.load_resume_state(tmp_path)
