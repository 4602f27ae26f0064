"""Runs every command with bad input and prints a Markdown table: case, message, exit code.

    python scripts/error_table.py [--manual-dir DIR] > docs/error_messages.md

Each case is a real `python -m mnist_flax.<command> ...` subprocess, run from the
repository root with no GitHub token, no $MNIST_FLAX_MANUAL_DIR and an empty
$TFDS_DATA_DIR (unless the case sets them); the "no network" cases route every request
to a closed local port, so they fail the same with internet as without. tests/test_cli_errors.py runs the
same cases and checks each: the exit code, exactly one line on stderr, no traceback,
and a phrase that says what to do.
"""

import argparse
import contextlib
import dataclasses
import gzip
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class Scene:
    """The files the cases point at, all under `root`."""

    root: Path
    mnist: Path  # the real MNIST IDX files
    missing_mnist: Path  # MNIST without t10k-labels
    corrupt_mnist: Path  # MNIST with one t10k label changed (right format, wrong sha256)
    empty_tfds: Path  # an empty TFDS data dir: MNIST must be prepared (and fails)
    prepared_tfds: Path  # a TFDS data dir with the real MNIST already prepared in it
    checkpoint: Path  # a valid checkpoint (untrained weights) with its sidecar
    corrupt_checkpoint: Path  # a valid checkpoint cut in half (no sidecar)
    tampered_checkpoint: Path  # a valid checkpoint with one byte changed, sidecar kept
    safetensors: Path  # the checkpoint's weights exported for PyTorch
    png: Path
    text: Path
    not_npz: Path  # a text file named .npz
    regular_file: Path  # a file where a directory is expected


@dataclasses.dataclass(frozen=True)
class Case:
    command: str  # the module: train, evaluate, export, predict, serve, artifact, model_card, site, publish
    what: str  # the bad input, in words
    argv: Callable[[Scene], list[str]]
    code: int  # the exit code it must give
    phrase: str  # what the one-line message must contain (case-insensitive)
    env: Callable[[Scene], dict[str, str]] = lambda s: {}


# "No network", made so rather than assumed: every HTTP(S) request goes to a proxy on a closed
# loopback port and is refused at once, on a machine with internet (a CI runner) as without.
NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
NO_NETWORK.update(NO_PROXY="", no_proxy="")


def _no_network(s: "Scene") -> dict[str, str]:
    return NO_NETWORK


def _train(*flags):
    return lambda s: ["--no-plots", "--no-progress", "--output-dir", str(s.root / "out"), *flags]


def _mnist(s: Scene, manual: Path) -> list[str]:
    data_dir = s.prepared_tfds if manual == s.mnist else s.root / f"tfds-{manual.name}"
    return ["--manual-dir", str(manual), "--data-dir", str(data_dir)]


