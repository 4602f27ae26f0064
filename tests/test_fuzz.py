"""Property-based fuzzing of every file loader: only CheckpointError ever escapes.

Loaders: `checkpoint.variables_from_bytes` / `load_checkpoint` (msgpack),
`resume.load_resume_state` (msgpack), and export's safetensors and npz readers
(`weight_files.read_weights_file`). Each is fed random bytes, valid files with bytes
flipped, inserted, deleted or cut off anywhere, and hand-built hostile
structures: nesting thousands of levels deep, lengths claiming 2^31 elements or
more with almost no data, wrong types at every level of the tree, extra keys,
pickled object arrays.

Properties checked on every case:
  * the loader returns, or raises `CheckpointError` whose message names the source;
  * it finishes within PER_CASE_S (a SIGALRM stops a hang; hypothesis' own deadline is
    off, because on a loaded CI machine a slow case is not a hang);
  * it allocates at most MAX_TRACED_BYTES (tracemalloc, which numpy reports to), so a
    file declaring a huge length is refused before anything that size is allocated;
  * over the whole run the process' peak RSS grows by less than MAX_RSS_GROWTH_BYTES
    (measured from the first test, once JAX has compiled what the loaders use).

The budget is fixed and the runs are derandomized (no example database), so CI
sees the same cases every time; `test_zz_fuzz_case_count` asserts the total ran.
"""

import collections
import contextlib
import dataclasses
import io
import json
import resource
import signal
import struct
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import jax
import msgpack
import numpy as np
import pytest
from flax import serialization
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mnist_flax import checkpoint, resume, sidecar, step, torch_layout, weight_files
from mnist_flax import config as config_lib
from mnist_flax.errors import CheckpointError
from mnist_flax.loop import Position

PER_CASE_S = 10  # hard bound (SIGALRM)
MAX_TRACED_BYTES = 64 * 2**20  # 4x the largest file any loader accepts
# Loose on purpose: the per-case tracemalloc bound above is the precise guard. In the full
# suite the allocator and JAX's caches grow the peak by ~200 MiB over these cases (55 MiB
# alone); a loader that honoured a declared 2**31-element length would add gigabytes.
MAX_RSS_GROWTH_BYTES = 512 * 2**20

CASES: collections.Counter = collections.Counter()
BASELINE = {"started": time.monotonic()}


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


class Hang(BaseException):
    """Raised by SIGALRM inside a loader that ran past PER_CASE_S (not an Exception: nothing catches it)."""


