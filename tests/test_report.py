"""The training report: plots from a small synthetic run, the Markdown summary, the command line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import PARAMETERS
from mnist_flax import checkpoint, cli, metrics_log, plots, report, sidecar
from mnist_flax import config as config_lib
from mnist_flax.data import MnistArrays
from mnist_flax.errors import MnistFlaxError

STEPS_PER_EPOCH = 469  # 60,000 / 128, rounded up: what the sidecar's settings imply
REPO = Path(__file__).resolve().parent.parent
ALL_PLOTS = {report.CURVES_FILE, report.CONFUSION_FILE, report.MISCLASSIFIED_FILE, report.PER_CLASS_FILE}


def sidecar_metadata() -> dict:
    """A full sidecar, as training.run_metadata writes it, for a 98.54% model."""
    rng = np.random.default_rng(0)
    confusion = np.diag(rng.integers(950, 1100, 10))
    for _ in range(146):  # sprinkle the mistakes off the diagonal
        true, pred = rng.choice(10, 2, replace=False)
        confusion[true, pred] += 1
    per_class = np.diag(confusion) / confusion.sum(1)
    return {"test_accuracy": 0.9854, "train_accuracy": 0.9712, "train_loss": 0.0913,
            "per_class_test_accuracy": [round(float(a), 6) for a in per_class],
            "confusion_matrix": confusion.tolist(), "params": PARAMETERS, "num_batches_tracked": 2 * 469,
            "config": config_lib.resolve(epochs=2).to_dict(), "epoch_seconds": [41.25, 39.5],
            "versions": {"jax": "0.10.2", "flax": "0.12.8", "optax": "0.2.8", "python": "3.11.7"}}


def write_metrics(directory, torn_last_line=True) -> None:
    """Two epochs of plausible step records, the last line torn as by a killed writer."""
    rng = np.random.default_rng(1)
    lines = []
    for step in range(1, 2 * STEPS_PER_EPOCH + 1):
        loss = 2.3 * np.exp(-step / 40) + 0.05 + 0.03 * rng.random()
        lines.append(json.dumps({"step": step, "epoch": (step - 1) // STEPS_PER_EPOCH, "loss": loss,
                                 "accuracy": min(1.0, 1.05 - loss / 2.3), "learning_rate": 0.01,
                                 "images_per_second": 1500.0}))
    text = "\n".join(lines) + "\n"
    if torn_last_line:
        text += '{"step": 939, "epoch": 1, "lo'
    (directory / metrics_log.METRICS_FILE).write_text(text)


def fake_data(n: int = 40) -> MnistArrays:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    empty = np.zeros((0, 28, 28, 1), np.uint8)
    return MnistArrays(empty, np.zeros(0, np.int32), images, rng.integers(0, 10, n).astype(np.int32))


def model_variables() -> dict:
    """Variables of the model's exact structure (a valid checkpoint), random but well scaled.

    Not `init_variables`: its eager, op-by-op initialisation takes ~10 s on a busy CPU,
    and nothing here depends on how the weights were made.
    """
    rng = np.random.default_rng(3)

    def leaf(path, shape):
        if path[-1].key in ("scale", "var"):  # BatchNorm: unit scale and variance
            return np.ones(shape.shape, shape.dtype)
        return (0.1 * rng.standard_normal(shape.shape)).astype(shape.dtype)
    return jax.tree_util.tree_map_with_path(leaf, checkpoint.model_template())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run: checkpoint, full sidecar, metrics.jsonl (torn last line) and the plots."""
    directory = tmp_path_factory.mktemp("run")
    path = checkpoint.save_checkpoint(directory, model_variables(), sidecar_metadata())
    write_metrics(directory)
    written = report.write_plots(path, data=fake_data())
    return directory, path, written


def test_write_plots_writes_every_png(run_dir):
    directory, _, written = run_dir
    assert {p.name for p in written} == ALL_PLOTS
    for p in written:
        assert p.parent == directory
        with Image.open(p) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 500 <= width <= 2000 and 400 <= height <= 2000, (p.name, image.size)
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*.tmp"))


