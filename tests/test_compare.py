"""The CI comparison: this run's model beside the default branch's, downloaded from the (fake) GitHub API."""

import io
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from conftest import PARAMETERS
from conftest import REPO as REPO_ROOT
from mnist_flax import artifact, checkpoint, compare, sidecar
from mnist_flax.cli import run_main
from mnist_flax.model import init_variables
from test_artifact import REPO, gh  # noqa: F401  (the fake GitHub API server fixture)

PER_DIGIT = [0.99, 0.995, 0.98, 0.985, 0.98, 0.985, 0.99, 0.98, 0.975, 0.97]


def save_run(directory, accuracy, per_digit=PER_DIGIT):
    variables = jax.device_get(init_variables(jax.random.key(0)))
    return checkpoint.save_checkpoint(directory, variables, {"test_accuracy": accuracy, "params": PARAMETERS,
                                                             "per_class_test_accuracy": per_digit})


def zipped(directory) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(directory.iterdir()):
            zf.write(path, path.name)
    return buf.getvalue()


def compare_cli(capsys, *argv):
    code = run_main(compare.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def baseline(gh, tmp_path, capsys):  # noqa: F811
    """The default branch's model, served as an artifact and downloaded with the project's own command."""
    main_run = tmp_path / "main-run"
    main_run.mkdir()
    save_run(main_run, 0.9854)
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.54", "2024-05-01T10:00:00Z", zip_bytes=zipped(main_run)),
                 gh.artifact(2, "mnist-flax-model-acc99.99", "2024-05-02T10:00:00Z", branch="feature")]]
    assert run_main(artifact.main, [REPO, "--dest", str(tmp_path / "baseline")]) == 0
    capsys.readouterr()
    return tmp_path / "baseline"


def test_summary_shows_both_models_and_the_differences(tmp_path, baseline, capsys):
    (tmp_path / "run").mkdir()
    digits = [a + 0.001 for a in PER_DIGIT]
    save_run(tmp_path / "run", 0.9861, digits)
    code, out, err = compare_cli(capsys, tmp_path / "run", baseline)
    assert (code, err) == (0, "")
    assert out.startswith(f"### Against `{baseline}`\n")  # two local folders: named by the baseline's
    assert "| **test accuracy** | 98.61% | 98.54% | **+0.07 pp** |" in out
    assert "| digit 9 | 97.10% | 97.00% | +0.10 pp |" in out
    assert f"| parameters | {PARAMETERS:,} | {PARAMETERS:,} | +0 |" in out
    assert "Regression" not in out


def test_a_drop_beyond_the_threshold_fails_with_one_line(tmp_path, baseline, capsys):
    (tmp_path / "run").mkdir()
    save_run(tmp_path / "run", 0.9790)
    code, out, err = compare_cli(capsys, tmp_path / "run", baseline)
    assert code == 1
    assert "**-0.64 pp**" in out and "**Regression:**" in out
    assert err == ("mnist_flax: error: test accuracy fell by 0.64 percentage points against the baseline "
                   "(98.54% -> 97.90%), more than --max-drop 0.5\n")
    assert compare_cli(capsys, tmp_path / "run", baseline, "--max-drop", "0.7")[0] == 0


def test_no_baseline_says_why_and_passes(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    save_run(tmp_path / "run", 0.9854)
    code, out, _ = compare_cli(capsys, tmp_path / "run", "--no-baseline", "offline run")
    assert code == 0 and "No baseline: offline run." in out and out.startswith("### Against a baseline\n")


def test_the_heading_says_what_the_baseline_is(tmp_path, baseline, capsys):
    """CI names the default branch's model; the heading says so only when told."""
    (tmp_path / "run").mkdir()
    save_run(tmp_path / "run", 0.9854)
    name = ("--baseline-name", "the default branch's model")
    assert compare_cli(capsys, tmp_path / "run", baseline, *name)[1].startswith(
        "### Against the default branch's model\n\nBaseline: `mnist_flax_")
    assert compare_cli(capsys, tmp_path / "run", "--no-baseline", "offline", *name)[1] == \
        "### Against the default branch's model\n\nNo baseline: offline.\n"


def test_a_tampered_baseline_is_refused(tmp_path, baseline, capsys):
    path = checkpoint.find(baseline)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    (tmp_path / "run").mkdir()
    save_run(tmp_path / "run", 0.9854)
    code, _, err = compare_cli(capsys, tmp_path / "run", baseline)
    assert code == 1 and "does not match its sidecar" in err


def test_usage(tmp_path, capsys):
    assert compare_cli(capsys, tmp_path)[0] == 2
    assert compare_cli(capsys, tmp_path, tmp_path, "--no-baseline", "x")[0] == 2
    assert sidecar.FIELDS  # the fields compared are documented sidecar fields
    assert {"test_accuracy", "per_class_test_accuracy", "params"} <= set(sidecar.FIELDS)
    assert np.isclose(compare.MAX_DROP, 0.5)


def test_compare_reads_sidecars_without_loading_jax(tmp_path, env_without_jax):
    """CI runs it after every training: it checks the files and their sidecars, and needs no model."""
    for name, accuracy in (("run", 0.9861), ("main", 0.9854)):
        (tmp_path / name).mkdir()
        save_run(tmp_path / name, accuracy)
    p = subprocess.run([sys.executable, "-m", "mnist_flax.compare", str(tmp_path / "run"), str(tmp_path / "main")],
                       cwd=REPO_ROOT, env=env_without_jax, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (0, ""), p.stderr[-2000:]
    assert "| **test accuracy** | 98.61% | 98.54% | **+0.07 pp** |" in p.stdout
