"""Weights in the original PyTorch layout (safetensors or npz), and back to a Flax checkpoint.

    python -m mnist_flax.export CHECKPOINT [--format {safetensors,npz}] [-o PATH]
    python -m mnist_flax.export --from-torch WEIGHTS.safetensors -o OUT.msgpack

The exported keys are exactly `SeedNet().state_dict()`'s in the original
PyTorch script, so `load_state_dict(..., strict=True)` accepts them and the
network gives the same logits in eval mode. Inputs stay as in the original:
NCHW float32, normalised outside the model as (x / 255 - 0.1307) / 0.3081.

Layout differences the conversion undoes:
  conv kernels   Flax HWIO            -> PyTorch OIHW
  fc kernel      Flax (512, 10) (in, out) -> PyTorch (10, 512) (out, in), and the
                 512 inputs reordered: Flax flattens NHWC activations as (h, w, c),
                 PyTorch flattens NCHW as (c, h, w).
  BatchNorm      scale/bias -> weight/bias; mean/var -> running_mean/running_var;
                 plus `num_batches_tracked`, which Flax does not keep (it only
                 matters to PyTorch when momentum=None, which the original doesn't use).

Reading never unpickles: safetensors is a JSON header plus raw bytes, and npz is
opened with allow_pickle=False. Every file is checked key by key, shape by shape,
before anything of it is used.
"""

import datetime as dt
import io
import json
import math
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import safetensors
import safetensors.numpy

from mnist_flax import __version__, checkpoint, cli
from mnist_flax.atomic import atomic_write_bytes, atomic_write_text
from mnist_flax.config import NUM_TRAIN_EXAMPLES
from mnist_flax.errors import CheckpointError
from mnist_flax.model import CONV_LAYERS

FORMATS = {"safetensors": ".safetensors", "npz": ".npz"}
NUM_LAYERS = len(CONV_LAYERS)
# conv5's output, (H, W, C) = (8, 8, 8), is what fc sees flattened.
FC_INPUT_HWC = (8, 8, CONV_LAYERS[-1][0])
# Our safetensors header is ~2 KB of JSON; safetensors itself allows 100 MB,
# which is far more than we will parse from a file someone handed us.
MAX_HEADER_BYTES = 64 * 1024
MAX_FILE_BYTES = checkpoint.MAX_CHECKPOINT_BYTES
SAFETENSORS_DTYPES = {"F32": np.float32, "I64": np.int64}
LAYOUT_NOTE = ("PyTorch state_dict of SeedNet (torch_seed.py): conv weights OIHW; fc.weight (out, in) "
               "with inputs in torch.flatten order of NCHW (c, h, w); inputs NCHW float32 "
               "normalised as (x/255 - 0.1307)/0.3081; eval mode uses running BatchNorm statistics")


# --- pure conversions --------------------------------------------------------------