def test_workers_draw_the_files_this_process_draws(run_dir, tmp_path):
    """The train command's plot workers write byte for byte the PNGs that drawing in-process writes."""
    directory, path, written = run_dir
    with plots.Painter(workers=2) as painter:
        by_workers = report.write_plots(path, data=fake_data(), output_dir=tmp_path, painter=painter)
    assert [p.name for p in by_workers] == [p.name for p in written]
    for mine, theirs in zip(written, by_workers):
        assert theirs.parent == tmp_path and theirs.read_bytes() == mine.read_bytes(), mine.name
    assert all(proc.returncode == 0 for proc in painter.procs)  # exited when their stdin closed


def test_a_plot_that_fails_in_a_worker_is_one_error_naming_it(tmp_path):
    with plots.Painter(workers=1) as painter:
        painter.draw(plots.CONFUSION_FILE, tmp_path / plots.CONFUSION_FILE, {"test_accuracy": 0.5})
        with pytest.raises(MnistFlaxError, match=r"^drawing the plots failed: confusion_matrix.png: "
                                                 r"KeyError: 'confusion_matrix'$"):
            painter.finish()
        painter.draw(plots.PER_CLASS_FILE, tmp_path / plots.PER_CLASS_FILE, sidecar_metadata())
        assert painter.finish() == [tmp_path / plots.PER_CLASS_FILE]  # the worker goes on
        painter.procs[0].kill()
        painter.procs[0].wait()
        painter.draw(plots.PER_CLASS_FILE, tmp_path / plots.PER_CLASS_FILE, sidecar_metadata())
        with pytest.raises(MnistFlaxError, match="per_class_accuracy.png: its worker exited"):
            painter.finish()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_workers_ignore_ctrl_c(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group; the training process decides what it means."""
    with plots.Painter(workers=1) as painter:
        painter.draw(plots.PER_CLASS_FILE, tmp_path / "first.png", sidecar_metadata())
        assert painter.finish() == [tmp_path / "first.png"]  # so the worker is past its start-up
        painter.procs[0].send_signal(signal.SIGINT)
        painter.draw(plots.PER_CLASS_FILE, tmp_path / "second.png", sidecar_metadata())
        assert painter.finish() == [tmp_path / "second.png"]
    assert painter.procs[0].returncode == 0


def test_smooth_is_unbiased_at_the_start_and_follows_a_constant():
    assert plots.smooth(np.full(50, 0.7), window=10) == pytest.approx(np.full(50, 0.7))
    assert plots.smooth(np.array([2.0, 1.0]), window=100)[0] == 2.0


def test_missing_metrics_skips_the_curves_with_a_note(run_dir, tmp_path, capsys):
    _, path, _ = run_dir
    (tmp_path / path.name).write_bytes(path.read_bytes())
    sidecar.path_for(tmp_path / path.name).write_text(sidecar.path_for(path).read_text())
    written = report.write_plots(tmp_path / path.name, data=fake_data(12))
    assert {p.name for p in written} == ALL_PLOTS - {report.CURVES_FILE}
    assert report.CURVES_FILE in capsys.readouterr().err


def test_output_dir_and_no_sidecar(run_dir, tmp_path):
    _, path, _ = run_dir
    written = report.write_plots(path, data=fake_data(12), output_dir=tmp_path / "plots")
    assert {p.parent for p in written} == {tmp_path / "plots"}
    bare = tmp_path / path.name
    bare.write_bytes(path.read_bytes())
    with pytest.raises(report.CheckpointError, match="no sidecar"):
        report.write_plots(bare, data=fake_data(12))
    with pytest.raises(report.CheckpointError, match="no sidecar"):
        report.markdown_summary(bare)


def test_given_probabilities_are_used_not_recomputed(run_dir, tmp_path, monkeypatch):
    """Training passes the probabilities it evaluated: the report must not run the model again."""
    from mnist_flax import step
    _, path, _ = run_dir
    data = fake_data(12)
    monkeypatch.setattr(step, "predict_probabilities", lambda *a, **k: pytest.fail("recomputed"))
    all_right = np.eye(10)[data.test_labels]
    written = report.write_plots(path, data=data, output_dir=tmp_path / "right", probabilities=all_right)
    assert report.MISCLASSIFIED_FILE not in {p.name for p in written}  # no mistakes: nothing to show
    one_wrong = np.eye(10)[(data.test_labels + (np.arange(12) == 5)) % 10]
    written = report.write_plots(path, data=data, output_dir=tmp_path / "wrong", probabilities=one_wrong)
    assert report.MISCLASSIFIED_FILE in {p.name for p in written}
    with pytest.raises(ValueError, match="probabilities of shape"):
        report.write_plots(path, data=data, output_dir=tmp_path / "bad", probabilities=one_wrong[:5])


def test_markdown_summary(run_dir):
    _, path, _ = run_dir
    text = report.markdown_summary(path)
    assert text.startswith("## ") and "98.54%" in text
    assert f"{PARAMETERS:,}" in text
    assert "| layer/param | shape | count |" in text and "| conv1/kernel | 3×3×1×8 | 72 |" in text
    assert "| digit | accuracy | test images | wrong | most often taken for |" in text
    assert "| 41.2 s, 39.5 s |" in text.replace("epoch time ", "")
    assert "jax 0.10.2" in text and "| seed |" in text and "| batch size | 128 |" in text
    for name in ALL_PLOTS:
        assert f"`{name}`" in text
    assert report.markdown_summary(path) == text  # a pure function of the files


def run_cli(*argv) -> int:
    return cli.run_main(report.main, [str(a) for a in argv])


def test_cli_markdown_given_a_directory(run_dir, capsys, tmp_path):
    directory, path, _ = run_dir
    assert run_cli(directory, "--markdown") == 0
    out = capsys.readouterr().out
    assert out == report.markdown_summary(path)


def test_cli_picks_the_newest_checkpoint(run_dir, tmp_path):
    _, path, _ = run_dir
    for stamp in ("20240101T000000Z", "20250101T000000Z"):
        (tmp_path / f"mnist_flax_{stamp}_acc98.00.msgpack").touch()
    assert checkpoint.find(tmp_path).name == "mnist_flax_20250101T000000Z_acc98.00.msgpack"
    assert checkpoint.find(path) == path


def test_cli_draws_plots(run_dir, tmp_path, capsys, monkeypatch):
    _, path, _ = run_dir
    monkeypatch.setattr("mnist_flax.data.load_mnist", lambda **kwargs: fake_data(12))
    assert run_cli(path, "--output-dir", tmp_path) == 0
    printed = capsys.readouterr().out.split()
    assert {p.rsplit("/", 1)[-1] for p in printed} == ALL_PLOTS
    assert all((tmp_path / name).is_file() for name in ALL_PLOTS)


@pytest.mark.parametrize("case, code, message", [
    ("empty dir", cli.EXIT_FAILURE, "no mnist_flax_*.msgpack in this directory"),
    ("missing", cli.EXIT_FAILURE, "no such checkpoint or directory"),
    ("no sidecar", cli.EXIT_FAILURE, "no sidecar"),
    ("not msgpack", cli.EXIT_FAILURE, "not an mnist_flax msgpack checkpoint"),
    ("bad flag", cli.EXIT_USAGE, "unrecognized arguments"),
])
def test_cli_errors(run_dir, tmp_path, capsys, case, code, message):
    _, path, _ = run_dir
    target, extra = tmp_path, []
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "no sidecar":
        (tmp_path / path.name).write_bytes(path.read_bytes())
    elif case == "not msgpack":
        (tmp_path / path.name).write_text("hello")
    elif case == "bad flag":
        extra = ["--plots-please"]
    try:
        assert run_cli(target, "--markdown", *extra) == code
    except SystemExit as e:  # argparse exits by itself on a usage error
        assert e.code == code
    err = capsys.readouterr().err
    assert message in err
    if code == cli.EXIT_FAILURE:
        assert err.count("\n") == 1 and err.startswith("mnist_flax: error: ")


def test_module_runs_markdown_without_mnist_or_matplotlib(run_dir, tmp_path):
    """What CI's job-summary step runs: `python -m mnist_flax.report DIR --markdown`.

    MNIST pointed nowhere proves it is not needed; matplotlib must not even be imported.
    """
    directory, _, _ = run_dir
    code = ("import runpy, sys\n"
            f"sys.argv = ['report', {str(directory)!r}, '--markdown']\n"
            "try:\n    runpy.run_module('mnist_flax.report', run_name='__main__')\n"
            "except SystemExit as e:\n    status = e.code\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
            "sys.exit(status)\n")
    env = {**os.environ, "MNIST_FLAX_MANUAL_DIR": str(tmp_path / "no-mnist"), "TFDS_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "98.54%" in result.stdout and f"{PARAMETERS:,}" in result.stdout
