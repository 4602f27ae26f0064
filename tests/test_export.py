"""Export to the original PyTorch layout and import back: exactness, strictness, torch parity.

Parity tests run the PyTorch original (pytorch_original/, `OriginalNet`) on the
real MNIST test set; they skip without torch or MNIST, except under $CI.
"""

import hashlib
import importlib
import io
import json
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TORCH_INSTALL, require
from mnist_flax import checkpoint, export, step, torch_layout, weight_files
from mnist_flax import config as config_lib
from mnist_flax.cli import run_main
from mnist_flax.errors import CheckpointError

EXPECTED_SHAPES = {
    "conv1.weight": (8, 1, 3, 3), "conv2.weight": (16, 8, 3, 3), "conv3.weight": (8, 16, 1, 1),
    "conv4.weight": (16, 8, 3, 3), "conv5.weight": (8, 16, 3, 3), "fc.weight": (10, 512), "fc.bias": (10,),
}
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def torch_original():
    """The repository's PyTorch original (pytorch_original/), with torch imported."""
    require("torch", TORCH_INSTALL)
    return importlib.import_module("pytorch_original")


def random_variables(seed: int) -> dict:
    """Model-shaped variables with every array random, BatchNorm statistics included (var > 0)."""
    rng = np.random.default_rng(seed)
    template = checkpoint.model_template()
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), template)
    variables["batch_stats"] = jax.tree.map(
        lambda s: rng.uniform(0.5, 2.0, s.shape).astype(s.dtype), template["batch_stats"])
    return variables


def assert_trees_identical(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y)


def save_random_checkpoint(directory, seed=0, **settings) -> str:
    """A checkpoint of random weights whose sidecar records a run of `settings` and its steps, as training's does."""
    config = config_lib.resolve(**settings)
    return str(checkpoint.save_checkpoint(directory, random_variables(seed), {
        "test_accuracy": 0.5, "config": config.to_dict(), "num_batches_tracked": config.total_steps()}))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = run_main(export.main, list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


# --- pure conversion ---------------------------------------------------------------

def test_state_dict_has_the_original_keys_shapes_and_dtypes():
    state = torch_layout.flax_to_torch_state(random_variables(0), num_batches_tracked=7)
    keys = {f"{layer}{i}.{name}" for i in range(1, 6)
            for layer, names in (("conv", ("weight", "bias")),
                                 ("bn", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")))
            for name in names} | {"fc.weight", "fc.bias"}
    assert set(state) == keys
    for key, shape in EXPECTED_SHAPES.items():
        assert state[key].shape == shape
    assert state["bn3.num_batches_tracked"].shape == () and state["bn3.num_batches_tracked"].dtype == np.int64
    assert int(state["bn3.num_batches_tracked"]) == 7
    assert all(v.dtype == np.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert all(v.flags.c_contiguous for v in state.values())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1))
def test_conversion_round_trip_is_bit_identical(seed):
    variables = random_variables(seed)
    assert_trees_identical(torch_layout.torch_state_to_flax(torch_layout.flax_to_torch_state(variables)), variables)


def test_conv_kernel_is_oihw():
    variables = random_variables(1)
    kernel = variables["params"]["conv2"]["kernel"]  # HWIO (3, 3, 8, 16)
    weight = torch_layout.flax_to_torch_state(variables)["conv2.weight"]
    for o, i, h, w in [(0, 0, 0, 0), (15, 7, 2, 1), (3, 5, 1, 2)]:
        assert weight[o, i, h, w] == kernel[h, w, i, o]


def test_fc_weight_follows_the_index_formula():
    kernel = random_variables(2)["params"]["fc"]["kernel"]
    weight = torch_layout.fc_kernel_to_torch(kernel)
    o, c, h, w = np.meshgrid(*(np.arange(n) for n in (10, 8, 8, 8)), indexing="ij")
    assert np.array_equal(weight[o, c * 64 + h * 8 + w], kernel[h * 64 + w * 8 + c, o])


def test_fc_permutation_matches_torch_flatten_and_linear():
    torch = require("torch", TORCH_INSTALL)
    variables = random_variables(3)
    kernel, bias = variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]
    nhwc = np.random.default_rng(0).standard_normal((4, 8, 8, 8)).astype(np.float32)
    flax_out = nhwc.reshape(4, -1) @ kernel + bias  # what CNN's reshape + Dense compute
    nchw = torch.from_numpy(nhwc.transpose(0, 3, 1, 2).copy())
    torch_out = torch.nn.functional.linear(torch.flatten(nchw, 1), torch.from_numpy(torch_layout.fc_kernel_to_torch(kernel)),
                                           torch.from_numpy(bias)).numpy()
    np.testing.assert_allclose(torch_out, flax_out, rtol=1e-5, atol=1e-5)


def test_num_batches_tracked_from_the_sidecar():
    assert export.num_batches_from_sidecar({"config": {"epochs": 1}, "num_batches_tracked": 5})[0] == 5
    assert export.num_batches_from_sidecar({"test_accuracy": 0.9})[0] == 0  # an imported checkpoint's
    assert export.num_batches_from_sidecar({"num_batches_tracked": -1})[0] == 0
    assert export.num_batches_from_sidecar(None)[0] == 0


# --- files and the command line ----------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_file_round_trip_reproduces_the_checkpoint_bytes(tmp_path, capsys, fmt):
    source = save_random_checkpoint(tmp_path, seed=4, batch_size=100, epochs=3)
    weights = tmp_path / f"w.{fmt}"
    assert run_cli(capsys, source, "--format", fmt, "-o", weights)[0] == 0
    back = tmp_path / "imported.msgpack"
    rc, out, err = run_cli(capsys, "--from-torch", weights, "-o", back)
    assert (rc, err) == (0, ""), err
    assert back.read_bytes() == open(source, "rb").read()
    variables, sidecar = checkpoint.load_checkpoint(back)
    assert sidecar["imported_from"] == weights.name
    assert sidecar["source_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sidecar["num_batches_tracked"] == 3 * 600


def test_default_output_path_and_safetensors_metadata(tmp_path, capsys):
    source = save_random_checkpoint(tmp_path, batch_size=128, epochs=1)
    rc, out, _ = run_cli(capsys, source)
    expected = Path(source).with_suffix(".safetensors")
    assert rc == 0 and str(expected) in out and "469" in out
    data = expected.read_bytes()
    meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert float(meta["test_accuracy"]) == 0.5
    assert meta["source_sha256"] == hashlib.sha256(open(source, "rb").read()).hexdigest()
    assert meta["num_batches_tracked"].startswith("469 ")
    assert "OIHW" in meta["layout"] and meta["format"] == "pytorch_state_dict"
    assert int(safetensors.numpy.load_file(expected)["bn5.num_batches_tracked"]) == 469


NPZ_DTYPES = ["<f4", ">f4", "<f8", "<i8", ">i2", "|u1", "|b1", "<c8", "<U3", "|S2", "|V0"]


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.text("abcxyz_", min_size=1, max_size=5),
                       st.tuples(st.sampled_from(NPZ_DTYPES), st.lists(st.integers(0, 4), max_size=4),
                                 st.booleans()), max_size=4),
       st.booleans(), st.binary(max_size=40))
