"""A load test of the serving API on loopback: concurrent clients posting real MNIST digits.

    python scripts/load_test.py CHECKPOINT_OR_DIR [--clients 8] [--seconds 20] [--manual-dir DIR]
    python scripts/load_test.py --url http://127.0.0.1:8000/ [--clients 8] [--seconds 20]

Starts `python -m mnist_flax.serve CHECKPOINT --port 0` (or uses --url), then each client
thread keeps one HTTP/1.1 connection and posts PNGs of the first test images in a loop for
the given time. Prints one JSON line: requests, requests per second, p50/p99 latency in ms,
errors (any status but 200, or a failed connection) and how many answers were wrong digits.
tests/test_serve.py runs it briefly and checks only that nothing failed; numbers belong in
docs/performance.md.
"""

import argparse
import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DIGITS = 100  # distinct test images the clients cycle through
START_TIMEOUT_S = 120


def digit_pngs(images: np.ndarray, labels: np.ndarray, count: int = DIGITS) -> list[tuple[bytes, int]]:
    """The first `count` images (uint8, N x 28 x 28 x 1) as PNG bodies, with their labels."""
    from PIL import Image

    out = []
    for image, label in zip(images[:count], labels[:count]):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image)[:, :, 0]).save(buf, format="PNG")
        out.append((buf.getvalue(), int(label)))
    return out


def client(url: str, bodies: list[tuple[bytes, int]], deadline: float, offset: int, out: dict) -> None:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    latencies, errors, wrong, i = [], 0, 0, offset
    while time.perf_counter() < deadline:
        body, label = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        try:
            conn.request("POST", "/api/predict", body, {"Content-Type": "image/png"})
            response = conn.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            continue
        latencies.append(time.perf_counter() - start)
        if response.status != 200:
            errors += 1
        elif json.loads(answer)["digit"] != label:
            wrong += 1
    conn.close()
    out[offset] = (latencies, errors, wrong)


def run(url: str, bodies: list[tuple[bytes, int]], clients: int, seconds: float) -> dict:
    """Runs the load; returns the summary (latencies in ms)."""
    results: dict = {}
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(url, bodies, deadline, k, results)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies = np.array([x for lat, _, _ in results.values() for x in lat]) * 1000
    requests = len(latencies) + sum(e for _, e, _ in results.values())
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": requests,
            "requests_per_second": round(requests / elapsed, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2) if len(latencies) else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 2) if len(latencies) else None,
            "errors": sum(e for _, e, _ in results.values()),
            "wrong_digits": sum(w for _, _, w in results.values())}


def start_server(checkpoint: str) -> tuple[subprocess.Popen, str]:
    """`python -m mnist_flax.serve CHECKPOINT --port 0`, and its URL once it says it is serving."""
    proc = subprocess.Popen([sys.executable, "-m", "mnist_flax.serve", checkpoint, "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()  # the server's first line, printed when it is ready
    if " at http://" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r} (exit status {proc.wait(START_TIMEOUT_S)})")
    return proc, line.split(" at ", 1)[1].split()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", help="serve this checkpoint for the test")
    p.add_argument("--url", help="test a server already running here instead")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--manual-dir", default=None, help="folder with the four MNIST IDX files")
    args = p.parse_args()
    if bool(args.checkpoint) == bool(args.url):
        p.error("give a CHECKPOINT_OR_DIR to serve, or --url of a running server")
    from mnist_flax import data
    mnist = data.load_mnist(manual_dir=args.manual_dir)
    bodies = digit_pngs(mnist.test_images, mnist.test_labels)
    proc, url = start_server(args.checkpoint) if args.checkpoint else (None, args.url)
    try:
        print(json.dumps(run(url, bodies, args.clients, args.seconds)))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