@contextlib.contextmanager
def time_bound(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"loader still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_loader(name: str, load, source: str):
    """Runs `load()`; anything but a CheckpointError naming `source` fails the example."""
    CASES[name] += 1
    tracemalloc.start()
    try:
        with time_bound(PER_CASE_S):
            try:
                return load()
            except CheckpointError as e:
                assert source in str(e), f"message does not name {source}: {e}"
                assert "\n" not in str(e).strip(), f"message is not one line: {e!r}"
                return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= MAX_TRACED_BYTES, f"{name}: allocated {peak:,} bytes"


# --- valid files to mutate ---------------------------------------------------------

# One jitted init for both seed files: every pytest-xdist worker builds them while collecting,
# and the model's init run op by op loads each of its dozens of small programs.
CONFIG = config_lib.resolve()
STATE = jax.device_get(step.create_train_state(CONFIG))
VARIABLES = step.model_variables(STATE)
CKPT_BYTES = checkpoint.variables_to_bytes(VARIABLES)
CKPT_TREE = serialization.msgpack_restore(CKPT_BYTES)
TORCH_STATE = torch_layout.flax_to_torch_state(VARIABLES, 7)
SAFETENSORS_BYTES = weight_files.state_to_safetensors(TORCH_STATE, {"test_accuracy": "0.5"})
NPZ_BYTES = weight_files.state_to_npz(TORCH_STATE)


def _resume_bytes() -> bytes:
    tree = {"version": resume.VERSION,
            "state": jax.tree.map(np.asarray, serialization.to_state_dict(STATE)),
            "position": dataclasses.asdict(Position(epoch=0, batch=3, loss_sum=1.5, correct=2.0, count=3.0)),
            "config": CONFIG.to_dict()}
    return serialization.msgpack_serialize(tree)


RESUME_BYTES = _resume_bytes()
RESUME_TREE = serialization.msgpack_restore(RESUME_BYTES)


@pytest.fixture(scope="module", autouse=True)
def memory_baseline():
    """The peak RSS as this file's first test starts, whichever it is: what its cases add is measured
    from here (under pytest-xdist, other files may have run in this process before)."""
    BASELINE["rss"] = max_rss_bytes()


@pytest.fixture(autouse=True)
def runs_its_whole_budget(request):
    """Each fuzz test ran at least the `max_examples` its settings give it: a loader that stopped
    being called (a strategy that filters everything out, a mutation that never reaches it) fails."""
    before = sum(CASES.values())
    yield
    budget = getattr(request.node.function, "_hypothesis_internal_use_settings", None)  # set by @settings
    if budget is not None:
        ran = sum(CASES.values()) - before
        assert ran >= budget.max_examples, f"{request.node.name}: {ran} cases, its budget is {budget.max_examples}"
        BASELINE["budgets checked"] = BASELINE.get("budgets checked", 0) + 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_seed_files_are_valid(workdir):
    """The mutation seeds load: so a mutant that is refused was refused for its mutation."""
    checkpoint.variables_from_bytes(CKPT_BYTES)
    (workdir / "resume.msgpack").write_bytes(RESUME_BYTES)
    state, position, _ = resume.load_resume_state(workdir)
    assert position.batch == 3
    for name, data in (("w.safetensors", SAFETENSORS_BYTES), ("w.npz", NPZ_BYTES)):
        (workdir / name).write_bytes(data)
        assert int(weight_files.read_weights_file(workdir / name).state["bn1.num_batches_tracked"]) == 7


# --- strategies ----------------------------------------------------------------------

# Strategies whose arguments do not change between draws are built once: hypothesis validates a
# new strategy object and computes its properties every time one is built. The same strategies
# draw the same cases.
MUTATIONS = st.sampled_from(["flip", "set", "insert", "delete", "truncate"])
SPECIAL_BYTES = st.sampled_from([0x00, 0xff, 0x7f, 0x80, 0xc0, 0xc1, 0xc6, 0xc9, 0xd9, 0xdd, 0xdf])


@st.composite
def mutated(draw, seed: bytes, hot: int = 512):
    """`seed` with a few byte flips, insertions and deletions, or cut off anywhere.

    Positions favour the first `hot` bytes, where the headers and keys are.
    """
    data = bytearray(seed)
    if draw(st.integers(0, 9)) == 0:
        return bytes(data[:draw(st.integers(0, len(data)))])
    for _ in range(draw(st.integers(1, 6))):
        n = len(data)
        pos = draw(st.one_of(st.integers(0, max(0, min(n, hot) - 1)), st.integers(0, max(0, n - 1))))
        op = draw(MUTATIONS)
        if op == "flip" and n:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and n:
            data[pos] = draw(SPECIAL_BYTES)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


# Length headers (msgpack): bin32, str32, array32, map32, ext32.
HUGE_HEADERS = {"bin": b"\xc6", "str": b"\xdb", "array": b"\xdd", "map": b"\xdf", "ext": b"\xc9"}


@st.composite
def huge_length(draw):
    """A msgpack header claiming a huge length, followed by little data."""
    kind = draw(st.sampled_from(sorted(HUGE_HEADERS)))
    n = draw(st.one_of(st.just(2**31), st.just(2**32 - 1), st.integers(2**20, 2**32 - 1)))
    item = HUGE_HEADERS[kind] + struct.pack(">I", n) + (b"\x01" if kind == "ext" else b"")
    return item + draw(st.binary(max_size=32))


@st.composite
def deeply_nested(draw):
    """A value nested thousands of levels deep (maps of one entry, or one-element arrays)."""
    depth = draw(st.integers(1_000, 50_000))
    level = draw(st.sampled_from([b"\x91", b"\x81\xa6params", b"\x81\xa1a", b"\xdd\x00\x00\x00\x01"]))
    return level * depth + draw(st.sampled_from([b"\xc0", b"\x90", b"\x80", b""]))


def ndarray_ext(shape, dtype_name: bytes, buffer: bytes, code: int = 1) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb((shape, dtype_name, buffer), use_bin_type=True))


