"""Every command turns bad input into one line on stderr, exit 2 (usage) or 1 (runtime), no traceback.

The cases live in scripts/error_table.py, which also writes docs/error_messages.md
from them. Each runs through `cli.run_main(main, argv)` in this process; those in
SUBPROCESS (at least one per command, and every case that would reach the network)
run as a real `python -m mnist_flax.<command>` from the repository root instead.
"""

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO
from mnist_flax import checkpoint, cli, evaluate
from mnist_flax.errors import CheckpointError

_spec = importlib.util.spec_from_file_location("error_table", REPO / "scripts" / "error_table.py")
error_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(error_table)

SUBPROCESS = {
    "train: --recipe bogus",
    "train: no network, no manual dir, empty TFDS_DATA_DIR",  # in-process, TFDS keeps its import-time data dir
    "evaluate: a PNG as checkpoint",
    "evaluate: no network, no manual dir",
    "export: a truncated checkpoint",
    "predict: a text file as the image",
    "serve: a text file as checkpoint",
    "artifact: no GitHub token",
    "artifact: --release, offline",
    "model_card: a text file as checkpoint",
    "site: offline, no onnxruntime-web package",
    "publish: --commit that is no sha",
}
NO_NETWORK_S = 30  # the offline failure must come within seconds, not after TFDS' minutes of retries


@pytest.fixture(scope="module")
def scene(tmp_path_factory, mnist_manual_dir, mnist_data_dir):
    return error_table.make_scene(tmp_path_factory.mktemp("errors"), mnist_manual_dir, mnist_data_dir)


def test_every_case_is_named_once():
    ids = [error_table.case_id(c) for c in error_table.CASES]
    assert len(ids) == len(set(ids))
    assert SUBPROCESS <= set(ids)
    assert {c.command for c in error_table.CASES if error_table.case_id(c) in SUBPROCESS} == \
        {c.command for c in error_table.CASES}


@pytest.mark.parametrize("case", error_table.CASES, ids=error_table.case_id)
def test_bad_input_gives_one_helpful_line(scene, case):
    in_subprocess = error_table.case_id(case) in SUBPROCESS
    result = (error_table.run_subprocess if in_subprocess else error_table.run_in_process)(case, scene)
    lines = error_table.message_lines(result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Downloading and preparing" not in result.stdout  # TFDS's announcement, before the files are read
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("mnist_flax: usage error: " if case.code == cli.EXIT_USAGE else "mnist_flax: error: ")
    assert case.phrase.lower() in lines[0].lower(), lines[0]
    assert result.code == case.code, (result.code, lines[0])
    if "no network" in case.what:
        assert result.seconds < NO_NETWORK_S
        assert "--manual-dir" in lines[0] and "MNIST_FLAX_MANUAL_DIR" in lines[0]


def test_debug_shows_the_traceback(scene):
    with pytest.raises(CheckpointError, match="wrong file type"):
        cli.run_main(evaluate.main, [str(scene.png), "--debug"])
    p = subprocess.run([sys.executable, "-m", "mnist_flax.evaluate", str(scene.png), "--debug"], cwd=REPO,
                       env=error_table.base_env(scene), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "CheckpointError" in p.stderr


def test_the_scene_checkpoint_is_valid(scene):
    """So the cases that use it fail for their own reason, not a broken checkpoint."""
    checkpoint.load_checkpoint(scene.checkpoint)


def test_the_committed_table_lists_every_case():
    table = (REPO / "docs" / "error_messages.md").read_text()
    assert table.startswith("# Error messages\n"), "something else wrote to the table's stdout"
    for case in error_table.CASES:
        assert f"| {case.command} | {case.what.replace('|', chr(92) + '|')} |" in table, case.what


def test_a_failed_first_run_leaves_no_output_directory(scene, tmp_path):
    out = tmp_path / "never"
    argv = ["--no-plots", "--no-progress", "--output-dir", str(out), "--manual-dir", str(tmp_path / "nowhere"),
            "--data-dir", str(tmp_path / "tfds")]
    assert cli.run_main(error_table.importlib.import_module("mnist_flax.train").main, argv) == cli.EXIT_FAILURE
    assert not out.exists()


# The commands whose --help and usage errors come before their heavy imports (JAX, flax, TFDS):
# they answer in about a tenth of a second instead of a second or more. export still imports JAX
# at the top: its module is also the library that the tests and the ONNX export call.
ANSWERS_WITHOUT_JAX = {
    "train": ["--batch-size", "0"],
    "evaluate": [],  # no checkpoint given
    "predict": ["checkpoint-only"],  # no image given
    "serve": ["anything", "--port", "99999"],
    "compare": ["RUN_DIR"],  # neither a baseline nor --no-baseline
    "export": [],  # neither a checkpoint nor --from-torch
    "report": [],  # no output directory given
    "artifact": ["OWNER/REPO", "--no-such-flag"],
}


@pytest.mark.parametrize("command", sorted(ANSWERS_WITHOUT_JAX))
def test_help_and_usage_errors_import_no_jax(env_without_jax, command):
    for argv, code in (["--help"], 0), (ANSWERS_WITHOUT_JAX[command], cli.EXIT_USAGE):
        p = subprocess.run([sys.executable, "-m", f"mnist_flax.{command}", *argv], cwd=REPO, env=env_without_jax,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == code, (argv, p.stderr[-2000:])
        assert ("usage:" in p.stdout) if code == 0 else (p.stderr.startswith("mnist_flax: usage error: ")), p.stderr


@pytest.mark.parametrize("command, message", [
    (["evaluate", "{png}"], "not an mnist_flax msgpack checkpoint"),
    (["export", "--from-torch", "{png}", "-o", "{png}.msgpack"], "safetensors header length"),
    (["serve", "{png}", "--port", "0"], "not an mnist_flax msgpack checkpoint"),
    (["predict", "{png}", "{png}"], "not an mnist_flax msgpack checkpoint"),
], ids=["evaluate", "export", "serve", "predict"])
def test_a_file_that_is_no_checkpoint_is_refused_before_jax_loads(scene, env_without_jax, command, message):
    argv = [arg.format(png=scene.png) for arg in command]
    p = subprocess.run([sys.executable, "-m", f"mnist_flax.{argv[0]}", *argv[1:]], cwd=REPO, env=env_without_jax,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == cli.EXIT_FAILURE and message in p.stderr, p.stderr[-2000:]
