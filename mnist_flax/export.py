"""Weights in the original PyTorch layout (safetensors or npz) or as an ONNX model, and back to Flax.

    python -m mnist_flax.export CHECKPOINT_OR_DIR [--format {safetensors,npz,onnx}] [-o PATH]
    python -m mnist_flax.export --from-torch WEIGHTS.safetensors -o OUT.msgpack

`--format onnx` writes the whole eval-mode network (onnx_graph.py), not a state dict: uint8
pixels (N, 28, 28, 1) in, logits (N, 10) out. It is checked by onnx.checker and, before the
file is written, against the Flax model in onnxruntime. It needs the `onnx` extra.

The exported keys are exactly the state_dict of the PyTorch original
(pytorch_original/model.py in the repository), so `load_state_dict(..., strict=True)`
accepts them and the network gives the same logits in eval mode. Inputs stay as in the
original: NCHW float32, normalised outside the model as (x / 255 - 0.1307) / 0.3081.

Layout differences the conversion undoes, layer by layer in the model's own order:
  conv kernels   Flax HWIO -> PyTorch OIHW
  dense kernel   Flax (in, out) -> PyTorch (out, in); the layer after the flatten also has
                 its inputs reordered: Flax flattens NHWC activations as (h, w, c), PyTorch
                 flattens NCHW as (c, h, w). The (h, w, c) shape is read off the model.
  BatchNorm      scale/bias -> weight/bias; mean/var -> running_mean/running_var;
                 plus `num_batches_tracked`, which Flax does not keep (it only matters
                 to PyTorch when momentum=None, which the original doesn't use).

Reading never unpickles: safetensors is a JSON header plus raw bytes, and npz is
opened with allow_pickle=False. Every file is checked key by key, shape by shape,
before anything of it is used.
"""

import datetime as dt
import functools
import io
import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import safetensors
import safetensors.numpy

from mnist_flax import __version__, checkpoint, cli, sidecar
from mnist_flax.atomic import atomic_write_bytes
from mnist_flax.config import IMAGE_SHAPE
from mnist_flax.errors import CheckpointError, MnistFlaxError, missing_path

if TYPE_CHECKING:
    import jax

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
# Our safetensors header is ~2 KB of JSON; safetensors itself allows 100 MB,
# which is far more than we will parse from a file someone handed us.
MAX_HEADER_BYTES = 64 * 1024
MAX_FILE_BYTES = checkpoint.MAX_BYTES
SAFETENSORS_DTYPES = {"F32": np.float32, "I64": np.int64}
LAYOUT_NOTE = ("PyTorch state_dict of OriginalNet (pytorch_original/model.py): conv weights OIHW; fc.weight "
               "(out, in) with inputs in torch.flatten order of NCHW (c, h, w); inputs NCHW float32 "
               "normalised as (x/255 - 0.1307)/0.3081; eval mode uses running BatchNorm statistics")


# --- pure conversions --------------------------------------------------------------

@functools.cache
def fc_input_hwc() -> tuple[int, int, int]:
    """(H, W, C) of the activation the model flattens into its dense layer, from an abstract run."""
    import jax

    from mnist_flax.model import CNN, example_images

    _, state = jax.eval_shape(lambda v: CNN().apply(v, example_images(), train=False, mutable=["intermediates"]),
                              checkpoint.model_template())
    return tuple(state["intermediates"]["fc_input"][0].shape[1:])


