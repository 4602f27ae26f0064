"""`python -m mnist_flax.artifact OWNER/REPO --release [TAG]` against the fake GitHub of test_artifact.py.

Release assets redirect to a storage host that refuses an Authorization header, as the
artifact zips do; the release routes take a request without any token, as a public repository's.
"""

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import test_artifact
from mnist_flax import release, sidecar
from test_artifact import REPO, STEM, TOKEN, checkpoint_files, cli, failed, leftovers

REPO_ROOT = Path(__file__).resolve().parent.parent
fake_github = test_artifact.gh  # test_artifact's fixture, found by pytest under this name

DAY1, DAY2, DAY3 = "2026-12-01T10:00:00Z", "2026-12-02T10:00:00Z", "2026-12-03T10:00:00Z"


def model_files(acc=0.9857, stem=STEM) -> dict[str, bytes]:
    """What CI publishes, in miniature: the checkpoint and its sidecar, the exports, the card, a plot."""
    files = {k: v for k, v in checkpoint_files(acc, stem).items() if k.startswith(stem)}
    return {**files, f"{stem}.onnx": b"onnx", f"{stem}.safetensors": b"st", "MODEL_CARD.md": b"# card\n",
            "confusion_matrix.png": b"\x89PNG fake"}


@pytest.fixture
def public(fake_github, monkeypatch):
    """The fake GitHub, asked with no token at all (a public repository)."""
    monkeypatch.delenv("GITHUB_TOKEN")
    return fake_github


def test_the_newest_published_release_is_downloaded_without_a_token(public, capsys, tmp_path):
    public.releases = [
        public.release(4, "model-2026-12-04-dddd000", DAY3, model_files(0.97), draft=True),
        public.release(3, "model-2026-12-03-ccc0000", DAY3, model_files(0.96), prerelease=True),
        public.release(2, "model-2026-12-02-bbb0000", DAY2, model_files(0.9857)),
        public.release(5, "v1.0", DAY3, {"source.zip": b"not a model"}),
        public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files(0.95)),
    ]
    code, out, err = cli(capsys, REPO, "--release", "--dest", "model")
    assert (code, err) == (0, ""), err
    assert "release: model-2026-12-02-bbb0000" in out and "test accuracy (sidecar): 98.57%" in out
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(model_files())
    assert (tmp_path / "model" / f"{STEM}.onnx").read_bytes() == b"onnx"
    assert set(public.api_auth) == {None}  # no token was sent anywhere
    assert public.storage_hits and not public.storage_auth
    assert sorted(leftovers(tmp_path)) == ["bin", "model"]


def test_a_named_tag_and_the_default_destination(public, capsys, tmp_path):
    public.releases = [public.release(2, "model-2026-12-02-bbb0000", DAY2, model_files(0.99)),
                       public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files(0.95))]
    code, out, _ = cli(capsys, REPO, "--release", "model-2026-12-01-aaa0000")
    assert code == 0 and "test accuracy (sidecar): 95.00%" in out
    assert (tmp_path / "artifacts/downloaded/model-2026-12-01-aaa0000" / f"{STEM}.msgpack").is_file()


def test_a_given_token_goes_to_the_api_but_never_to_storage(fake_github, capsys):
    gh = fake_github
    gh.releases = [gh.release(1, "model-2026-12-01-aaa0000", DAY1, model_files())]
    assert cli(capsys, REPO, "--release", "--dest", "d")[0] == 0
    assert set(gh.api_auth) == {f"Bearer {TOKEN}"} and gh.storage_hits and not gh.storage_auth


def test_a_named_tag_that_is_a_prerelease_is_refused(public, capsys, tmp_path):
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files(), prerelease=True)]
    failed(capsys, REPO, "--release", "model-2026-12-01-aaa0000", expect="is a draft or a prerelease")
    assert leftovers(tmp_path) == ["bin"]


def test_an_unknown_tag(public, capsys):
    failed(capsys, REPO, "--release", "model-1999-01-01-0000000", expect="not found (404) while reading release")


def test_no_model_release_says_what_to_do_instead(public, capsys):
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files(), draft=True),
                       public.release(2, "v1.0", DAY2, {"a.zip": b"x"})]
    failed(capsys, REPO, "--release", expect="no published release tagged model-* (1 are drafts or prereleases)")


def test_a_release_without_a_checkpoint(public, capsys, tmp_path):
    files = {k: v for k, v in model_files().items() if not k.endswith(".msgpack")}
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, files)]
    failed(capsys, REPO, "--release", expect="holds no .msgpack checkpoint")
    assert leftovers(tmp_path) == ["bin"]