dims = st.one_of(st.integers(-2, 40), st.sampled_from([2**31, 2**32 - 1, 2**62, 2**63 - 1, -2**63]))
ndarrays = st.builds(
    ndarray_ext,
    st.one_of(st.lists(dims, max_size=6), st.just([3, 3, 1, 8]), st.just(None), st.text(max_size=4)),
    st.one_of(st.sampled_from([b"<f4", b"float32", b"int32", b"O", b"V8", b"(2147483647,2147483647)f8",
                               b"bfloat16", b"U5", b"<c8", b"bogus", b"", b"f8,i4", b"V2147483647"]),
              st.binary(max_size=8)),
    st.binary(max_size=64),
    st.sampled_from([1, 1, 1, 2, 3, 0, 4, 127]))
leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                   st.binary(max_size=16), ndarrays,
                   st.builds(lambda a: np.asarray(a, np.float32), st.lists(st.floats(width=32), max_size=5)),
                   st.sampled_from([np.zeros((3, 3, 1, 8), np.float64), np.zeros((3, 3, 1, 8), np.int32),
                                    np.zeros((8,), np.float32), np.full((8,), np.nan, np.float32),
                                    np.zeros((3, 3, 1, 8), np.float16), np.zeros(1, np.bool_)]))
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
keys = st.one_of(st.text(max_size=8), st.sampled_from(["params", "batch_stats", "conv1", "kernel", "bias",
                                                       "mean", "var", "fc", "0", ""]),
                 st.integers(-5, 5), st.binary(max_size=4))


SPLICE = "<<splice a hostile value here>>"