def test_the_npz_reader_reads_what_np_load_reads(members, compressed, extra_bytes):
    """The one-pass reader against numpy's own: names, dtypes (byte order too), shapes, memory
    order and values of every member, and a member that is no .npy as its bytes."""
    rng = np.random.default_rng(len(members))
    arrays = {}
    for name, (dtype, shape, fortran) in members.items():
        raw = rng.integers(0, 256, int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        array = raw.view(dtype).reshape(shape) if np.dtype(dtype).itemsize else np.zeros(shape, dtype)
        arrays[name] = np.asfortranarray(array) if fortran else array
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    with zipfile.ZipFile(buffer, "a", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as zf:
        zf.writestr("notes.txt", extra_bytes)  # read twice: its first bytes, then (after a seek) all of it
    data = buffer.getvalue()
    ours = weight_files.npz_from_bytes(data, "weights.npz")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        theirs = {name: npz[name] for name in npz.files}
    assert list(ours) == list(theirs)
    assert ours["notes.txt"] == theirs["notes.txt"] == extra_bytes
    for name in arrays:
        assert (ours[name].dtype, ours[name].shape) == (theirs[name].dtype, theirs[name].shape)
        assert ours[name].flags.f_contiguous == theirs[name].flags.f_contiguous and ours[name].flags.writeable
        assert ours[name].tobytes() == theirs[name].tobytes(), name  # bytes: NaN payloads too


def test_npz_format_is_inferred_from_the_output_name_and_loads_without_pickle(tmp_path, capsys):
    source = save_random_checkpoint(tmp_path)
    assert run_cli(capsys, source, "-o", tmp_path / "w.npz")[0] == 0
    with np.load(tmp_path / "w.npz", allow_pickle=False) as npz:
        assert set(npz.files) == set(torch_layout.torch_template())


def test_import_without_accuracy_writes_exactly_to_o(tmp_path, capsys):
    state = torch_layout.flax_to_torch_state(random_variables(5), 11)
    weights = tmp_path / "from_elsewhere.safetensors"
    safetensors.numpy.save_file(state, weights)
    out = tmp_path / "exact-name.msgpack"
    assert run_cli(capsys, "--from-torch", weights, "-o", out)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact-name.json", "exact-name.msgpack",
                                                           "from_elsewhere.safetensors"]
    _, sidecar = checkpoint.load_checkpoint(out)
    assert "test_accuracy" not in sidecar and sidecar["num_batches_tracked"] == 11
    rc, _, err = run_cli(capsys, "--from-torch", weights, "-o", tmp_path)
    assert rc == 2 and "no test accuracy" in err


def test_import_into_a_directory_uses_checkpoint_naming(tmp_path, capsys):
    source = save_random_checkpoint(tmp_path)
    run_cli(capsys, source, "-o", tmp_path / "w.safetensors")
    out_dir = tmp_path / "models"
    out_dir.mkdir()
    assert run_cli(capsys, "--from-torch", tmp_path / "w.safetensors", "-o", out_dir)[0] == 0
    [written] = out_dir.glob("*.msgpack")
    assert written.name.startswith("mnist_flax_") and written.name.endswith("_acc50.00.msgpack")


@pytest.mark.parametrize("argv, message", [
    ([], "give a CHECKPOINT"),
    (["--from-torch", "x.safetensors"], "needs -o"),
    (["ckpt.msgpack", "--from-torch", "x.safetensors", "-o", "y.msgpack"], "takes no CHECKPOINT"),
])
def test_usage_errors(capsys, argv, message):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


# --- strict import -----------------------------------------------------------------

def good_state() -> dict:
    return torch_layout.flax_to_torch_state(random_variables(6), 3)


def with_(state, **changes):
    state = dict(state)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


BAD_STATES = {
    "missing key": (with_(good_state(), fc__bias=None), "missing ['fc.bias']"),
    "unexpected key": (with_(good_state(), fc__extra=np.zeros(3, np.float32)), "unexpected ['fc.extra']"),
    "wrong shape": (with_(good_state(), conv1__weight=np.zeros((3, 3, 1, 8), np.float32)), "conv1.weight is float32[3, 3, 1, 8]"),
    "flat fc": (with_(good_state(), fc__weight=np.zeros((512, 10), np.float32)), "fc.weight"),
    "float64": (with_(good_state(), bn2__weight=np.ones(16, np.float64)), "F64"),
    "float16": (with_(good_state(), conv3__bias=np.ones(8, np.float16)), "F16"),
    "int32 counter": (with_(good_state(), bn1__num_batches_tracked=np.array(3, np.int32)), "I32"),
    "int64 weight": (with_(good_state(), fc__bias=np.ones(10, np.int64)), "fc.bias is int64"),
    "NaN": (with_(good_state(), bn4__running_var=np.full(16, np.nan, np.float32)), "NaN"),
    "inf": (with_(good_state(), conv5__weight=np.full((8, 16, 3, 3), np.inf, np.float32)), "infinite"),
    "negative counter": (with_(good_state(), bn1__num_batches_tracked=np.array(-1, np.int64)), "negative"),
}


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_import_rejects_a_state_that_does_not_fit(tmp_path, fmt, case):
    state, message = BAD_STATES[case]
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(weight_files.state_to_safetensors(state, {}) if fmt == "safetensors" else weight_files.state_to_npz(state))
    if fmt == "npz" and message[:1] in "FI" and message[1:].isdigit():
        message = "the model needs"  # npz has no header; the dtype shows in the array check
    with pytest.raises(CheckpointError) as e:
        weight_files.read_weights_file(path)
    assert str(path) in str(e.value) and message in str(e.value)


def good_bytes() -> bytes:
    return weight_files.state_to_safetensors(good_state(), {"test_accuracy": "0.9"})


def pickled_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{**good_state(), "fc.bias": np.array([{"evil": 1}], dtype=object)})
    return buf.getvalue()


