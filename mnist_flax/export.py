"""Weights in the original PyTorch layout (safetensors or npz) or as an ONNX model, and back to Flax.

    python -m mnist_flax.export CHECKPOINT_OR_DIR [--format {safetensors,npz,onnx}] [-o PATH]
    python -m mnist_flax.export --from-torch WEIGHTS.safetensors -o OUT.msgpack

`--format onnx` writes the whole eval-mode network (onnx_graph.py), not a state dict: uint8
pixels (N, 28, 28, 1) in, logits (N, 10) out. It is checked by onnx.checker and, before the
file is written, against the Flax model in onnxruntime. It needs the `onnx` extra.

The keys are exactly the state_dict of the PyTorch original (torch_layout.py converts them;
weight_files.py writes and reads the files, never unpickling).
"""

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnist_flax import __version__, checkpoint, cli, sidecar
from mnist_flax.atomic import atomic_write_bytes
from mnist_flax.config import IMAGE_SHAPE
from mnist_flax.errors import MnistFlaxError, missing_path
from mnist_flax.torch_layout import LAYOUT_NOTE, flax_to_torch_state, torch_state_to_flax
from mnist_flax.weight_files import read_weights_file, state_to_npz, state_to_safetensors

# JAX, flax and the model are imported where weights are converted or checked, as in
# checkpoint.py: `--help`, a usage error and a file that is no weights file answer without them.

FORMATS = {"safetensors": ".safetensors", "npz": ".npz", "onnx": ".onnx"}
ONNX_EXTRA = "pip install 'mnist-flax[onnx]'"
ONNX_LAYOUT_NOTE = ("input 'images': uint8 (N, 28, 28, 1) NHWC pixels 0..255, a white digit on black as in MNIST "
                    "(mnist_flax.predict prepares photos and drawings so); normalised inside the graph. "
                    "output 'logits': float32 (N, 10); softmax gives the probabilities. Eval mode (running "
                    "BatchNorm statistics)")
ONNX_CHECK_IMAGES = 256  # random uint8 images every ONNX export is checked on before it is written
ONNX_LOGIT_TOLERANCE = 1e-4


def num_batches_from_sidecar(record: dict | None) -> tuple[int, str]:
    """BatchNorm's num_batches_tracked for a run, and where the number came from."""
    record = record or {}
    known = record.get("num_batches_tracked")
    if isinstance(known, int) and not isinstance(known, bool) and known >= 0:
        return known, "sidecar num_batches_tracked"
    return 0, "unknown (no num_batches_tracked in a sidecar): 0"


def export_checkpoint(path: str | Path, fmt: str, output: str | Path | None = None) -> tuple[Path, int, str]:
    """Writes the checkpoint in `fmt`; returns (path, num_batches_tracked, its source)."""
    path = checkpoint.find(path)
    variables, record = checkpoint.load_checkpoint(path)
    steps, steps_source = num_batches_from_sidecar(record)
    out = Path(output) if output else path.with_suffix(FORMATS[fmt])
    check_output_dir(out)
    if fmt == "onnx":  # the network itself; BatchNorm's update count is not part of it
        atomic_write_bytes(out, onnx_bytes(variables, path, record))
        return out, steps, steps_source
    state = flax_to_torch_state(variables, steps)
    if fmt == "npz":
        # npz has no metadata slot, and an extra array would break load_state_dict(strict=True).
        data = state_to_npz(state)
    else:
        source_sha = sidecar.sha256_hex(path.read_bytes())
        metadata = {
            "format": "pytorch_state_dict",
            "layout": LAYOUT_NOTE,
            "source_checkpoint": path.name,
            "source_sha256": source_sha,
            "num_batches_tracked": f"{steps} ({steps_source})",
            "exported_by": f"mnist_flax {__version__}",
            "exported": checkpoint.utc_now_iso(),
        }
        if record and "test_accuracy" in record:
            metadata["test_accuracy"] = repr(record["test_accuracy"])
        data = state_to_safetensors(state, metadata)
    atomic_write_bytes(out, data)
    return out, steps, steps_source