def fc_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax (h*w*c, out) -> PyTorch (out, c*h*w): torch[o, c*64+h*8+w] = flax[h*64+w*8+c, o]."""
    h, w, c = FC_INPUT_HWC
    return kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, h * w * c)


def fc_weight_to_flax(weight: np.ndarray) -> np.ndarray:
    """The inverse of fc_kernel_to_torch."""
    h, w, c = FC_INPUT_HWC
    return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def flax_to_torch_state(variables: dict, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """{'params', 'batch_stats'} -> the original network's state_dict, as numpy arrays."""
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    state = {}
    for i in range(1, NUM_LAYERS + 1):
        conv, bn, bs = params[f"conv{i}"], params[f"bn{i}"], stats[f"bn{i}"]
        state[f"conv{i}.weight"] = conv["kernel"].transpose(3, 2, 0, 1)
        state[f"conv{i}.bias"] = conv["bias"]
        state[f"bn{i}.weight"] = bn["scale"]
        state[f"bn{i}.bias"] = bn["bias"]
        state[f"bn{i}.running_mean"] = bs["mean"]
        state[f"bn{i}.running_var"] = bs["var"]
        state[f"bn{i}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    state["fc.weight"] = fc_kernel_to_torch(params["fc"]["kernel"])
    state["fc.bias"] = params["fc"]["bias"]
    # safetensors and torch want contiguous buffers; the transposes above are views.
    # (Not np.ascontiguousarray: it turns the 0-d num_batches_tracked into shape (1,).)
    return {k: np.array(v, order="C") for k, v in state.items()}


def torch_state_to_flax(state: dict[str, np.ndarray]) -> dict:
    """The inverse of flax_to_torch_state (num_batches_tracked is dropped). Assumes a checked state."""
    params, stats = {}, {}
    for i in range(1, NUM_LAYERS + 1):
        params[f"conv{i}"] = {"kernel": np.array(state[f"conv{i}.weight"].transpose(2, 3, 1, 0), order="C"),
                              "bias": np.array(state[f"conv{i}.bias"])}
        params[f"bn{i}"] = {"scale": np.array(state[f"bn{i}.weight"]), "bias": np.array(state[f"bn{i}.bias"])}
        stats[f"bn{i}"] = {"mean": np.array(state[f"bn{i}.running_mean"]),
                           "var": np.array(state[f"bn{i}.running_var"])}
    params["fc"] = {"kernel": np.array(fc_weight_to_flax(state["fc.weight"]), order="C"),
                    "bias": np.array(state["fc.bias"])}
    return {"params": params, "batch_stats": stats}


def torch_template() -> dict[str, jax.ShapeDtypeStruct]:
    """Key -> shape and dtype of the original state_dict, derived from the Flax model itself."""
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), checkpoint.model_template())
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flax_to_torch_state(zeros).items()}


def check_torch_state(state: dict, source: str) -> None:
    """Raises CheckpointError unless `state` has exactly the original's keys, shapes, dtypes; all finite."""
    template = torch_template()
    missing, extra = sorted(set(template) - set(state)), sorted(set(state) - set(template))
    if missing or extra:
        raise CheckpointError(f"{source}: not a state_dict of the original SeedNet: "
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


def num_batches_from_sidecar(sidecar: dict | None) -> tuple[int, str]:
    """BatchNorm's num_batches_tracked for a run, and where the number came from."""
    sidecar = sidecar or {}
    known = sidecar.get("num_batches_tracked")
    if isinstance(known, int) and not isinstance(known, bool) and known >= 0:
        return known, "sidecar num_batches_tracked"
    batch, epochs = sidecar.get("batch_size"), sidecar.get("epochs")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (batch, epochs)):
        # One BatchNorm update per step; the last, partial batch of an epoch is a step too.
        return math.ceil(NUM_TRAIN_EXAMPLES / batch) * epochs, \
            f"sidecar: ceil({NUM_TRAIN_EXAMPLES}/{batch}) steps x {epochs} epoch(s)"
    return 0, "unknown (no batch_size/epochs in a sidecar): 0"


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
        state, metadata = safetensors_from_bytes(data, str(path))
    check_torch_state(state, str(path))
    return WeightsFile(state, metadata, checkpoint.sha256_hex(data))


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
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
            # np.load allocates the shape an .npy header declares before reading any data.
            declared = sum(_npy_nbytes(zf, info) for info in zf.infolist())
        if max(unpacked, declared) > MAX_FILE_BYTES:  # a compressed npz can expand without bound
            raise CheckpointError(f"{source}: npz unpacks to {max(unpacked, declared):,} bytes; "
                                  "too large for SeedNet")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except CheckpointError:
        raise
    except Exception as e:  # BadZipFile, ValueError (pickled object arrays), EOFError, ...
        raise CheckpointError(f"{source}: unreadable npz ({type(e).__name__}: {e})"[:300]) from None


def _npy_nbytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """The size an .npy member's header declares, read from the header alone.

    np.load reads any member that starts with the .npy magic as an array, whatever its name.
    """
    fmt = np.lib.format
    with zf.open(info) as f:
        magic = f.read(len(fmt.MAGIC_PREFIX) + 2)
        if not magic.startswith(fmt.MAGIC_PREFIX):
            return 0  # np.load returns it as bytes, no more than the zip's own size check allows
        version = tuple(magic[-2:])
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{info.filename}: unsupported .npy format version {version}")
        shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    return math.prod(shape) * dtype.itemsize


