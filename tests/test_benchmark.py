"""scripts/benchmark.py runs the training loop's own calls and reports what it timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PARAMETERS
from mnist_flax import runtime

REPO_ROOT = Path(__file__).resolve().parent.parent


def benchmark(data_dir, manual_dir, *args):
    return subprocess.run([sys.executable, "scripts/benchmark.py", "--data-dir", str(data_dir),
                           "--manual-dir", str(manual_dir), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_reports_the_steps_it_timed(mnist_data_dir, mnist_manual_dir):
    # Warm-up 1 ends with the first call (steps 1-4); 9 ends with the third (9-12): 8 steps timed.
    result = benchmark(mnist_data_dir, mnist_manual_dir, "--warmup", "1", "--steps", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["timed_steps"] == 8 and report["steps_per_call"] == 4 and report["params"] == PARAMETERS
    assert report["devices"] == 1 and report["images_per_second"] > 0 and report["eval_images_per_second"] > 0
    # `seconds` is rounded to the millisecond; images per second comes from the exact time.
    assert abs(report["images_per_second"] - 8 * 128 / report["seconds"]) < 0.01 * report["images_per_second"]
    assert all(flag in report["xla_flags"].split() for flag in runtime.CPU_XLA_FLAGS) and report["jax"]


def test_rejects_a_window_longer_than_the_epoch(mnist_data_dir, mnist_manual_dir):
    result = benchmark(mnist_data_dir, mnist_manual_dir, "--steps", "500")
    assert result.returncode == 2 and "must fit in one epoch (469 steps of 128)" in result.stderr


def load_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_torch_takes_ratios_within_the_round():
    compare = load_script("compare_torch")
    row = {"flax_warm_s": 10.0, "torch_epoch_s": 20.0, "flax_cold_s": 30.0, "flax_steps_ips": 9000.0,
           "torch_eager_ips": 3000.0, "torch_compile_ips": 4500.0, "torch_channels_last_ips": 4000.0}
    compare.add_ratios(row)
    assert (row["warm_over_torch"], row["cold_over_torch"], row["steps_over_fastest_torch"]) == (0.5, 1.5, 2.0)
    result = subprocess.run([sys.executable, "scripts/compare_torch.py", "--parts", "bogus"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--parts from command,cold,steps" in result.stderr
    # The probe's own program at a smaller size: the script's size is for a measurement, not a test.
    probe = subprocess.run([sys.executable, "-c", compare.matmul_probe(n=256, repeats=3)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and float(probe.stdout) > 1.0, probe.stderr[-2000:]  # GFLOP/s: one number


@pytest.mark.slow
def test_time_phases_accounts_for_the_whole_command(tmp_path, mnist_data_dir, mnist_manual_dir):
    result = subprocess.run([sys.executable, "scripts/time_phases.py", "--train-examples", "512", "--no-plots",
                             "--no-progress", "--output-dir", str(tmp_path), "--data-dir", str(mnist_data_dir),
                             "--manual-dir", str(mnist_manual_dir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    phases = json.loads(result.stderr.strip().splitlines()[-1])
    assert {"imports", "data", "init", "train loop", "evaluation", "checkpoint", "rest"} <= set(phases)
    total = phases.pop("total (from this script's start)")
    assert all(v >= 0 for v in phases.values()) and abs(sum(phases.values()) - total) < 0.05
    assert list(tmp_path.glob("*.msgpack"))  # it ran the real command