def test_a_tampered_checkpoint_is_refused_and_nothing_is_left(public, capsys, tmp_path):
    """Its digest updated along with it (as an attacker with write access would): the sidecar's sha256 still refuses it."""
    files = model_files()
    files[f"{STEM}.msgpack"] = b"\x82\xa6params\x80tampered"
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, files)]
    failed(capsys, REPO, "--release", "--dest", "out/model", expect="sha256")
    assert leftovers(tmp_path / "out") == []


def test_an_asset_that_differs_from_its_digest_is_refused(public, capsys, tmp_path):
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files())]
    public.assets[1000 + 2] = b"changed in storage"  # the .onnx, after GitHub recorded its digest
    failed(capsys, REPO, "--release", "--dest", "m", expect="release asset mnist_flax_20240501T120000Z_acc98.57.onnx "
           "does not match its sha256 digest")
    assert leftovers(tmp_path) == ["bin"]


def test_assets_without_digests_are_verified_by_the_sidecar_alone(public, capsys, tmp_path):
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files(), digests=False)]
    assert cli(capsys, REPO, "--release", "--dest", "m")[0] == 0


@pytest.mark.parametrize("name", ["../escape.msgpack", "a/b.png", ".hidden", ".."])
def test_an_asset_name_that_is_no_plain_file_name_is_refused(public, capsys, tmp_path, name):
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, {**model_files(), name: b"x"})]
    failed(capsys, REPO, "--release", expect="is not a plain file name")
    assert leftovers(tmp_path) == ["bin"]


def test_oversized_assets_are_refused_before_any_download(public, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("mnist_flax.artifact.MAX_BYTES", 100)
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files())]
    public.releases[0]["assets"][0]["size"] = 101
    failed(capsys, REPO, "--release", expect="is larger than")
    assert not public.storage_hits


def test_an_asset_larger_than_it_said_is_cut_off(public, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("mnist_flax.artifact.MAX_BYTES", 100_000)
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files())]
    public.assets[1000 + 3] = b"x" * 100_001  # the storage serves more than the listing's size
    failed(capsys, REPO, "--release", "--dest", "m", expect="is larger than 0.0953674 MiB")
    assert leftovers(tmp_path) == ["bin"]


def test_an_existing_destination_is_kept(public, capsys, tmp_path):
    (tmp_path / "m").mkdir()
    public.releases = [public.release(1, "model-2026-12-01-aaa0000", DAY1, model_files())]
    failed(capsys, REPO, "--release", "--dest", "m", expect="already exists")
    assert not public.storage_hits


@pytest.mark.parametrize("status", [403, 429])
def test_the_unauthenticated_rate_limit(public, capsys, status):
    public.list_reply = (status, {"message": "API rate limit exceeded for 127.0.0.1."},
                         {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1893456000"})
    failed(capsys, REPO, "--release", expect="rate limit exceeded while listing the releases of owner/repo")


def test_an_answer_that_is_no_list(public, capsys):
    public.list_reply = (200, json.dumps({"message": "odd"}).encode(), {})
    failed(capsys, REPO, "--release", expect="not a JSON list")


def test_artifact_flags_do_not_mix_with_a_release(public, capsys):
    code, _, err = cli(capsys, REPO, "--release", "--branch", "dev")
    assert code == 2 and "a release is chosen by its tag" in err


def test_the_tag_ci_gives_a_commit():
    when = dt.datetime(2026, 12, 7, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert release.tag_for(when, "4c70d2d0123") == "model-2026-12-08-4c70d2d"  # the UTC date


@pytest.mark.slow
def test_the_readmes_release_command_runs_as_written(public, tmp_path, trained_checkpoint, mnist_data_dir,
                                                     mnist_manual_dir):
    """The README's line, in a process of its own, against the fake GitHub publishing a real model:
    downloaded without a token, verified, and evaluated to the accuracy its sidecar states."""
    import test_readme
    [line] = [cmd for cmd in test_readme.shell_commands() if "--release" in cmd]
    files = {p.name: p.read_bytes() for p in (trained_checkpoint, sidecar.path_for(trained_checkpoint))}
    public.releases = [public.release(1, "model-2026-12-07-4c70d2d", DAY1, files)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TFDS_DATA_DIR": str(mnist_data_dir),
           "MNIST_FLAX_MANUAL_DIR": str(mnist_manual_dir)}
    argv = shlex.split(line.replace("OWNER/REPO", REPO))
    result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    print(result.stdout)
    accuracy = f"{sidecar.read(trained_checkpoint)['test_accuracy']:.2%}"
    assert "release: model-2026-12-07-4c70d2d" in result.stdout
    assert f"test accuracy (measured): {accuracy} (sidecar: {accuracy})" in result.stdout
    assert (tmp_path / "model" / trained_checkpoint.name).read_bytes() == trained_checkpoint.read_bytes()
    assert set(public.api_auth) == {None}