CASES = [
    Case("train", "--batch-size 0", _train("--batch-size", "0"), 2, "batch size must be a whole number from 1"),
    Case("train", "--steps-per-call 0", _train("--steps-per-call", "0"), 2, "steps per call must be a whole number"),
    Case("train", "--label-smoothing 1.5", _train("--label-smoothing", "1.5"), 2, "label smoothing must be"),
    Case("train", "--ops bogus", _train("--ops", "bogus"), 2, "invalid choice: 'bogus'"),
    Case("train", "--learning-rate -1", _train("--learning-rate", "-1"), 2, "finite number > 0"),
    Case("train", "--learning-rate nan", _train("--learning-rate", "nan"), 2, "finite number > 0"),
    Case("train", "--learning-rate inf", _train("--learning-rate", "inf"), 2, "finite number > 0"),
    Case("train", "--epochs 0", _train("--epochs", "0"), 2, "epochs must be a whole number >= 1"),
    Case("train", "--epochs 1.5", _train("--epochs", "1.5"), 2, "invalid int value"),
    Case("train", "--train-examples -5", _train("--train-examples", "-5"), 2, "train examples must be"),
    Case("train", "--train-examples 70000 (more than MNIST has)",
         lambda s: _train("--train-examples", "70000")(s) + _mnist(s, s.mnist), 2, "more than the 60,000"),
    Case("train", "--seed 2**64", _train("--seed", str(2**64)), 2, "seed must be"),
    Case("train", "--recipe bogus", _train("--recipe", "bogus"), 2, "invalid choice: 'bogus'"),
    Case("train", "unknown flag --bogus", _train("--bogus"), 2, "unrecognized arguments: --bogus"),
    Case("train", "--checkpoint-every -1", _train("--checkpoint-every", "-1"), 2, "--checkpoint-every must be"),
    Case("train", "--resume with --epochs", lambda s: _train("--resume", str(s.root), "--epochs", "2")(s), 2,
         "drop --epochs"),
    Case("train", "MNIST file missing from --manual-dir", lambda s: _train()(s) + _mnist(s, s.missing_mnist), 1,
         "t10k-labels-idx1-ubyte (sha256 of the decompressed file: ff7bcfd4"),
    Case("train", "corrupt MNIST file (wrong sha256)", lambda s: _train()(s) + _mnist(s, s.corrupt_mnist), 1,
         "expected ff7bcfd4"),
    Case("train", "--manual-dir that does not exist", lambda s: _train()(s) + _mnist(s, s.root / "nowhere"), 1,
         "does not exist or is not a directory"),
    Case("train", "no network, no manual dir, empty TFDS_DATA_DIR", _train(), 1, "without network access",
         _no_network),
    Case("train", "--output-dir under a regular file", lambda s: ["--no-plots", "--no-progress", "--output-dir",
                                                                  str(s.regular_file / "out")], 1, "cannot be written"),
    Case("train", "--resume DIR without a resume state", lambda s: _train("--resume", str(s.root / "out"))(s), 1,
         "no resume state here"),
    Case("train", "--resume a PNG", lambda s: _train("--resume", str(s.png))(s), 1, "not an mnist_flax resume state"),
    Case("evaluate", "missing checkpoint", lambda s: [str(s.root / "nope.msgpack")], 1, "no such checkpoint"),
    Case("evaluate", "a relative path that does not exist", lambda s: ["no-such-run"], 1,
         "taken from the current directory"),
    Case("evaluate", "the sidecar (.json) instead of its checkpoint", lambda s: [str(s.checkpoint.with_suffix(".json"))],
         1, "is a checkpoint's sidecar (its metadata), not the checkpoint; give the .msgpack it describes"),
    Case("evaluate", "a PNG as checkpoint", lambda s: [str(s.png)], 1, "wrong file type"),
    Case("evaluate", "PyTorch weights (.safetensors) as checkpoint", lambda s: [str(s.safetensors)], 1,
         "export --from-torch"),
    Case("evaluate", "a directory without checkpoints", lambda s: [str(s.root / "mnist-missing")], 1,
         "no mnist_flax_*.msgpack in this directory; train one there with `python -m mnist_flax.train --output-dir "),
    Case("evaluate", "a text file as checkpoint", lambda s: [str(s.text)], 1, "wrong file type"),
    Case("evaluate", "a truncated checkpoint", lambda s: [str(s.corrupt_checkpoint)], 1, "corrupt msgpack data"),
    Case("evaluate", "a checkpoint that does not match its sidecar's sha256",
         lambda s: [str(s.tampered_checkpoint)], 1, "does not match its sidecar"),
    Case("evaluate", "MNIST file missing from --manual-dir",
         lambda s: [str(s.checkpoint), *_mnist(s, s.missing_mnist)], 1, "has neither t10k-labels-idx1-ubyte.gz"),
    Case("evaluate", "no network, no manual dir", lambda s: [str(s.checkpoint)], 1, "without network access",
         _no_network),
    Case("evaluate", "no CHECKPOINT argument", lambda s: [], 2, "required: checkpoint"),
    Case("export", "missing checkpoint", lambda s: [str(s.root / "nope.msgpack")], 1, "no such checkpoint"),
    Case("export", "a text file as checkpoint", lambda s: [str(s.text)], 1, "wrong file type"),
    Case("export", "a truncated checkpoint", lambda s: [str(s.corrupt_checkpoint)], 1, "corrupt msgpack data"),
    Case("export", "-o under a regular file", lambda s: [str(s.checkpoint), "-o", str(s.regular_file / "w.npz")],
         2, "a-file is not a directory"),
    Case("export", "--format bogus", lambda s: [str(s.checkpoint), "--format", "bogus"], 2, "invalid choice"),
    Case("export", "--from-torch a PNG", lambda s: ["--from-torch", str(s.png), "-o", str(s.root / "x.msgpack")],
         1, "safetensors header length"),
    Case("export", "--from-torch a text file named .npz",
         lambda s: ["--from-torch", str(s.not_npz), "-o", str(s.root / "x.msgpack")], 1, "not an npz file"),
    Case("export", "--from-torch a missing file",
         lambda s: ["--from-torch", str(s.root / "nope.npz"), "-o", str(s.root / "x.msgpack")], 1, "no such file"),
    Case("export", "--from-torch without -o", lambda s: ["--from-torch", str(s.png)], 2, "needs -o"),
    Case("export", "no CHECKPOINT argument", lambda s: [], 2, "give a CHECKPOINT"),
    Case("predict", "missing checkpoint", lambda s: [str(s.root / "nope.msgpack"), str(s.png)], 1,
         "no such checkpoint"),
    Case("predict", "a PNG as checkpoint", lambda s: [str(s.png), str(s.png)], 1, "wrong file type"),
    Case("predict", "a truncated checkpoint", lambda s: [str(s.corrupt_checkpoint), str(s.png)], 1,
         "corrupt msgpack data"),
    Case("predict", "a text file as the image", lambda s: [str(s.checkpoint), str(s.text)], 1,
         "not a readable PNG or JPEG"),
    Case("predict", "a missing image", lambda s: [str(s.checkpoint), str(s.root / "nope.png")], 1, "no such file"),
    Case("predict", "no IMAGE argument", lambda s: [str(s.checkpoint)], 2, "the first argument is the checkpoint"),
    Case("predict", "an image but no checkpoint", lambda s: [str(s.png)], 2, "the first argument is the checkpoint"),
    Case("export", "--format onnx with a truncated checkpoint",
         lambda s: [str(s.corrupt_checkpoint), "--format", "onnx"], 1, "corrupt msgpack data"),
    Case("serve", "missing checkpoint", lambda s: [str(s.root / "nope.msgpack")], 1, "no such checkpoint"),
    Case("serve", "a text file as checkpoint", lambda s: [str(s.text)], 1, "wrong file type"),
    Case("serve", "--port 70000", lambda s: [str(s.checkpoint), "--port", "70000"], 2, "not a port number"),
    Case("serve", "--host this machine does not have", lambda s: [str(s.checkpoint), "--host", "192.0.2.1"], 1,
         "cannot listen on 192.0.2.1"),
    Case("artifact", "no GitHub token", lambda s: ["owner/repo"], 1, "no GitHub token",
         lambda s: {"PATH": str(s.root / "no-gh")}),  # nor GitHub's CLI, whose token it would ask for
    Case("artifact", "not OWNER/REPO", lambda s: ["not-a-repo"], 2, "OWNER/REPO"),
    Case("artifact", "--timeout 0", lambda s: ["owner/repo", "--timeout", "0"], 2, "--timeout must be > 0"),
    Case("artifact", "--release with --branch", lambda s: ["owner/repo", "--release", "--branch", "dev"], 2,
         "a release is chosen by its tag"),
    Case("artifact", "--release, offline", lambda s: ["owner/repo", "--release"], 1, "could not reach api.github.com",
         lambda s: {**NO_NETWORK, "PATH": str(s.root / "no-gh")}),
    Case("model_card", "missing checkpoint", lambda s: [str(s.root / "nope.msgpack")], 1, "no such checkpoint"),
    Case("model_card", "a text file as checkpoint", lambda s: [str(s.text)], 1, "wrong file type"),
    Case("site", "missing checkpoint", lambda s: [str(s.root / "nope.msgpack")], 1, "no such checkpoint"),
    Case("site", "--onnxruntime-web a missing file",
         lambda s: [str(s.checkpoint), "--onnxruntime-web", str(s.root / "nope.tgz"), "-o", str(s.root / "site")], 2,
         "no such file"),
    Case("site", "--onnxruntime-web a PNG",
         lambda s: [str(s.checkpoint), "--onnxruntime-web", str(s.png), "-o", str(s.root / "site")], 1,
         "its sha512 differs"),
    Case("site", "offline, no onnxruntime-web package", lambda s: [str(s.checkpoint), "-o", str(s.root / "site")],
         1, "give it with --onnxruntime-web",
         lambda s: {**NO_NETWORK, "XDG_CACHE_HOME": str(s.root / "empty-cache")}),
    Case("publish", "--commit that is no sha", lambda s: [str(s.root), "--commit", "main"], 2, "--commit must be"),
    Case("publish", "a directory without checkpoints", lambda s: [str(s.root / "mnist-missing"), "--commit", "4c70d2d"],
         1, "no mnist_flax_*.msgpack"),
]