BAD_FILES = {
    "empty": (b"", "too short"),
    "truncated length": (b"\x10\x00\x00", "too short"),
    "truncated data": (good_bytes()[:-100], "corrupt safetensors"),
    "truncated header": (good_bytes()[:200], "truncated"),
    "absurd header length": ((2**62).to_bytes(8, "little") + b"{}", "header length 4,611,686,018,427,387,904"),
    "header not JSON": ((5).to_bytes(8, "little") + b"nope!", "not JSON"),
    "header not an object": ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    "garbage zip": (b"PK\x03\x04 not really a zip", "unreadable npz"),
    "pickled npz": (pickled_npz(), "unreadable npz"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_import_rejects_a_corrupt_or_hostile_file(tmp_path, case):
    data, message = BAD_FILES[case]
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        weight_files.read_weights_file(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_import_rejects_an_oversized_file_before_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.truncate(weight_files.MAX_FILE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(CheckpointError, match="far larger"):
        weight_files.read_weights_file(path)


def test_cli_reports_a_bad_file_on_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(weight_files.state_to_safetensors(BAD_STATES["NaN"][0], {}))
    out = tmp_path / "out.msgpack"
    rc, _, err = run_cli(capsys, "--from-torch", path, "-o", out)
    assert rc == 1 and err.count("\n") == 1 and "NaN" in err and str(path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


# --- parity with the original PyTorch network --------------------------------------

def torch_logits(torch, model, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """The original pipeline: NCHW, (x/255 - 0.1307)/0.3081 outside the model, eval mode."""
    model.eval()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        return torch.cat([model((x[i:i + batch].float() / 255.0 - 0.1307) / 0.3081)
                          for i in range(0, len(x), batch)]).numpy()


def test_exported_weights_give_flax_logits_in_pytorch(tmp_path, capsys, torch_original, trained_checkpoint,
                                                      test_set, flax_test_logits):
    torch = require("torch", TORCH_INSTALL)
    from safetensors.torch import load_file

    weights = tmp_path / "trained.safetensors"
    assert run_cli(capsys, trained_checkpoint, "-o", weights)[0] == 0
    model = torch_original.OriginalNet()
    model.load_state_dict(load_file(weights), strict=True)
    logits = torch_logits(torch, model, test_set[0])
    images, labels = test_set
    diff = np.abs(logits - flax_test_logits).max()
    same = int(np.sum(logits.argmax(1) == flax_test_logits.argmax(1)))
    print(f"\nPyTorch vs Flax on {len(images)} test images: max |logit diff| {diff:.3g}, "
          f"same class {same}/{len(images)}, accuracy torch {np.mean(logits.argmax(1) == labels):.4f} "
          f"flax {np.mean(flax_test_logits.argmax(1) == labels):.4f}")
    assert diff <= LOGIT_TOLERANCE
    assert same == len(images)
    assert np.sum(logits.argmax(1) == labels) == np.sum(flax_test_logits.argmax(1) == labels)
    assert int(model.bn1.num_batches_tracked) == 200  # from the fixture's sidecar


def test_exported_npz_loads_strictly_in_pytorch(tmp_path, capsys, torch_original, trained_checkpoint,
                                                test_set, flax_test_logits):
    torch = require("torch", TORCH_INSTALL)
    weights = tmp_path / "trained.npz"
    assert run_cli(capsys, trained_checkpoint, "-o", weights)[0] == 0
    with np.load(weights, allow_pickle=False) as npz:
        state = {k: torch.from_numpy(npz[k]) for k in npz.files}
    model = torch_original.OriginalNet()
    model.load_state_dict(state, strict=True)
    logits = torch_logits(torch, model, test_set[0][:1000])
    assert np.abs(logits - flax_test_logits[:1000]).max() <= LOGIT_TOLERANCE


def test_pytorch_weights_import_with_the_same_logits(tmp_path, capsys, torch_original):
    torch = require("torch", TORCH_INSTALL)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torch_original.OriginalNet()
    with torch.no_grad():  # a fresh BatchNorm is the identity in eval mode; make it not
        for i in range(1, 6):
            bn = getattr(model, f"bn{i}")
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.25, 4.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.3)
            bn.num_batches_tracked.fill_(1234)
    weights = tmp_path / "torch_model.safetensors"
    save_file(model.state_dict(), weights)
    out = tmp_path / "imported.msgpack"
    rc, _, err = run_cli(capsys, "--from-torch", weights, "-o", out)
    assert rc == 0, err
    variables, sidecar = checkpoint.load_checkpoint(out)
    assert sidecar["num_batches_tracked"] == 1234 and "test_accuracy" not in sidecar
    images = np.random.default_rng(0).integers(0, 256, (256, 28, 28, 1), dtype=np.uint8)
    flax_logits = np.asarray(step.predict_logits(variables, images))
    np.testing.assert_allclose(flax_logits, torch_logits(torch, model, images), rtol=0, atol=LOGIT_TOLERANCE)