def fc_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax (h*w*c, out) -> PyTorch (out, c*h*w): torch[o, (c*H + h)*W + w] = flax[(h*W + w)*C + c, o]."""
    h, w, c = fc_input_hwc()
    return kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, h * w * c)


def fc_weight_to_flax(weight: np.ndarray) -> np.ndarray:
    """The inverse of fc_kernel_to_torch."""
    h, w, c = fc_input_hwc()
    return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    if kernel.ndim == 4:  # conv: HWIO -> OIHW
        return kernel.transpose(3, 2, 0, 1)
    return fc_kernel_to_torch(kernel) if kernel.shape[0] == math.prod(fc_input_hwc()) else kernel.T


def _weight_to_flax(weight: np.ndarray) -> np.ndarray:
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    return fc_weight_to_flax(weight) if weight.shape[1] == math.prod(fc_input_hwc()) else weight.T


def flax_to_torch_state(variables: dict, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """{'params', 'batch_stats'} -> the original network's state_dict, as numpy arrays."""
    import jax

    from mnist_flax.model import layer_order

    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    state = {}
    for name in layer_order():
        layer = params[name]
        if name in stats:  # BatchNorm
            state[f"{name}.weight"], state[f"{name}.bias"] = layer["scale"], layer["bias"]
            state[f"{name}.running_mean"], state[f"{name}.running_var"] = stats[name]["mean"], stats[name]["var"]
            state[f"{name}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
        else:  # conv or dense
            state[f"{name}.weight"], state[f"{name}.bias"] = _kernel_to_torch(layer["kernel"]), layer["bias"]
    # safetensors and torch want contiguous buffers; the transposes above are views.
    # (Not np.ascontiguousarray: it turns the 0-d num_batches_tracked into shape (1,).)
    return {k: np.array(v, order="C") for k, v in state.items()}


def torch_state_to_flax(state: dict[str, np.ndarray]) -> dict:
    """The inverse of flax_to_torch_state (num_batches_tracked is dropped). Assumes a checked state."""
    from mnist_flax.model import layer_order

    params, stats = {}, {}
    template = checkpoint.model_template()
    for name in layer_order():
        if name in template["batch_stats"]:
            params[name] = {"scale": np.array(state[f"{name}.weight"]), "bias": np.array(state[f"{name}.bias"])}
            stats[name] = {"mean": np.array(state[f"{name}.running_mean"]),
                           "var": np.array(state[f"{name}.running_var"])}
        else:
            params[name] = {"kernel": np.array(_weight_to_flax(state[f"{name}.weight"]), order="C"),
                            "bias": np.array(state[f"{name}.bias"])}
    return {"params": params, "batch_stats": stats}


def torch_template() -> "dict[str, jax.ShapeDtypeStruct]":
    """Key -> shape and dtype of the original state_dict, derived from the Flax model itself."""
    import jax

    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), checkpoint.model_template())
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flax_to_torch_state(zeros).items()}


def check_torch_state(state: dict, source: str) -> None:
    """Raises CheckpointError unless `state` has exactly the original's keys, shapes, dtypes; all finite."""
    template = torch_template()
    missing, extra = sorted(set(template) - set(state)), sorted(set(state) - set(template))
    if missing or extra:
        raise CheckpointError(f"{source}: not a state_dict of the original network: "
                              f"missing {missing or 'nothing'}, unexpected {extra[:10] or 'nothing'}")
    for key, want in template.items():
        got = state[key]
        if not isinstance(got, np.ndarray):
            raise CheckpointError(f"{source}: {key} is a {type(got).__name__}, not an array")
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{source}: {key} is {got.dtype}{list(got.shape)}, "
                                  f"the model needs {want.dtype}{list(want.shape)}")
        if not np.all(np.isfinite(got)):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values")
        if key.endswith("num_batches_tracked") and got < 0:
            raise CheckpointError(f"{source}: {key} is negative ({int(got)})")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def num_batches_from_sidecar(record: dict | None) -> tuple[int, str]:
    """BatchNorm's num_batches_tracked for a run, and where the number came from."""
    record = record or {}
    known = record.get("num_batches_tracked")
    if _whole(known) and known >= 0:
        return known, "sidecar num_batches_tracked"
    return 0, "unknown (no num_batches_tracked in a sidecar): 0"


# --- files -------------------------------------------------------------------------