def onnx_bytes(variables: dict, path: Path, record: dict | None) -> bytes:
    """The serialised ONNX model of the checkpoint at `path`, checked in onnxruntime against Flax."""
    import jax

    try:
        import onnxruntime

        from mnist_flax import onnx_graph, step
    except ImportError as e:
        raise MnistFlaxError(f"--format onnx needs the onnx extra ({e.name} is not installed): {ONNX_EXTRA}") from None
    metadata = {"layout": ONNX_LAYOUT_NOTE, "source_checkpoint": path.name,
                "source_sha256": sidecar.sha256_hex(path.read_bytes()), "opset": str(onnx_graph.OPSET),
                "exported_by": f"mnist_flax {__version__}", "exported": checkpoint.utc_now_iso()}
    if record and "test_accuracy" in record:
        metadata["test_accuracy"] = repr(record["test_accuracy"])
    data = onnx_graph.to_onnx(variables, metadata).SerializeToString()
    images = np.random.default_rng(0).integers(0, 256, (ONNX_CHECK_IMAGES, *IMAGE_SHAPE), np.uint8)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([onnx_graph.OUTPUT], {onnx_graph.INPUT: images})[0]
    logits = jax.jit(step.predict_logits, static_argnames="model")  # one program, not one per op
    want = np.asarray(logits(variables, images, model=checkpoint.network_for(record)))
    if np.abs(got - want).max() > ONNX_LOGIT_TOLERANCE or (got.argmax(1) != want.argmax(1)).any():
        raise MnistFlaxError(f"the ONNX graph's logits differ from the Flax model's by {np.abs(got - want).max():.2g} "
                             f"on check images (tolerance {ONNX_LOGIT_TOLERANCE}); nothing was written. "
                             "This is a bug in mnist_flax's ONNX translation: please report it")
    return data


def import_weights(path: str | Path, output: str | Path) -> Path:
    """Writes a validated Flax checkpoint (msgpack + sidecar) from a PyTorch state_dict file."""
    path, output = Path(path), Path(output)
    weights = read_weights_file(path)
    variables = torch_state_to_flax(weights.state)
    checkpoint.check_variables(variables, checkpoint.model_template(), str(path))
    tracked = next(v for k, v in weights.state.items() if k.endswith(".num_batches_tracked"))
    fields = {"imported_from": path.name, "source_sha256": weights.sha256, "num_batches_tracked": int(tracked)}
    accuracy = _float_or_none(weights.metadata.get("test_accuracy"))
    if accuracy is not None:
        fields["test_accuracy"] = accuracy
    if output.is_dir():
        if accuracy is None:
            raise cli.UsageError(f"{path} carries no test accuracy to name the checkpoint by; "
                                 f"give -o a file name, not the directory {output}")
        output = output / checkpoint.checkpoint_name(dt.datetime.now(dt.timezone.utc), accuracy)
    if output.resolve() == path.resolve():
        raise cli.UsageError(f"-o {output} would overwrite the input")
    check_output_dir(output)
    data = checkpoint.variables_to_bytes(variables)
    atomic_write_bytes(output, data)
    sidecar.write(output, data, {**fields, "created": checkpoint.utc_now_iso()})
    return output


def check_output_dir(output: Path) -> None:
    if not output.parent.is_dir():
        exists = output.parent.exists()
        parent = output.parent if exists else missing_path(output.parent)
        raise cli.UsageError(f"-o {output}: {parent} {'is not a directory' if exists else 'does not exist'}; "
                             "create the directory or choose another -o")
    if output.is_dir():
        raise cli.UsageError(f"-o {output} is a directory; give a file name")


def _float_or_none(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 1.0 else None


# --- command line ------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT_OR_DIR",
                   help="a .msgpack written by mnist_flax.train, or a directory (its newest one is used)")
    p.add_argument("--format", choices=sorted(FORMATS), default=None,
                   help="default: from -o's suffix, else safetensors")
    p.add_argument("-o", "--output", default=None,
                   help="output file (export default: the checkpoint's stem + .safetensors/.npz)")
    p.add_argument("--from-torch", metavar="WEIGHTS", default=None,
                   help="import a PyTorch state_dict (.safetensors or .npz) into a Flax checkpoint at -o")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if args.from_torch:
        if args.checkpoint or args.format:
            raise cli.UsageError("--from-torch takes no CHECKPOINT or --format; it writes a .msgpack at -o")
        if not args.output:
            raise cli.UsageError("--from-torch needs -o OUT.msgpack")
        out = import_weights(args.from_torch, args.output)
        print(f"wrote {out} (and {sidecar.path_for(out).name})")
        return 0
    if not args.checkpoint:
        raise cli.UsageError("give a CHECKPOINT to export, or --from-torch WEIGHTS -o OUT.msgpack")
    by_suffix = {suffix: name for name, suffix in FORMATS.items()}
    fmt = args.format or by_suffix.get(Path(args.output or "").suffix, "safetensors")
    out, steps, steps_source = export_checkpoint(args.checkpoint, fmt, args.output)
    if fmt == "onnx":
        print(f"wrote {out} (ONNX, uint8 NHWC images in, logits out; checked in onnxruntime)")
    else:
        print(f"wrote {out} ({fmt}, PyTorch layout; num_batches_tracked={steps}: {steps_source})")
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
