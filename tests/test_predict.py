"""mnist_flax.predict on real MNIST digits written as image files, as users would give them."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from mnist_flax import predict
from mnist_flax.cli import run_main
from mnist_flax.errors import ImageError

COUNT = 20


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = run_main(predict.main, list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


def raw_predictions(flax_test_logits, n=COUNT) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(jax.nn.softmax(flax_test_logits[:n], axis=-1))
    return probs.argmax(1), probs


def black_on_white_photo(digit: np.ndarray, size=(130, 160), at=(14, 30), scale=4) -> np.ndarray:
    """A digit as a scan would give it: larger, dark ink on light paper, off centre."""
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.LANCZOS))
    page = np.zeros(size[::-1], np.uint8)
    page[at[1]:at[1] + big.shape[0], at[0]:at[0] + big.shape[1]] = big
    return 235 - (page.astype(np.int32) * 220 // 255).astype(np.uint8)  # grey paper, not-quite-black ink


@pytest.fixture(scope="module")
def digit_pngs(test_set, tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("digits")
    paths = []
    for i in range(COUNT):
        path = directory / f"{i:02d}_label{test_set[1][i]}.png"
        Image.fromarray(test_set[0][i, :, :, 0]).save(path)
        paths.append(str(path))
    return paths


def test_mnist_pngs_are_used_exactly_as_the_arrays(digit_pngs, test_set):
    for i, path in enumerate(digit_pngs):
        prepared = predict.prepare(path)
        assert not prepared.inverted
        assert np.array_equal(prepared.image, test_set[0][i, :, :, 0])


def test_mnist_pngs_are_classified_like_the_raw_arrays(digit_pngs, trained_checkpoint, test_set,
                                                       flax_test_logits, capsys):
    rc, out, err = run_cli(capsys, trained_checkpoint, *digit_pngs, "--json")
    assert (rc, err) == (0, "")
    results = json.loads(out)
    digits, probs = raw_predictions(flax_test_logits)
    assert [r["file"] for r in results] == digit_pngs
    assert [r["digit"] for r in results] == digits.tolist()
    np.testing.assert_allclose([r["probabilities"] for r in results], probs, atol=1e-5)
    assert all(r["probability"] == max(r["probabilities"]) for r in results)
    correct = sum(r["digit"] == label for r, label in zip(results, test_set[1][:COUNT]))
    assert correct >= COUNT - 2, f"only {correct}/{COUNT} right; the model misclassifies too often"


def test_text_output_is_one_line_per_file(digit_pngs, trained_checkpoint, capsys):
    rc, out, _ = run_cli(capsys, trained_checkpoint, *digit_pngs[:3])
    lines = out.strip().splitlines()
    assert rc == 0 and len(lines) == 3
    for path, line in zip(digit_pngs, lines):
        assert re.fullmatch(re.escape(path) + r": digit \d \(p=[01]\.\d{3}\)", line), line


def test_black_on_white_images_are_inverted_and_normalised(tmp_path, test_set, trained_checkpoint,
                                                           flax_test_logits, capsys):
    paths = []
    for i in range(10):
        path = tmp_path / f"scan{i}.jpg"
        Image.fromarray(black_on_white_photo(test_set[0][i, :, :, 0])).convert("RGB").save(path, quality=90)
        paths.append(str(path))
        prepared = predict.prepare(path)
        image = prepared.image.astype(np.float64)
        assert prepared.inverted and image.shape == (28, 28)
        assert predict.border(prepared.image).max() == 0  # black background, like MNIST
        rows, cols = np.nonzero(image)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 22  # fitted in 20x20 (+ resampling fringe)
        centre = [(image.sum(axis) * np.arange(28)).sum() / image.sum() for axis in (1, 0)]
        np.testing.assert_allclose(centre, [14, 14], atol=1.0)
    rc, out, _ = run_cli(capsys, trained_checkpoint, *paths, "--json")
    results = json.loads(out)
    digits, _ = raw_predictions(flax_test_logits, 10)
    agree = sum(r["digit"] == d for r, d in zip(results, digits))
    assert rc == 0 and all(r["inverted"] for r in results)
    assert agree >= 9, f"the rescanned digits agree with the raw ones only {agree}/10 times"


def test_an_inverted_28x28_digit_round_trips_exactly(tmp_path, test_set):
    path = tmp_path / "inverted.png"
    Image.fromarray(255 - test_set[0][0, :, :, 0]).save(path)
    prepared = predict.prepare(path)
    assert prepared.inverted and np.array_equal(prepared.image, test_set[0][0, :, :, 0])


def test_dark_ink_on_a_transparent_canvas(tmp_path, test_set):
    ink = np.asarray(Image.fromarray(test_set[0][0, :, :, 0]).resize((84, 84), Image.Resampling.LANCZOS))
    rgba = np.zeros((100, 100, 4), np.uint8)  # transparent black everywhere ...
    rgba[8:92, 8:92, 3] = ink  # ... with black ink painted in through alpha
    path = tmp_path / "canvas.png"
    Image.fromarray(rgba, "RGBA").save(path)
    prepared = predict.prepare(path)
    assert prepared.inverted and prepared.image.max() > 200
    assert np.corrcoef(prepared.image.ravel(), test_set[0][0, :, :, 0].ravel())[0, 1] > 0.8


def test_a_blank_image_is_an_error(tmp_path):
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((60, 40), 250, np.uint8)).save(path)
    with pytest.raises(ImageError, match="no digit found"):
        predict.prepare(path)


def test_unreadable_files_are_reported_and_the_rest_still_classified(tmp_path, digit_pngs,
                                                                     trained_checkpoint, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(digit_pngs[0], "rb").read()[:60])
    gif = tmp_path / "digit.gif"
    Image.open(digit_pngs[0]).save(gif)
    missing = tmp_path / "missing.png"
    argv = [digit_pngs[0], text, truncated, digit_pngs[1], missing, gif, tmp_path]
    rc, out, err = run_cli(capsys, trained_checkpoint, *argv)
    assert rc == 1
    assert [line.split(":")[0] for line in out.strip().splitlines()] == digit_pngs[:2]
    errors = err.strip().splitlines()
    assert len(errors) == 5
    for bad, line in zip([text, truncated, missing, gif, tmp_path], errors):
        assert line.startswith(f"mnist_flax: error: {bad}: ")


def test_a_bad_checkpoint_fails_on_one_line(tmp_path, digit_pngs, capsys):
    bogus = tmp_path / "bogus.msgpack"
    bogus.write_bytes(b"not msgpack")
    rc, out, err = run_cli(capsys, bogus, digit_pngs[0])
    assert rc == 1 and out == "" and err.count("\n") == 1 and str(bogus) in err


def test_command_line_json_in_a_real_process(tmp_path, digit_pngs, trained_checkpoint, flax_test_logits):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mnist_flax.predict", str(trained_checkpoint),
                           digit_pngs[0], str(text), digit_pngs[1], "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    results = json.loads(proc.stdout)
    assert [r["file"] for r in results] == digit_pngs[:2]
    assert [r["digit"] for r in results] == raw_predictions(flax_test_logits, 2)[0].tolist()
    assert set(results[0]) >= {"file", "digit", "probability", "probabilities"}
    assert len(results[0]["probabilities"]) == 10 and abs(sum(results[0]["probabilities"]) - 1) < 1e-5
    assert "notes.txt" in proc.stderr
