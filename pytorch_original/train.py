"""The original training loop: Adam (lr 0.01), batch 128, cross-entropy, one epoch on CPU.

    python -m pytorch_original.train [--data DIR] [--steps N] [--compile MODE] [--channels-last]

`--steps N` times N steady-state steps after `--warmup` untimed ones; without it one full
epoch runs and the test accuracy is measured. `--compile default` wraps the step in
torch.compile (inductor) and `--channels-last` keeps activations NHWC: the variants a
speed-minded PyTorch user would pick. Prints one JSON line whose `images_per_second`,
`seconds`, `timed_steps` and `params` mean what scripts/benchmark.py's do.
"""

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pytorch_original.model import OriginalNet, normalize

BATCH_SIZE, LEARNING_RATE = 128, 0.01
MANUAL_DIR_ENV = "MNIST_FLAX_MANUAL_DIR"  # where mnist_flax looks for the IDX files, too


def read_idx(directory: Path, name: str, header: int) -> np.ndarray:
    """An IDX file's payload, from NAME.gz or NAME in `directory`."""
    gz = directory / f"{name}.gz"
    raw = gzip.decompress(gz.read_bytes()) if gz.is_file() else (directory / name).read_bytes()
    return np.frombuffer(raw[header:], dtype=np.uint8)


def load(directory: Path) -> tuple[torch.Tensor, ...]:
    images = lambda name: torch.from_numpy(read_idx(directory, name, 16).reshape(-1, 1, 28, 28).copy())
    labels = lambda name: torch.from_numpy(read_idx(directory, name, 8).astype(np.int64))
    return (images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
            images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=os.environ.get(MANUAL_DIR_ENV),
                   help=f"folder with the four MNIST IDX files (default ${MANUAL_DIR_ENV})")
    p.add_argument("--steps", type=int, default=0, help="time this many steps (0: one full epoch)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", default="", help="torch.compile mode, e.g. default (empty: eager)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    a = p.parse_args()
    if a.data is None:
        p.error(f"give --data DIR or set {MANUAL_DIR_ENV}")
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    train_x, train_y, test_x, test_y = load(a.data)
    memory = torch.channels_last if a.channels_last else torch.contiguous_format
    model = OriginalNet().to(memory_format=memory)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def step(x, y):
        loss = F.cross_entropy(model(normalize(x)), y)
        loss.backward()
        return loss

    if a.compile:
        step = torch.compile(step, mode=a.compile)
    batches = torch.randperm(len(train_x)).split(BATCH_SIZE)
    if a.steps:
        batches = batches[:a.warmup + a.steps]
    model.train()
    start, images = time.perf_counter(), 0
    for k, idx in enumerate(batches):
        if k == a.warmup:
            start, images = time.perf_counter(), 0
        optimizer.zero_grad(set_to_none=True)
        step(train_x[idx].contiguous(memory_format=memory), train_y[idx])
        optimizer.step()
        images += len(idx)
    elapsed = time.perf_counter() - start
    out = {
        "impl": "torch-original" + (f"-compile-{a.compile}" if a.compile else "") + ("-cl" if a.channels_last else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "timed_steps": len(batches) - a.warmup,
        "seconds": round(elapsed, 3),
        "images_per_second": round(images / elapsed, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if not a.steps:
        model.eval()
        with torch.no_grad():
            out["test_accuracy"] = (model(normalize(test_x)).argmax(1) == test_y).float().mean().item()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