def case_id(case: Case) -> str:
    return f"{case.command}: {case.what}"


# --- the scene -----------------------------------------------------------------------

def make_scene(root: Path, mnist: Path, prepared_tfds: Path | None = None) -> Scene:
    """Writes every bad input the cases use under `root`; prepares MNIST unless given `prepared_tfds`."""
    from PIL import Image

    from mnist_flax import checkpoint, sidecar, torch_layout, weight_files
    from mnist_flax.model import init_variables
    import jax

    root.mkdir(parents=True, exist_ok=True)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    missing, corrupt = root / "mnist-missing", root / "mnist-corrupt"
    for d in (missing, corrupt):
        d.mkdir(exist_ok=True)
    for name in names:
        src = next(p for p in (mnist / f"{name}.gz", mnist / name) if p.is_file())
        if name != "t10k-labels-idx1-ubyte":
            for d in (missing, corrupt):
                (d / src.name).unlink(missing_ok=True)
                (d / src.name).symlink_to(src.resolve())
    labels = bytearray(_read_idx(mnist, "t10k-labels-idx1-ubyte"))
    labels[8] = (labels[8] + 1) % 10  # still a valid label: only the sha256 can tell
    (corrupt / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    empty_tfds = root / "tfds-empty"
    empty_tfds.mkdir(exist_ok=True)
    if prepared_tfds is None:
        from mnist_flax.data import load_mnist
        prepared_tfds = root / "tfds-prepared"
        with contextlib.redirect_stdout(sys.stderr):  # TFDS reports on stdout, which is the table
            load_mnist(data_dir=str(prepared_tfds), manual_dir=str(mnist))

    ckpt_dir = root / "ckpt"
    ckpt_dir.mkdir(exist_ok=True)
    for old in ckpt_dir.iterdir():
        old.unlink()
    ckpt = checkpoint.save_checkpoint(ckpt_dir, init_variables(jax.random.key(0)), {"test_accuracy": 0.1})
    data = ckpt.read_bytes()
    corrupt_ckpt = root / "truncated.msgpack"
    corrupt_ckpt.write_bytes(data[:len(data) // 2])
    tampered = root / "tampered.msgpack"
    tampered.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    shutil.copy(sidecar.path_for(ckpt), sidecar.path_for(tampered))
    weights = root / "weights.safetensors"
    weights.write_bytes(weight_files.state_to_safetensors(torch_layout.flax_to_torch_state(init_variables(jax.random.key(0))), {}))
    png = root / "digit.png"
    Image.new("L", (28, 28)).save(png)
    text = root / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    not_npz = root / "weights.npz"
    not_npz.write_text("these are not weights\n")
    regular = root / "a-file"
    regular.write_text("x")
    return Scene(root, mnist, missing, corrupt, empty_tfds, prepared_tfds, ckpt, corrupt_ckpt, tampered, weights, png,
                 text, not_npz, regular)


def _read_idx(mnist: Path, name: str) -> bytes:
    gz = mnist / f"{name}.gz"
    return gzip.decompress(gz.read_bytes()) if gz.is_file() else (mnist / name).read_bytes()


def base_env(scene: Scene) -> dict[str, str]:
    """No manual dir, no token, an empty TFDS data dir."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MNIST_FLAX_MANUAL_DIR", "GITHUB_TOKEN", "GH_TOKEN", "MNIST_FLAX_GITHUB_API")}
    env.update(TFDS_DATA_DIR=str(scene.empty_tfds), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return env


# --- running -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_subprocess(case: Case, scene: Scene) -> Result:
    env = {**base_env(scene), **case.env(scene)}
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", f"mnist_flax.{case.command}", *case.argv(scene)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - start)


def run_in_process(case: Case, scene: Scene) -> Result:
    """The same through `cli.run_main(main, argv)`, without a new interpreter (for the tests)."""
    from mnist_flax import cli

    module = importlib.import_module(f"mnist_flax.{case.command}")
    env = {**base_env(scene), **case.env(scene)}
    saved_env, saved_signals = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.run_main(module.main, case.argv(scene))
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in saved_signals.items():  # train turns signals into a flag
            signal.signal(s, handler)
    return Result(code, out.getvalue(), err.getvalue(), time.monotonic() - start)


def message_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def markdown(rows: list[tuple[Case, Result]], scene: Scene) -> str:
    def clean(text: str) -> str:
        text = text.replace(str(scene.root), "$TMP").replace(str(scene.mnist.resolve()), "$MNIST")
        return text.replace(str(scene.mnist), "$MNIST").replace(str(REPO), "$REPO").replace("|", "\\|")

    lines = [
        "# Error messages",
        "",
        "Every command-line error is one line on stderr that names the problem and what to do;",
        "the exit status is 2 for a usage error, 1 for a runtime failure; no traceback unless",
        "`--debug`. Generated by `python scripts/error_table.py > docs/error_messages.md`, which",
        "runs each case as a real subprocess with no GitHub token, no `$MNIST_FLAX_MANUAL_DIR`",
        "and an empty `$TFDS_DATA_DIR` (\"no network\": every request goes to a closed local port);",
        "`tests/test_cli_errors.py` checks the same cases. `$TMP` is the scratch directory the bad",
        "inputs were written to, `$REPO` the repository root the commands ran in.",
        "",
        "| command | bad input | message (stderr) | exit |",
        "|---|---|---|---|",
    ]
    for case, result in rows:
        message = " / ".join(message_lines(result.stderr))
        lines.append(f"| {case.command} | {clean(case.what)} | `{clean(message)}` | {result.code} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manual-dir", type=Path, default=os.environ.get("MNIST_FLAX_MANUAL_DIR"),
                   help="the real MNIST IDX files (default $MNIST_FLAX_MANUAL_DIR)")
    args = p.parse_args()
    if args.manual_dir is None:
        p.error("give --manual-dir DIR or set MNIST_FLAX_MANUAL_DIR: the cases need the real MNIST files")
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="mnist-flax-errors-") as tmp:
        scene = make_scene(Path(tmp), args.manual_dir)
        rows = []
        for case in CASES:
            result = run_subprocess(case, scene)
            print(f"{case_id(case)}: exit {result.code} in {result.seconds:.1f} s", file=sys.stderr)
            rows.append((case, result))
        print(markdown(rows, scene), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
