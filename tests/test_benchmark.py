"""scripts/benchmark.py runs the training loop's own calls and reports what it timed."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def benchmark(data_dir, manual_dir, *args):
    return subprocess.run([sys.executable, "scripts/benchmark.py", "--data-dir", str(data_dir),
                           "--manual-dir", str(manual_dir), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_reports_the_steps_it_timed(mnist_data_dir, mnist_manual_dir):
    # Warm-up 1 ends with the first call (steps 1-4); 9 ends with the third (9-12): 8 steps timed.
    result = benchmark(mnist_data_dir, mnist_manual_dir, "--warmup", "1", "--steps", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["timed_steps"] == 8 and report["steps_per_call"] == 4 and report["params"] == 8954
    assert report["devices"] == 1 and report["images_per_second"] > 0 and report["eval_images_per_second"] > 0
    # `seconds` is rounded to the millisecond; images per second comes from the exact time.
    assert abs(report["images_per_second"] - 8 * 128 / report["seconds"]) < 0.01 * report["images_per_second"]
    assert "ynn_fusion_type" in report["xla_flags"] and report["jax"]


def test_rejects_a_window_longer_than_the_epoch(mnist_data_dir, mnist_manual_dir):
    result = benchmark(mnist_data_dir, mnist_manual_dir, "--steps", "500")
    assert result.returncode == 2 and "must fit in one epoch (469 steps of 128)" in result.stderr
