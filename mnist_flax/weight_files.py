"""PyTorch state dicts as safetensors or npz files: written, and read back with every check.

Reading never unpickles: safetensors is a JSON header plus raw bytes, and npz is
opened with allow_pickle=False. Every file is checked key by key, shape by shape,
before anything of it is used.
"""

import io
import json
import math
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors
import safetensors.numpy

from mnist_flax import checkpoint, sidecar
from mnist_flax.errors import CheckpointError
from mnist_flax.torch_layout import check_torch_state

# Our safetensors header is ~2 KB of JSON; safetensors itself allows 100 MB,
# which is far more than we will parse from a file someone handed us.
MAX_HEADER_BYTES = 64 * 1024
MAX_FILE_BYTES = checkpoint.MAX_BYTES
SAFETENSORS_DTYPES = {"F32": np.float32, "I64": np.int64}


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