def tree_paths(tree, prefix=()):
    """Every path into a nested dict, the root included."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from tree_paths(v, prefix + (k,))


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


TREE_OPS = st.sampled_from(["replace", "replace", "extra", "drop", "deep"])


@st.composite
def broken_tree(draw, tree: dict) -> bytes:
    """`tree` with one node (any level) replaced by a wrong value, dropped, or given extra keys; packed."""
    tree = _copy(tree)
    paths = list(tree_paths(tree))
    path = draw(st.sampled_from(paths))
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    op = draw(TREE_OPS)
    target = parent[path[-1]] if path else tree
    if op == "extra" and isinstance(target, dict):
        target[draw(keys)] = draw(values)
    elif op == "drop" and path:
        del parent[path[-1]]
    elif op == "deep" and path:
        parent[path[-1]] = SPLICE  # a placeholder, replaced in the packed bytes below
        packed = msgpack.packb(tree, default=_pack_default, use_bin_type=True)
        return packed.replace(msgpack.packb(SPLICE), draw(st.one_of(deeply_nested(), huge_length())), 1)
    elif path:
        parent[path[-1]] = draw(values)
    else:
        tree = draw(values)
    return msgpack.packb(tree, default=_pack_default, use_bin_type=True, strict_types=False)


def _pack_default(obj):
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((list(obj.shape), obj.dtype.str.encode(), obj.tobytes()),
                                                use_bin_type=True))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj))


RESUME_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**64 - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e300, -0.0]), st.text(max_size=8),
    st.sampled_from(["original", "onecycle", "bogus", "nadam", "auto"]), st.binary(max_size=8),
    st.lists(st.integers(-2**63, 2**63 - 1), max_size=2))
RESUME_PARTS = st.sampled_from(["config", "position"])
RESUME_OPS = st.sampled_from(["set", "set", "set", "drop", "extra"])


@st.composite
def broken_resume_fields(draw) -> bytes:
    """The resume tree with its config/position fields given wrong, huge or missing values."""
    tree = _copy(RESUME_TREE)
    for _ in range(draw(st.integers(1, 3))):
        part = draw(RESUME_PARTS)
        op = draw(RESUME_OPS)
        if op == "set":
            tree[part][draw(st.sampled_from(sorted(tree[part])))] = draw(RESUME_FIELD_VALUES)
        elif op == "drop" and tree[part]:
            del tree[part][draw(st.sampled_from(sorted(tree[part])))]
        else:
            tree[part][draw(st.text(max_size=6))] = draw(RESUME_FIELD_VALUES)
    return msgpack.packb(tree, default=_pack_default, use_bin_type=True)


# --- msgpack checkpoints -------------------------------------------------------------

SRC = "fuzz-source.msgpack"


def load_ckpt_bytes(data: bytes):
    return check_loader("msgpack", lambda: checkpoint.variables_from_bytes(data, SRC), SRC)


@fuzz_settings(700)
@given(mutated(CKPT_BYTES))
def test_checkpoint_mutated(data):
    load_ckpt_bytes(data)


@fuzz_settings(300)
@given(st.one_of(st.binary(max_size=2048), st.binary(max_size=64).map(lambda b: b"\x82" + b)))
def test_checkpoint_random_bytes(data):
    load_ckpt_bytes(data)


@fuzz_settings(300)
@given(st.one_of(deeply_nested(), huge_length()).map(lambda b: b"\x82" + b))
@example(b"\x82" + b"\x91" * 100_000 + b"\xc0")
@example(b"\x82" + b"\x81\xa6params" * 30_000 + b"\x80")
@example(b"\x82\xa6params\xd4\xff\x00")  # ext type -1 (a msgpack Timestamp) of a bad length
@example(b"\x82\xa6params\xd7\xff" + b"\xff" * 8)  # a Timestamp out of datetime's range
@example(b"\x82\xdd\x80\x00\x00\x00")  # an array claiming 2^31 elements, with none
@example(b"\x82\xa6params\xc6\xff\xff\xff\xffxx")  # a bin claiming 4 GiB, with 2 bytes
def test_checkpoint_deep_nesting_and_huge_lengths(data):
    load_ckpt_bytes(data)


@fuzz_settings(500)
@given(broken_tree(CKPT_TREE))
def test_checkpoint_wrong_types_at_every_level(data):
    load_ckpt_bytes(data)


def test_checkpoint_wrong_types_are_refused_not_loaded():
    """A sample of the tree breakages above, each of which must be refused (not silently accepted)."""
    for params in ({}, [], None, 1.5, "x", {"conv1": {}},
                   {**CKPT_TREE["params"], "extra": np.zeros(1, np.float32)}):
        with pytest.raises(CheckpointError, match=SRC):
            checkpoint.variables_from_bytes(serialization.msgpack_serialize(
                {"params": params, "batch_stats": CKPT_TREE["batch_stats"]}), SRC)


@fuzz_settings(100)
@given(data=mutated(CKPT_BYTES), sidecar_bytes=st.one_of(st.none(), st.binary(max_size=64),
                                                   st.sampled_from([b"[]", b"{\"sha256\": 5}", b"\xff\xfe",
                                                                    b"{\"sha256\": \"00\"}", b"[" * 5000])))
def test_load_checkpoint_file(workdir, data, sidecar_bytes):
    path = workdir / "fuzz.msgpack"
    path.write_bytes(data)
    json_path = sidecar.path_for(path)
    json_path.unlink(missing_ok=True)
    if sidecar_bytes is not None:
        json_path.write_bytes(sidecar_bytes)
    check_loader("load_checkpoint", lambda: checkpoint.load_checkpoint(path), str(path.with_suffix("")))


# --- resume state ----------------------------------------------------------------------

def load_resume_bytes(workdir: Path, data: bytes):
    path = workdir / "fuzz-resume.msgpack"
    path.write_bytes(data)
    return check_loader("resume", lambda: resume.load_resume_state(path), str(path))


@fuzz_settings(250)
@given(mutated(RESUME_BYTES))
def test_resume_mutated(workdir, data):
    load_resume_bytes(workdir, data)


@fuzz_settings(150)
@given(st.one_of(st.binary(max_size=1024), deeply_nested(), huge_length(),
                 st.one_of(deeply_nested(), huge_length()).map(lambda b: b"\x83\xa5state" + b)))
def test_resume_random_bytes_and_hostile_structure(workdir, data):
    load_resume_bytes(workdir, data)


@fuzz_settings(120)
@given(broken_tree(RESUME_TREE))
def test_resume_wrong_types_at_every_level(workdir, data):
    load_resume_bytes(workdir, data)


@fuzz_settings(180)
@given(broken_resume_fields())
def test_resume_wrong_config_and_position_fields(workdir, data):
    load_resume_bytes(workdir, data)


# --- safetensors ---------------------------------------------------------------------

def load_weights(workdir: Path, data: bytes, name: str):
    path = workdir / name
    path.write_bytes(data)
    return check_loader(name, lambda: weight_files.read_weights_file(path), str(path))


def safetensors_file(header, payload: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + payload


SAFETENSORS_HEADER = json.loads(SAFETENSORS_BYTES[8:8 + int.from_bytes(SAFETENSORS_BYTES[:8], "little")])
SAFETENSORS_PAYLOAD = SAFETENSORS_BYTES[8 + int.from_bytes(SAFETENSORS_BYTES[:8], "little"):]
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                     st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=10)
big_ints = st.sampled_from([-1, 0, 2**31, 2**32, 2**63 - 1, 2**64, 2**64 - 1, 10**30])


HEADER_FIELDS = st.sampled_from(["dtype", "shape", "data_offsets", "whole", "extra_tensor"])
WRONG_DTYPES = st.one_of(st.sampled_from(["F16", "BF16", "F64", "I32", "BOOL", "U8", "I64", "F32", "", "F8_E4M3"]),
                         json_values)
WRONG_SHAPES = st.one_of(st.lists(st.one_of(st.integers(-1, 600), big_ints), max_size=5), json_values)
WRONG_OFFSETS = st.one_of(st.lists(st.one_of(st.integers(0, 50_000), big_ints), max_size=3), json_values)
HUGE_SHAPES, HUGE_OFFSETS = st.lists(big_ints, max_size=3), st.lists(big_ints, min_size=2, max_size=2)
PAYLOADS = st.one_of(st.just(SAFETENSORS_PAYLOAD),
                     st.integers(0, len(SAFETENSORS_PAYLOAD)).map(lambda n: SAFETENSORS_PAYLOAD[:n]))


@st.composite
def broken_safetensors_header(draw) -> bytes:
    """The real header with one tensor's dtype/shape/offsets (or the metadata) made wrong or hostile."""
    header = json.loads(json.dumps(SAFETENSORS_HEADER))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(header)))
        field = draw(HEADER_FIELDS)
        if key == "__metadata__" or field == "whole" or not isinstance(header[key], dict):
            header[key] = draw(json_values)
        elif field == "dtype":
            header[key]["dtype"] = draw(WRONG_DTYPES)
        elif field == "shape":
            header[key]["shape"] = draw(WRONG_SHAPES)
        elif field == "data_offsets":
            header[key]["data_offsets"] = draw(WRONG_OFFSETS)
        else:
            header[draw(st.text(max_size=8))] = {"dtype": "F32", "shape": draw(HUGE_SHAPES),
                                                 "data_offsets": draw(HUGE_OFFSETS)}
    payload = draw(PAYLOADS)
    return safetensors_file(header, payload)