def state_to_safetensors(state: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    return safetensors.numpy.save(state, metadata={k: str(v) for k, v in metadata.items()})


def state_to_npz(state: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **state)
    return buf.getvalue()


class WeightsFile(NamedTuple):
    state: dict[str, np.ndarray]  # checked against the original network
    metadata: dict[str, str]  # safetensors' __metadata__; {} for npz
    sha256: str


def read_weights_file(path: str | Path) -> WeightsFile:
    """A .safetensors or .npz state_dict of the original network, checked; CheckpointError otherwise."""
    path = Path(path)
    data = checkpoint.read_checkpoint_bytes(path, missing="no such file")
    if data.startswith(b"PK"):  # npz is a zip; safetensors starts with its header length
        state, metadata = npz_from_bytes(data, str(path)), {}
    else:
        try:
            state, metadata = safetensors_from_bytes(data, str(path))
        except CheckpointError:
            if path.suffix.lower() != ".npz":
                raise
            # Said in the file's own terms: "too short for a safetensors file" would puzzle its owner.
            raise CheckpointError(f"{path}: not an npz file: an npz is a zip archive and this file does not "
                                  "start like one (nor is it safetensors); save the state_dict again with "
                                  "numpy.savez, or export a checkpoint with --format npz") from None
    check_torch_state(state, str(path))
    return WeightsFile(state, metadata, sidecar.sha256_hex(data))


def safetensors_from_bytes(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    # Check the length prefix ourselves so a hostile one is refused before anything is parsed.
    if len(data) < 8:
        raise CheckpointError(f"{source}: truncated: {len(data)} bytes is too short for a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{source}: safetensors header length {header_len:,} exceeds "
                              f"{MAX_HEADER_BYTES:,} bytes (not a safetensors file, or a hostile one)")
    if header_len > len(data) - 8:
        raise CheckpointError(f"{source}: truncated: header says {header_len:,} bytes, "
                              f"only {len(data) - 8:,} follow")
    try:
        header = json.loads(data[8:8 + header_len])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a 5000-digit number; [[[[...
        raise CheckpointError(
            f"{source}: safetensors header is not JSON ({type(e).__name__}: {e})"[:300]) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: safetensors header is not a JSON object")
    for key, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if key != "__metadata__" and not (isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES):
            raise CheckpointError(f"{source}: {key!r:.60} has dtype {dtype!r:.40}; the model needs "
                                  f"F32 weights (and I64 num_batches_tracked)")
    metadata = header.get("__metadata__") or {}
    try:
        state = safetensors.numpy.load(data)
    except Exception as e:  # SafetensorError and friends, for offsets that do not fit the file
        raise CheckpointError(f"{source}: corrupt safetensors data ({e})"[:300]) from None
    return state, metadata if isinstance(metadata, dict) else {}


def npz_from_bytes(data: bytes, source: str) -> dict[str, np.ndarray]:
    """The arrays of an npz (a zip of .npy members, as numpy.savez writes it), without pickle.

    Read in one pass: each member opened once, its header parsed once. Not np.load: it
    allocates the shape a member's header declares before reading any data, so each size has
    to be checked first, and its NpzFile opens every member three times. Members are named as
    np.load names them (without ".npy"); one that is no .npy is its bytes, as np.load leaves
    it, for check_torch_state to name.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            # Compressed, an npz can expand without bound: its entries' sizes first.
            _refuse_if_too_large(sum(info.file_size for info in infos), source)
            state, declared = {}, 0
            for info in infos:
                with zf.open(info) as f:
                    header = _read_npy_header(f, info.filename)
                    if header is None:
                        f.seek(0)
                        value = f.read()  # at most the size its zip entry declares, checked above
                    else:
                        declared += header.nbytes
                        _refuse_if_too_large(declared, source)  # before anything that large is allocated
                        value = _read_npy_data(f, header, info.filename)
                state[info.filename.removesuffix(".npy")] = value
            return state
    except CheckpointError:
        raise
    except Exception as e:  # BadZipFile, ValueError (object arrays, bad headers), EOFError, ...
        raise CheckpointError(f"{source}: unreadable npz ({type(e).__name__}: {e})"[:300]) from None


def _refuse_if_too_large(nbytes: int, source: str) -> None:
    if nbytes > MAX_FILE_BYTES:
        raise CheckpointError(f"{source}: npz unpacks to {nbytes:,} bytes; too large for the model's weights")


class _NpyHeader(NamedTuple):
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_npy_header(f, name: str) -> _NpyHeader | None:
    """An .npy member's header (numpy's parser, versions 1.0 and 2.0), or None for another file."""
    fmt = np.lib.format
    if f.read(len(fmt.MAGIC_PREFIX)) != fmt.MAGIC_PREFIX:
        return None
    version = tuple(f.read(2))
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{name}: unsupported .npy format version {version}")
    header = _NpyHeader(*(fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f))
    if header.dtype.hasobject:
        raise ValueError(f"{name}: Object arrays cannot be loaded when allow_pickle=False (they are pickles)")
    return header


def _read_npy_data(f, header: _NpyHeader, name: str) -> np.ndarray:
    """The array whose data follows `header` in `f`, as np.load builds it (writable, its memory order)."""
    if header.dtype.itemsize == 0:
        array = np.empty(math.prod(header.shape), header.dtype)
    else:
        raw = np.empty(header.nbytes, np.uint8)
        if f.readinto(raw) != raw.size:
            raise EOFError(f"{name}: the data is shorter than its header declares")
        array = raw.view(header.dtype)
    if header.fortran_order:
        return array.reshape(header.shape[::-1]).transpose()
    return array.reshape(header.shape)


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
