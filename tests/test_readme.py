"""The README's commands and snippets run as written, so that they cannot rot."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TEST_CACHE_ENV, TORCH_INSTALL, require
from mnist_flax import sidecar

README = (REPO / "README.md").read_text()
MAX_LINES = 150


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def shell_commands() -> list[str]:
    """Every command in the README's bash blocks and in its commands table."""
    lines = [line.split("#")[0].strip() for block in code_blocks("bash") for line in block.splitlines()]
    table = re.findall(r"^\| `(python -m [^`]+)` \|", README, re.M)
    return [line for line in lines if line] + table


def test_readme_is_short_and_for_users():
    assert len(README.splitlines()) <= MAX_LINES
    assert "../shared" not in README


@pytest.mark.slow
def test_every_module_the_readme_runs_answers_help():
    modules = sorted({m for cmd in shell_commands() for m in re.findall(r"python -m ([\w.]+)", cmd)})
    assert {"mnist_flax.train", "mnist_flax.evaluate", "mnist_flax.predict", "mnist_flax.export",
            "mnist_flax.artifact", "mnist_flax.report", "mnist_flax.serve", "pytest"} <= set(modules)
    # All at once (pytest is the suite itself): each process spends most of its time importing.
    procs = {module: subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for module in modules if module != "pytest"}
    for module, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "usage:" in stdout, (module, stderr[-2000:])


def test_quick_start_trains_with_the_end_to_end_tests_command():
    """The quick start's train command is the one tests/test_end_to_end.py runs for real."""
    assert "python -m mnist_flax.train" in shell_commands()
    assert 'python -m pytest -m "not slow"' in shell_commands()


def run_export_then_snippet(tmp_path, trained_checkpoint, mnist_data_dir, mnist_manual_dir, export_is, snippet_has):
    """In the repository root as a user has it after training: the README's export command that
    `export_is` picks, then its Python snippet that contains `snippet_has`. Returns the snippet's output."""
    workdir = tmp_path / "repo"
    (workdir / "artifacts").mkdir(parents=True)
    for path in (trained_checkpoint, sidecar.path_for(trained_checkpoint)):
        shutil.copy(path, workdir / "artifacts")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TFDS_DATA_DIR": str(mnist_data_dir),
           "MNIST_FLAX_MANUAL_DIR": str(mnist_manual_dir)}
    export = next(cmd for cmd in shell_commands() if export_is(cmd))
    result = subprocess.run([sys.executable, *shlex.split(export)[1:]], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    [snippet] = [block for block in code_blocks("python") if snippet_has in block]
    result = subprocess.run([sys.executable, "-c", snippet], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    return result.stdout


@pytest.mark.slow
def test_pytorch_snippet_runs_as_written(tmp_path, trained_checkpoint, mnist_data_dir, mnist_manual_dir):
    """After the README's own export command, its PyTorch snippet gives the checkpoint's accuracy."""
    require("torch", TORCH_INSTALL, imported=False)  # the snippet imports it, in its own process
    out = run_export_then_snippet(tmp_path, trained_checkpoint, mnist_data_dir, mnist_manual_dir,
                                  lambda cmd: cmd.startswith("python -m mnist_flax.export artifacts -o"),
                                  "load_state_dict")
    accuracy = sidecar.read(trained_checkpoint)["test_accuracy"]
    assert out.strip() == f"test accuracy in PyTorch: {accuracy:.2%}"


@pytest.mark.slow
def test_onnx_snippet_runs_as_written(tmp_path, trained_checkpoint, mnist_data_dir, mnist_manual_dir):
    """The README's ONNX export command, then its onnxruntime snippet: the checkpoint's accuracy."""
    require("onnxruntime", "pip install 'mnist-flax[onnx]'", imported=False)
    out = run_export_then_snippet(tmp_path, trained_checkpoint, mnist_data_dir, mnist_manual_dir,
                                  lambda cmd: "--format onnx" in cmd, "onnxruntime")
    accuracy = sidecar.read(trained_checkpoint)["test_accuracy"]
    assert out.strip() == f"test accuracy in onnxruntime: {accuracy:.2%}"


def test_serve_curl_command_answers(served_url):
    """The README's curl command, from the repository root, against the served trained model."""
    curl = next(cmd for cmd in shell_commands() if cmd.startswith("curl"))
    assert "http://127.0.0.1:8000/" in curl  # the default --port; the test's server has a free one
    argv = shlex.split(curl.replace("http://127.0.0.1:8000/", served_url))
    result = subprocess.run(argv + ["--silent", "--fail"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["digit"] == 7


def test_the_shipped_seven_is_the_first_mnist_test_digit(test_set):
    images, labels = test_set
    np.testing.assert_array_equal(np.asarray(Image.open(REPO / "docs" / "seven.png")), images[0, :, :, 0])
    assert labels[0] == 7


def test_predict_command_runs_as_written(tmp_path, trained_checkpoint):
    """From a checkout where `model` holds a downloaded model: the README's predict line reads a 7."""
    predict = next(cmd for cmd in shell_commands() if cmd.startswith("python -m mnist_flax.predict model"))
    (tmp_path / "model").mkdir()
    for path in (trained_checkpoint, sidecar.path_for(trained_checkpoint)):
        shutil.copy(path, tmp_path / "model")
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "docs" / "seven.png", tmp_path / "docs")
    result = subprocess.run([sys.executable, *shlex.split(predict)[1:]], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.fullmatch(r"docs/seven\.png: digit 7 \(p=[01]\.\d{3}\)\n", result.stdout), result.stdout


def test_the_accuracy_it_states_is_the_end_to_end_tests_gate():
    from test_end_to_end import ACCURACY_GATE
    assert f"above {ACCURACY_GATE:.0%} with seed 0" in " ".join(README.split())
    assert not re.search(r"\b9\d\.\d\d%", README)  # no figure that only one CPU gives


def test_the_data_and_caches_it_names_are_where_they_go(tmp_path):
    """`rm -r` of the README's paths removes the prepared MNIST and every compilation cache, the tests' too."""
    [rm] = re.findall(r"`(rm -r [^`]+)`", " ".join(README.split()))
    removed = [tmp_path / p.removeprefix("~/") for p in shlex.split(rm)[2:]]
    env = {k: v for k, v in os.environ.items() if k not in ("TFDS_DATA_DIR", "XDG_CACHE_HOME", TEST_CACHE_ENV)}
    code = ("import conftest; from mnist_flax import data, runtime; print(data.MnistIdx().data_dir); "
            "print(runtime.default_compilation_cache_dir()); print(conftest.tests_compilation_cache_dir())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**env, "HOME": str(tmp_path), "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"})
    assert result.returncode == 0, result.stderr[-2000:]
    made = list(map(Path, result.stdout.split()))
    assert len(made) == 3, result.stdout
    for made in made:
        assert any(made.is_relative_to(r) for r in removed), (made, removed)


def test_the_license_pyproject_declares_is_there():
    assert 'license = "MIT"' in (REPO / "pyproject.toml").read_text()
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