@fuzz_settings(500)
@given(mutated(SAFETENSORS_BYTES, hot=2500))
def test_safetensors_mutated(workdir, data):
    load_weights(workdir, data, "fuzz.safetensors")


@fuzz_settings(250)
@given(st.one_of(
    st.binary(max_size=1024),
    # the length prefix: oversized, larger than the file, zero, or 2^64 - 1
    st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
              st.one_of(st.integers(0, 2**64 - 1), big_ints.filter(lambda n: 0 <= n < 2**64),
                        st.integers(weight_files.MAX_HEADER_BYTES - 2, weight_files.MAX_HEADER_BYTES + 2)),
              st.binary(max_size=256)),
    st.builds(safetensors_file, json_values),
    st.builds(lambda d: safetensors_file(b"[" * d + b"]" * d), st.integers(1_000, 30_000)),
    st.builds(lambda d: safetensors_file(b'{"a": ' + b"9" * d + b"}"), st.integers(4_000, 20_000))))
@example(safetensors_file(b"[" * 30_000 + b"]" * 30_000))  # was RecursionError
@example(safetensors_file(b'{"a": ' + b"9" * 5000 + b"}"))  # was ValueError (int digit limit)
@example(safetensors_file({}, length=2**64 - 1))
@example(safetensors_file(b"{}", length=weight_files.MAX_HEADER_BYTES + 1))
def test_safetensors_random_and_hostile_headers(workdir, data):
    load_weights(workdir, data, "fuzz.safetensors")