def export_checkpoint(path: str | Path, fmt: str, output: str | Path | None = None) -> tuple[Path, int, str]:
    """Writes the checkpoint's weights in PyTorch layout; returns (path, num_batches_tracked, its source)."""
    variables, sidecar = checkpoint.load_checkpoint(path)
    steps, steps_source = num_batches_from_sidecar(sidecar)
    state = flax_to_torch_state(variables, steps)
    out = Path(output) if output else Path(path).with_suffix(FORMATS[fmt])
    check_output_dir(out)
    if fmt == "npz":
        # npz has no metadata slot, and an extra array would break load_state_dict(strict=True).
        data = state_to_npz(state)
    else:
        source_sha = checkpoint.sha256_hex(Path(path).read_bytes())
        metadata = {
            "format": "pytorch_state_dict",
            "layout": LAYOUT_NOTE,
            "source_checkpoint": Path(path).name,
            "source_sha256": source_sha,
            "num_batches_tracked": f"{steps} ({steps_source})",
            "exported_by": f"mnist_flax {__version__}",
            "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if sidecar and "test_accuracy" in sidecar:
            metadata["test_accuracy"] = repr(sidecar["test_accuracy"])
        data = state_to_safetensors(state, metadata)
    atomic_write_bytes(out, data)
    return out, steps, steps_source


def import_weights(path: str | Path, output: str | Path) -> Path:
    """Writes a validated Flax checkpoint (msgpack + sidecar) from a PyTorch state_dict file."""
    path, output = Path(path), Path(output)
    weights = read_weights_file(path)
    variables = torch_state_to_flax(weights.state)
    checkpoint.check_variables(variables, checkpoint.model_template(), str(path))
    sidecar = {"imported_from": path.name, "source_sha256": weights.sha256,
               "num_batches_tracked": int(weights.state["bn1.num_batches_tracked"])}
    accuracy = _float_or_none(weights.metadata.get("test_accuracy"))
    if accuracy is not None:
        sidecar["test_accuracy"] = accuracy
    if output.is_dir():
        if accuracy is None:
            raise cli.UsageError(f"{path} carries no test accuracy to name the checkpoint by; "
                                 f"give -o a file name, not the directory {output}")
        output = output / checkpoint.checkpoint_name(dt.datetime.now(dt.timezone.utc), accuracy)
    if output.resolve() == path.resolve():
        raise cli.UsageError(f"-o {output} would overwrite the input")
    check_output_dir(output)
    data = checkpoint.variables_to_bytes(variables)
    sidecar.update(sha256=checkpoint.sha256_hex(data), file=output.name,
                   created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    atomic_write_bytes(output, data)
    atomic_write_text(checkpoint.sidecar_path(output), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return output


def check_output_dir(output: Path) -> None:
    if not output.parent.is_dir():
        problem = "is not a directory" if output.parent.exists() else "does not exist"
        raise cli.UsageError(f"-o {output}: {output.parent} {problem}; create the directory or choose another -o")
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
    p.add_argument("checkpoint", nargs="?", help="a .msgpack written by mnist_flax.train")
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
        print(f"wrote {out} (and {checkpoint.sidecar_path(out).name})")
        return 0
    if not args.checkpoint:
        raise cli.UsageError("give a CHECKPOINT to export, or --from-torch WEIGHTS -o OUT.msgpack")
    fmt = args.format or ("npz" if args.output and args.output.endswith(".npz") else "safetensors")
    out, steps, steps_source = export_checkpoint(args.checkpoint, fmt, args.output)
    print(f"wrote {out} ({fmt}, PyTorch layout; num_batches_tracked={steps}: {steps_source})")
    return 0


def run() -> None:
    sys.exit(cli.run_main(main))


if __name__ == "__main__":
    run()
