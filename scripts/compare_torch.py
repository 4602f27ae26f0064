"""mnist-flax against the PyTorch original on this machine: the whole command and the step loop.

    python scripts/compare_torch.py [--rounds 5] [--parts command,cold,steps] [--steps 200]

Each round runs, in an order that rotates from round to round:

- command: `python -m mnist_flax.train` (default flags, plots included) with a warm
  compilation cache, and the original's full epoch (`python -m pytorch_original.train`),
  each timed from process start to exit;
- cold: the same train command with an empty compilation cache (a first run);
- steps: the step loop, `scripts/benchmark.py --steps N` against the original's
  `--steps N` eager, with `--compile default` and with `--channels-last`.

Every round also records `matmul_gflops`, JAX's f32 matmul rate at that moment: shared
machines have slow periods (here 120-190 GFLOP/s against 467), and a ratio means more with
the speed it was measured at.

One JSON line per round, then one with the medians. Ratios are taken within a round
(the machine's speed drifts between rounds), then their median. MNIST comes from
$MNIST_FLAX_MANUAL_DIR (or --manual-dir); an untimed first train run prepares it and warms
the cache. Every command runs in a temporary directory that is removed afterwards.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCH_VARIANTS = {"eager": [], "compile": ["--compile", "default"], "channels_last": ["--channels-last"]}


def matmul_probe(n: int = 2048, repeats: int = 20) -> str:
    """A program that prints the machine's compute rate now, in GFLOP/s: the median of `repeats`
    jitted n x n f32 matmuls."""
    return f"""
import statistics, time, jax, jax.numpy as jnp
n = {n}
a = jnp.ones((n, n), jnp.float32)
f = jax.jit(lambda a: a @ a)
f(a).block_until_ready()
seconds = []
for _ in range({repeats}):
    start = time.perf_counter()
    f(a).block_until_ready()
    seconds.append(time.perf_counter() - start)
print(round(2 * n**3 / statistics.median(seconds) / 1e9, 1))
"""


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"compare_torch: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return seconds, p.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--parts", default="command,cold,steps", help="comma-separated: command, cold, steps")
    p.add_argument("--steps", type=int, default=200, help="timed steps of the step-loop comparison")
    p.add_argument("--manual-dir", default=os.environ.get("MNIST_FLAX_MANUAL_DIR"),
                   help="folder with the four MNIST IDX files (default $MNIST_FLAX_MANUAL_DIR)")
    a = p.parse_args()
    parts = [part.strip() for part in a.parts.split(",") if part.strip()]
    if a.manual_dir is None or not set(parts) <= {"command", "cold", "steps"} or a.rounds < 1:
        p.error("give --manual-dir (or set MNIST_FLAX_MANUAL_DIR), --rounds >= 1, --parts from command,cold,steps")

    with tempfile.TemporaryDirectory(prefix="compare-torch-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MNIST_FLAX_MANUAL_DIR": a.manual_dir, "TFDS_DATA_DIR": str(tmp / "tfds"),
               "MNIST_FLAX_COMPILATION_CACHE": str(tmp / "warm-cache"), "PYTHONPATH": str(REPO)}
        train = [sys.executable, "-m", "mnist_flax.train", "--output-dir", str(tmp / "out"), "--no-progress"]
        torch_cmd = [sys.executable, "-m", "pytorch_original.train", "--data", a.manual_dir]
        timed(train, env, REPO)  # untimed: prepares MNIST and fills the warm cache

        jobs = {"matmul_gflops": lambda r: float(timed([sys.executable, "-c", matmul_probe()], env, REPO)[1])}
        if "command" in parts:
            jobs["flax_warm_s"] = lambda r: timed(train, env, REPO)[0]
            jobs["torch_epoch_s"] = lambda r: timed(torch_cmd, env, REPO)[0]
        if "cold" in parts:
            jobs["flax_cold_s"] = lambda r: timed(
                train, {**env, "MNIST_FLAX_COMPILATION_CACHE": str(tmp / f"cold-cache-{r}")}, REPO)[0]
            if "command" not in parts:
                jobs["torch_epoch_s"] = lambda r: timed(torch_cmd, env, REPO)[0]
        if "steps" in parts:
            bench = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--steps", str(a.steps)]
            jobs["flax_steps_ips"] = lambda r: last_json(timed(bench, env, REPO)[1])["images_per_second"]
            for name, flags in TORCH_VARIANTS.items():
                cmd = [*torch_cmd, "--steps", str(a.steps), *flags]
                jobs[f"torch_{name}_ips"] = lambda r, cmd=cmd: last_json(timed(cmd, env, REPO)[1])["images_per_second"]

        rounds = []
        names = list(jobs)
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # alternate who goes first
            row = {"round": r + 1}
            for name in order:
                row[name] = round(jobs[name](r), 3)
            add_ratios(row)
            rounds.append(row)
            print(json.dumps(row), flush=True)
        keys = [k for k in rounds[0] if k != "round"]
        print(json.dumps({"median": {k: round(statistics.median(row[k] for row in rounds), 3) for k in keys},
                          "rounds": a.rounds, "steps": a.steps, "python": sys.version.split()[0]}))


def add_ratios(row: dict) -> None:
    """Within-round ratios: what the goals are stated in."""
    if "flax_warm_s" in row:
        row["warm_over_torch"] = round(row["flax_warm_s"] / row["torch_epoch_s"], 3)
    if "flax_cold_s" in row:
        row["cold_over_torch"] = round(row["flax_cold_s"] / row["torch_epoch_s"], 3)
    if "flax_steps_ips" in row:
        fastest = max(row[f"torch_{name}_ips"] for name in TORCH_VARIANTS)
        row["steps_over_fastest_torch"] = round(row["flax_steps_ips"] / fastest, 3)


if __name__ == "__main__":
    main()