@fuzz_settings(400)
@given(broken_safetensors_header())
def test_safetensors_wrong_header_fields(workdir, data):
    load_weights(workdir, data, "fuzz.safetensors")


# --- npz -------------------------------------------------------------------------------

_UNPICKLED = []


class _Sentinel:
    """Pickled into an object array; if any loader ever unpickles it, `_UNPICKLED` says so."""

    def __reduce__(self):
        return (_UNPICKLED.append, ("unpickled!",))


def npz_bytes(state: dict, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **state)
    return buf.getvalue()


def npy_member(shape, descr="<f4", version=(1, 0), data=b"") -> bytes:
    """A hand-written .npy whose header declares `shape`, followed by `data` only."""
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    fmt = "<H" if version == (1, 0) else "<I"
    prefix = 10 if version == (1, 0) else 12
    header += b" " * (-(prefix + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(fmt, len(header)) + header + data


def zip_of(members: dict[str, bytes], declared_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if declared_size is not None:
            for info in zf.infolist():
                info.file_size = declared_size
    return buf.getvalue()


wrong_arrays = st.one_of(
    st.sampled_from([np.zeros((8, 1, 3, 3), np.float64), np.zeros((8, 1, 3, 3), np.int64),
                     np.zeros((1, 8, 3, 3), np.float32), np.zeros((), np.float32), np.zeros(0, np.float32),
                     np.full((8, 1, 3, 3), np.inf, np.float32), np.array(-3, np.int64),
                     np.zeros((8, 1, 3, 3), np.float32).T, np.zeros(2, dtype="f4,i4"), np.array(["x"]),
                     np.zeros((8, 1, 3, 3), np.complex64), np.array([b"ab"])]),
    st.builds(lambda: np.array([_Sentinel(), None], dtype=object)),
    st.builds(lambda: np.array([{"a": 1}], dtype=object)))


NPZ_OPS = st.sampled_from(["replace", "replace", "drop", "extra"])
MEMBER_KEYS = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8)
MEMBER_NAMES = st.sampled_from(["conv1.weight.npy", "fc.bias.npy", "x.npy", "notes.txt", "dir/a.npy"])
DECLARED_SHAPES = st.lists(st.one_of(st.integers(0, 100), st.sampled_from([2**31, 2**40, 2**62])), max_size=3)
DESCRS = st.sampled_from(["<f4", "<f8", "|O", "<i8", "|V8", "<U3", "|b1"])
NPY_VERSIONS = st.sampled_from([(1, 0), (2, 0), (3, 0), (9, 9)])
DECLARED_SIZES = st.one_of(st.none(), st.integers(0, 2**31))


@st.composite
def broken_npz(draw) -> bytes:
    state = dict(TORCH_STATE)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(NPZ_OPS)
        key = draw(st.sampled_from(sorted(state))) if state else "x"
        if op == "replace" or not state:
            state[key] = draw(wrong_arrays)
        elif op == "drop":
            del state[key]
        else:
            state[draw(MEMBER_KEYS)] = draw(wrong_arrays)
    return npz_bytes(state, compressed=draw(st.booleans()))


@st.composite
def hostile_npz(draw) -> bytes:
    """Hand-made members: huge declared shapes, odd npy versions and dtypes, non-npy members, zip bombs."""
    members = {}
    for _ in range(draw(st.integers(1, 3))):
        name, shape = draw(MEMBER_NAMES), draw(DECLARED_SHAPES)
        descr, version = draw(DESCRS), draw(NPY_VERSIONS)
        members[name] = npy_member(shape, descr, version, draw(st.binary(max_size=64)))
    declared = draw(DECLARED_SIZES)
    data = zip_of(members, declared)
    if draw(st.booleans()):
        data = draw(mutated(data, hot=len(data)))
    return data if data.startswith(b"PK") else b"PK" + data


@fuzz_settings(350)
@given(mutated(NPZ_BYTES, hot=len(NPZ_BYTES)))
def test_npz_mutated(workdir, data):
    load_weights(workdir, data, "fuzz.npz")


@fuzz_settings(200)
@given(broken_npz())
def test_npz_wrong_arrays_and_object_arrays(workdir, data):
    load_weights(workdir, data, "fuzz.npz")
    assert not _UNPICKLED, "an object array was unpickled"


@fuzz_settings(300)
@given(hostile_npz())
@example(zip_of({"notes.txt": npy_member([2**30], "<f8")}))  # np.load reads any member with the magic
@example(zip_of({"conv1.weight.npy": npy_member([2**31], "<f8", data=b"\0" * 16)}))  # was a 16 GiB np.empty
@example(zip_of({"conv1.weight.npy": npy_member([2**40, 2**20])}))
@example(zip_of({"conv1.weight.npy": b"\0" * 10_000_000}, declared_size=10))  # central directory lies
@example(zip_of({"conv1.weight.npy": b"\0" * (20 * 2**20)}))  # a 20 MiB zip bomb, ~20 KB compressed
def test_npz_hostile_members(workdir, data):
    load_weights(workdir, data, "fuzz.npz")


def test_npz_object_array_is_refused_without_unpickling(workdir):
    data = npz_bytes({**TORCH_STATE, "conv1.weight": np.array([_Sentinel()], dtype=object)})
    path = workdir / "pickled.npz"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="allow_pickle|Object arrays"):
        weight_files.read_weights_file(path)
    assert not _UNPICKLED


# --- totals ----------------------------------------------------------------------------

def test_zz_memory_stayed_bounded_across_the_cases():
    """Runs last in this file: over every case that ran before it, the peak RSS grew boundedly."""
    total = sum(CASES.values())
    growth = max_rss_bytes() - BASELINE["rss"]
    summary = ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()))
    print(f"\nfuzz: {total} cases in {time.monotonic() - BASELINE['started']:.1f} s ({summary}); "
          f"peak RSS grew {growth / 2**20:.0f} MiB", file=sys.stderr)
    assert growth < MAX_RSS_GROWTH_BYTES
    assert not total or BASELINE.get("budgets checked"), "cases ran, but no test's budget could be read"
