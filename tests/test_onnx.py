"""The ONNX export: a valid model that onnxruntime runs to the Flax model's predictions.

The parity test runs all 10,000 real test images through onnxruntime and through the
jit-compiled Flax eval function, on the briefly trained checkpoint of conftest.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnist_flax
from conftest import require
from mnist_flax import checkpoint, export, step
from mnist_flax.cli import run_main

onnx = require("onnx", "pip install 'mnist-flax[onnx]'")
ort = require("onnxruntime", "pip install 'mnist-flax[onnx]'")
from mnist_flax import onnx_graph  # noqa: E402  (needs onnx)

LOGIT_TOLERANCE = 1e-4  # the bar; export.ONNX_LOGIT_TOLERANCE is the export's own


@pytest.fixture(scope="module")
def onnx_file(trained_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert run_main(export.main, [str(trained_checkpoint), "--format", "onnx", "-o", str(out)]) == 0
    return out


def session(path) -> "ort.InferenceSession":
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_predictions_on_all_10000_test_images_are_the_flax_models(onnx_file, flax_test_logits, test_set):
    images, _ = test_set
    logits = session(onnx_file).run(None, {"images": images})[0]
    assert logits.shape == (10_000, 10) and logits.dtype == np.float32
    assert np.array_equal(logits.argmax(1), flax_test_logits.argmax(1))
    assert np.abs(logits - flax_test_logits).max() <= LOGIT_TOLERANCE


def test_the_model_is_valid_with_the_documented_interface_and_metadata(onnx_file, trained_checkpoint):
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, inp.type.tensor_type.elem_type, dims(inp)) == ("images", onnx.TensorProto.UINT8, ["N", 28, 28, 1])
    assert (out.name, out.type.tensor_type.elem_type, dims(out)) == ("logits", onnx.TensorProto.FLOAT, ["N", 10])
    props = {p.key: p.value for p in model.metadata_props}
    record = checkpoint.load_checkpoint(trained_checkpoint)[1]
    assert float(props["test_accuracy"]) == record["test_accuracy"]
    assert props["source_sha256"] == record["sha256"]
    assert "uint8 (N, 28, 28, 1) NHWC" in props["layout"]
    # Normalisation is inside: the graph starts from raw pixels (Cast, /255, -mean, /std).
    assert [n.op_type for n in model.graph.node[:4]] == ["Cast", "Div", "Sub", "Div"]


@pytest.mark.parametrize("batch", [1, 7])
def test_the_batch_dimension_is_dynamic(onnx_file, trained_checkpoint, test_set, batch):
    variables, _ = checkpoint.load_checkpoint(trained_checkpoint)
    images = test_set[0][:batch]
    got = session(onnx_file).run(None, {"images": images})[0]
    np.testing.assert_allclose(got, np.asarray(step.predict_logits(variables, images)), atol=LOGIT_TOLERANCE)


def test_weights_are_named_after_the_layers_they_come_from(onnx_file):
    names = {i.name.rsplit("_", 1)[0] for i in onnx.load(str(onnx_file)).graph.initializer}
    assert {f"conv{i}.kernel" for i in range(1, 6)} | {"fc.kernel", "bn1.var.add.rsqrt"} <= names


def test_an_unknown_primitive_is_named_not_guessed():
    jaxpr = jax.make_jaxpr(jnp.tanh)(jnp.zeros((2, 3))).jaxpr
    with pytest.raises(onnx_graph.UnsupportedPrimitive, match="'tanh'"):
        onnx_graph._translate(onnx_graph.Graph(), jaxpr, [onnx_graph.Tensor("x", False)])


def test_a_bad_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "mnist_flax_bad.msgpack"
    bad.write_bytes(b"\x00not msgpack")
    rc = run_main(export.main, [str(bad), "--format", "onnx"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("mnist_flax: error: ") and str(bad) in err
    assert [p.name for p in tmp_path.iterdir()] == [bad.name]


def test_a_disagreeing_graph_is_not_written(trained_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "ONNX_LOGIT_TOLERANCE", -1.0)  # no graph can pass: the check must refuse
    out = tmp_path / "model.onnx"
    rc = run_main(export.main, [str(trained_checkpoint), "--format", "onnx", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "nothing was written" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_without_the_extra_the_error_says_how_to_install_it(trained_checkpoint, tmp_path, capsys, monkeypatch,
                                                            missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` fail
    monkeypatch.delitem(sys.modules, "mnist_flax.onnx_graph")  # so it is imported again, and fails
    monkeypatch.delattr(mnist_flax, "onnx_graph")
    rc = run_main(export.main, [str(trained_checkpoint), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and f"({missing} is not installed)" in err and "pip install 'mnist-flax[onnx]'" in err
    assert list(tmp_path.iterdir()) == []


def test_the_format_is_inferred_from_an_onnx_output_name(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert run_main(export.main, [str(trained_checkpoint), "-o", str(out)]) == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert "ONNX" in capsys.readouterr().out
