"""MODEL_CARD.md from a real checkpoint, and the release files that `publish` checks against it."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import PARAMETERS, REPO, TORCH_INSTALL, require
from mnist_flax import checkpoint, export, model_card, plots, publish, sidecar
from mnist_flax.cli import run_main
from mnist_flax.errors import MnistFlaxError


@pytest.fixture(scope="module")
def release_dir(trained_checkpoint, flax_test_logits, test_set, tmp_path_factory):
    """A run's folder as CI leaves it: the checkpoint, its sidecar with the test set's per-digit
    results (as training writes them), both exports, the four plots and the card."""
    require("onnxruntime", "pip install 'mnist-flax[onnx]'")
    out = tmp_path_factory.mktemp("run")
    path = out / trained_checkpoint.name
    shutil.copy2(trained_checkpoint, path)
    labels, predicted = test_set[1], flax_test_logits.argmax(1)
    matrix = np.zeros((10, 10), int)
    np.add.at(matrix, (labels, predicted), 1)
    record = {k: v for k, v in sidecar.read(trained_checkpoint).items() if k not in ("file", "sha256")}
    sidecar.write(path, path.read_bytes(), {**record, "confusion_matrix": matrix.tolist(),
                                            "per_class_test_accuracy": (matrix.diagonal() / matrix.sum(1)).tolist()})
    for fmt in ("safetensors", "onnx"):
        export.export_checkpoint(path, fmt)
    for name in plots.PLOT_FILES:  # their bytes are what matters here, not their pictures
        (out / name).write_bytes(b"\x89PNG " + name.encode())
    assert run_main(model_card.main, [str(out)]) == 0
    return out


def card_of(release_dir) -> str:
    return (release_dir / model_card.FILE_NAME).read_text()


def test_the_card_states_what_the_sidecar_and_the_files_say(release_dir):
    card = card_of(release_dir)
    path = checkpoint.find(release_dir)
    record = sidecar.read(path)
    assert card.startswith("---\nlicense: mit\n")
    assert f"metrics: [{{type: accuracy, value: {record['test_accuracy']}}}]" in card
    matrix = np.array(record["confusion_matrix"])
    assert f"Test accuracy: **{100 * record['test_accuracy']:.2f}%** ({np.trace(matrix):,} of 10,000 test images)" in card
    for digit, accuracy in enumerate(record["per_class_test_accuracy"]):
        assert f"| {digit} | {100 * accuracy:.2f}% |" in card
    assert f"| **total** |  | **{PARAMETERS:,}** |" in card
    assert f"| steps | {record['num_batches_tracked']:,} |" in card
    for key, value in record["config"].items():
        assert f"| {key} | `{value}` |" in card
    listed = model_card.listed_sha256(card)
    assert sorted(listed) == sorted(p.name for p in publish.release_files(release_dir) if p.name != model_card.FILE_NAME)
    for name, digest in listed.items():
        assert sidecar.sha256_hex((release_dir / name).read_bytes()) == digest


def test_the_noise_probe_is_measured_and_reproducible(release_dir):
    path = checkpoint.find(release_dir)
    variables, record = checkpoint.load_checkpoint(path)
    top = model_card.noise_probe(variables, record)
    assert top.shape == (model_card.NOISE_IMAGES,) and ((0.1 <= top) & (top <= 1)).all()
    line = re.search(r"its top probability averaged ([\d.]+)%, and exceeded 90% on ([\d.]+)%", " ".join(card_of(release_dir).split()))
    assert line and float(line.group(1)) == round(100 * top.mean(), 1)
    assert float(line.group(2)) == round(100 * (top > model_card.CONFIDENT).mean(), 1)
    assert model_card.model_card(path) == card_of(release_dir)  # the same card, written again


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["flax", "pytorch", "onnxruntime"])
def test_each_how_to_use_snippet_runs_beside_the_files(release_dir, framework):
    if framework == "pytorch":
        require("torch", TORCH_INSTALL, imported=False)
    snippets = re.findall(r"```python\n(.*?)```", card_of(release_dir), re.S)
    snippet = {"flax": snippets[0], "pytorch": snippets[1], "onnxruntime": snippets[2]}[framework]
    result = subprocess.run([sys.executable, "-c", snippet], cwd=release_dir, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(release_dir)})
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", result.stdout)]
    assert len(numbers) >= 10, result.stdout  # ten probabilities or logits


def test_publish_names_the_tag_and_every_file(release_dir, capsys):
    assert run_main(publish.main, [str(release_dir), "--commit", "4c70d2d" + "0" * 33]) == 0
    tag_line, files_line = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"tag=model-\d{4}-\d\d-\d\d-4c70d2d", tag_line)
    files = files_line.removeprefix("files=").split(" ")
    path = checkpoint.find(release_dir)
    assert {f.rsplit("/", 1)[-1] for f in files} == {path.name, sidecar.path_for(path).name, path.stem + ".onnx",
                                                      path.stem + ".safetensors", model_card.FILE_NAME, *plots.PLOT_FILES}


def test_publish_refuses_a_card_older_than_its_files(release_dir, tmp_path):
    stale = tmp_path / "run"
    shutil.copytree(release_dir, stale)
    (stale / plots.CONFUSION_FILE).write_bytes(b"\x89PNG redrawn")
    with pytest.raises(MnistFlaxError, match=f"lists another sha256 for {plots.CONFUSION_FILE}.*model_card"):
        publish.release_files(stale)


def test_publish_says_what_to_run_for_a_missing_file(release_dir, tmp_path):
    partial = tmp_path / "run"
    shutil.copytree(release_dir, partial)
    onnx = checkpoint.find(partial).with_suffix(".onnx")
    onnx.unlink()
    with pytest.raises(MnistFlaxError, match=f"a release needs {onnx.name} .`python -m mnist_flax.export .* --format onnx`"):
        publish.release_files(partial)


def test_a_checkpoint_without_a_sidecar_gets_no_card(tmp_path, trained_checkpoint, capsys):
    shutil.copy2(trained_checkpoint, tmp_path / trained_checkpoint.name)
    code = run_main(model_card.main, [str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "no sidecar" in err, err
    assert not (tmp_path / model_card.FILE_NAME).exists()
