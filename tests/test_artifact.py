"""mnist_flax.artifact against a real HTTP server on 127.0.0.1 speaking GitHub's shapes.

The zip download answers 302 to `localhost` (a different host than the API's
127.0.0.1), and that storage endpoint fails if an Authorization header arrives.
"""

import datetime as dt
import hashlib
import http.server
import io
import json
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mnist_flax import artifact, github
from mnist_flax.cli import run_main

TOKEN = "good-token"
REPO = "owner/repo"
REPO_ID, FORK_ID = 42, 99
STEM = "mnist_flax_20240501T120000Z_acc98.57"


def make_zip(files: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def checkpoint_files(acc=0.9857, stem=STEM, weights=b"\x82\xa6params\x80fake msgpack", sha=None) -> dict:
    sidecar = {
        "test_accuracy": acc, "train_accuracy": 0.99, "params": 1199882, "seed": 0, "epochs": 1,
        "batch_size": 128, "learning_rate": 0.01, "created": "2024-05-01T12:00:00+00:00",
        "sha256": sha or hashlib.sha256(weights).hexdigest(), "versions": {"jax": "0.10.2"},
    }
    return {
        f"{stem}.msgpack": weights,
        f"{stem}.json": json.dumps(sidecar).encode(),
        "metrics.jsonl": b'{"epoch": 1}\n',
        "loss.png": b"\x89PNG fake",
    }


class FakeGitHub:
    """State the handler serves; tests change it before running the CLI."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.storage = f"http://localhost:{port}"
        self.pages: list[list[dict]] = [[]]
        self.zips: dict[int, bytes] = {}
        self.list_reply = None  # (status, JSON body, headers) replacing the listing
        self.download_reply = None  # same, replacing the 302
        self.delay = 0.0
        self.storage_hits: list[str] = []
        self.storage_auth: list[str] = []
        self.conclusions: dict[int, str] = {}  # run id -> conclusion; "success" when absent
        self.releases: list[dict] = []  # newest first, as GitHub lists them
        self.assets: dict[int, bytes] = {}
        self.api_auth: list[str | None] = []  # the Authorization of every release request

    def release(self, id, tag, published, files: dict[str, bytes], draft=False, prerelease=False,
                digests=True) -> dict:
        """A release in the documented schema, its assets served at 1000 * id + n."""
        assets = []
        for n, (name, data) in enumerate(files.items()):
            self.assets[1000 * id + n] = data
            assets.append({"id": 1000 * id + n, "name": name, "size": len(data), "state": "uploaded",
                           "content_type": "application/octet-stream",
                           "url": f"{self.base}/repos/{REPO}/releases/assets/{1000 * id + n}",
                           "browser_download_url": f"https://github.com/{REPO}/releases/download/{tag}/{name}",
                           **({"digest": "sha256:" + hashlib.sha256(data).hexdigest()} if digests else {})})
        return {"id": id, "tag_name": tag, "name": tag, "draft": draft, "prerelease": prerelease,
                "target_commitish": "abcdef0123456789", "created_at": published,
                "published_at": None if draft else published, "assets": assets}

    def artifact(self, id, name, created, expired=False, zip_bytes=None, branch="main", head_repo=REPO_ID) -> dict:
        """An artifact in the documented listing schema; its run is 1000 + id."""
        self.zips[id] = zip_bytes if zip_bytes is not None else make_zip(checkpoint_files())
        return {
            "id": id, "name": name, "size_in_bytes": len(self.zips[id]), "expired": expired,
            "created_at": created, "expires_at": "2024-08-01T00:00:00Z",
            "archive_download_url": f"{self.base}/repos/{REPO}/actions/artifacts/{id}/zip",
            "workflow_run": {"id": 1000 + id, "repository_id": REPO_ID, "head_repository_id": head_repo,
                             "head_branch": branch, "head_sha": "abcdef0123456789"},
        }


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        gh: FakeGitHub = self.server.gh
        time.sleep(gh.delay)
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/storage/"):
            gh.storage_hits.append(self.headers.get("Host", ""))
            if "Authorization" in self.headers:
                gh.storage_auth.append(self.headers["Authorization"])
                return self.reply(400, b"<Error>Authorization header not allowed with a SAS URL</Error>")
            if not self.headers.get("Host", "").startswith("localhost:"):
                return self.reply(400, b"storage reached without a host change")
            if url.path.startswith("/storage/assets/"):
                return self.reply(200, gh.assets[int(url.path.split("/")[-1])],
                                  {"Content-Type": "application/octet-stream"})
            return self.reply(200, gh.zips[int(url.path.split("/")[-1].removesuffix(".zip"))],
                              {"Content-Type": "application/zip"})
        if url.path.startswith(f"/repos/{REPO}/releases"):  # public: a token is optional, but must be good
            gh.api_auth.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") not in (None, f"Bearer {TOKEN}"):
                return self.reply(401, {"message": "Bad credentials"})
            return self.release_route(gh, url)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(401, {"message": "Bad credentials"})
        if self.headers.get("Accept") != "application/vnd.github+json":
            return self.reply(415, {"message": "wrong Accept"})
        if url.path == f"/repos/{REPO}/actions/artifacts":
            if gh.list_reply:
                return self.reply(*gh.list_reply)
            page = int(urllib.parse.parse_qs(url.query).get("page", ["1"])[0])
            headers = {"Content-Type": "application/json"}
            if page < len(gh.pages):
                headers["Link"] = (f'<{gh.base}/repos/{REPO}/actions/artifacts?per_page=100&page={page + 1}>; rel="next", '
                                   f'<{gh.base}/repos/{REPO}/actions/artifacts?per_page=100&page={len(gh.pages)}>; rel="last"')
            items = gh.pages[page - 1]
            return self.reply(200, {"total_count": sum(map(len, gh.pages)), "artifacts": items}, headers)
        if url.path == f"/repos/{REPO}":
            return self.reply(200, {"id": REPO_ID, "full_name": REPO, "default_branch": "main"})
        m = re.fullmatch(rf"/repos/{REPO}/actions/runs/(\d+)", url.path)
        if m:
            run = int(m.group(1))
            return self.reply(200, {"id": run, "status": "completed", "conclusion": gh.conclusions.get(run, "success")})
        m = re.fullmatch(rf"/repos/{REPO}/actions/artifacts/(\d+)/zip", url.path)
        if m:
            if gh.download_reply:
                return self.reply(*gh.download_reply)
            return self.reply(302, headers={"Location": f"{gh.storage}/storage/{m.group(1)}.zip"})
        return self.reply(404, {"message": "Not Found"})


    def release_route(self, gh: FakeGitHub, url):
        if gh.list_reply:
            return self.reply(*gh.list_reply)
        if url.path == f"/repos/{REPO}/releases":  # drafts are listed only to those who can push
            return self.reply(200, gh.releases, {"Content-Type": "application/json"})
        tag = url.path.removeprefix(f"/repos/{REPO}/releases/tags/")
        found = [r for r in gh.releases if r["tag_name"] == urllib.parse.unquote(tag) and not r["draft"]]
        if found:
            return self.reply(200, found[0])
        m = re.fullmatch(rf"/repos/{REPO}/releases/assets/(\d+)", url.path)
        if m and self.headers.get("Accept") == "application/octet-stream":
            return self.reply(302, headers={"Location": f"{gh.storage}/storage/assets/{m.group(1)}"})
        return self.reply(404, {"message": "Not Found"})


class QuietServer(http.server.ThreadingHTTPServer):
    """A client that hangs up mid-reply (the downloader refusing a redirect) is no server error:
    without this, its BrokenPipeError traceback lands on the test's captured stderr."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture
def gh(monkeypatch, tmp_path):
    server = QuietServer(("127.0.0.1", 0), Handler)
    server.gh = FakeGitHub(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "GH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("MNIST_FLAX_GITHUB_API", server.gh.base)
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    no_gh = tmp_path / "bin"  # the only gh found is the one a test puts here: not the user's
    no_gh.mkdir()
    monkeypatch.setenv("PATH", str(no_gh))
    monkeypatch.chdir(tmp_path)
    yield server.gh
    server.shutdown()
    server.server_close()


def cli(capsys, *argv):
    code = run_main(artifact.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def failed(capsys, *argv, expect: str) -> str:
    code, _, err = cli(capsys, *argv)
    assert code == 1
    assert err.startswith("mnist_flax: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert expect in err, err
    return err


def leftovers(parent) -> list:
    return [p.name for p in parent.iterdir()] if parent.exists() else []


def test_happy_path_extracts_verifies_and_reports(gh, capsys, tmp_path):
    gh.pages = [[gh.artifact(7, "mnist-flax-model-acc98.57", "2024-05-01T12:05:00Z")]]
    code, out, err = cli(capsys, REPO, "--dest", "out/model")
    assert (code, err) == (0, "")
    ckpt = tmp_path / "out" / "model" / f"{STEM}.msgpack"
    assert ckpt.read_bytes() == checkpoint_files()[f"{STEM}.msgpack"]
    assert (ckpt.parent / "metrics.jsonl").exists() and (ckpt.parent / "loss.png").exists()
    assert f"checkpoint: out/model/{STEM}.msgpack" in out
    assert "test accuracy (sidecar): 98.57%" in out
    assert gh.storage_hits and not gh.storage_auth
    assert leftovers(tmp_path / "out") == ["model"]


def test_default_dest_and_gh_token_fallback(gh, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_TOKEN")
    monkeypatch.setenv("GH_TOKEN", TOKEN)
    gh.pages = [[gh.artifact(7, "mnist-flax-model-acc98.57", "2024-05-01T12:05:00Z")]]
    code, out, _ = cli(capsys, REPO)
    assert code == 0
    assert (tmp_path / "artifacts/downloaded/mnist-flax-model-acc98.57" / f"{STEM}.msgpack").exists()


def fake_gh(tmp_path, script: str) -> None:
    """A `gh` on the tests' PATH that runs `script` (sh) for `gh auth token`."""
    path = tmp_path / "bin" / "gh"
    path.write_text(f'#!/bin/sh\n[ "$1 $2" = "auth token" ] || exit 64\n{script}\n')
    path.chmod(0o755)


def test_the_token_of_a_logged_in_gh_is_used(gh, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_TOKEN")
    fake_gh(tmp_path, f"echo {TOKEN}")
    gh.pages = [[gh.artifact(7, "mnist-flax-model-acc98.57", "2024-05-01T12:05:00Z")]]
    assert cli(capsys, REPO, "--dest", "d")[0] == 0


def test_a_gh_that_is_not_logged_in_means_no_token(gh, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_TOKEN")
    fake_gh(tmp_path, "echo 'no oauth token found for github.com' >&2; exit 1")
    failed(capsys, REPO, expect="no GitHub token: pass --token or set GITHUB_TOKEN / GH_TOKEN, or log in to "
                                "GitHub's CLI with `gh auth login`")


def test_token_flag_wins_over_env(gh, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "stale")
    gh.pages = [[gh.artifact(7, "mnist-flax-model-acc98.57", "2024-05-01T12:05:00Z")]]
    assert cli(capsys, REPO, "--token", TOKEN, "--dest", "d")[0] == 0


def test_newest_unexpired_chosen_across_pages(gh, capsys, tmp_path):
    def zip_with(acc):
        return make_zip(checkpoint_files(acc=acc, stem=f"mnist_flax_x_acc{100 * acc:.2f}"))

    gh.pages = [
        [gh.artifact(1, "mnist-flax-model-acc97.00", "2024-05-01T10:00:00Z", zip_bytes=zip_with(0.97)),
         gh.artifact(2, "mnist-flax-model-acc98.00", "2024-05-02T10:00:00Z", zip_bytes=zip_with(0.98))],
        [gh.artifact(3, "mnist-flax-model-acc99.00", "2024-05-03T10:00:00Z", zip_bytes=zip_with(0.99)),
         gh.artifact(4, "something-else", "2024-06-01T10:00:00Z"),
         gh.artifact(5, "mnist-flax-model-acc96.00", "2024-04-01T10:00:00Z", expired=True),
         gh.artifact(6, "mnist-flax-model-acc95.00", "2024-04-30T10:00:00+00:00", zip_bytes=zip_with(0.95))],
    ]
    code, out, _ = cli(capsys, REPO, "--dest", "d")
    assert code == 0
    assert "artifact: mnist-flax-model-acc99.00" in out and "test accuracy (sidecar): 99.00%" in out
    assert gh.storage_hits == [f"localhost:{gh.storage.rsplit(':', 1)[1]}"]


def test_name_prefix_flag(gh, capsys):
    gh.pages = [[gh.artifact(1, "other-model-acc90.00", "2024-05-01T10:00:00Z"),
                 gh.artifact(2, "mnist-flax-model-acc98.00", "2024-05-02T10:00:00Z")]]
    code, out, _ = cli(capsys, REPO, "--dest", "d", "--name-prefix", "other-model")
    assert code == 0 and "artifact: other-model-acc90.00" in out


def test_no_matching_artifact(gh, capsys):
    gh.pages = [[gh.artifact(1, "coverage-report", "2024-05-01T10:00:00Z")]]
    failed(capsys, REPO, expect="no artifact named mnist-flax-model*")


def test_all_matching_expired(gh, capsys, tmp_path):
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-01-01T10:00:00Z", expired=True),
                 gh.artifact(2, "mnist-flax-model-acc98.50", "2024-02-01T10:00:00Z", expired=True)]]
    err = failed(capsys, REPO, expect="artifacts expire after 90 days; re-run the workflow")
    assert "mnist-flax-model-acc98.50" in err
    assert not gh.storage_hits and not (tmp_path / "artifacts").exists()


def test_bad_token_401(gh, capsys):
    failed(capsys, REPO, "--token", "wrong", expect="GitHub rejected the token (401 (Bad credentials))")


def test_forbidden_403(gh, capsys):
    gh.list_reply = (403, {"message": "Resource not accessible by personal access token"},
                     {"x-ratelimit-remaining": "4999"})
    failed(capsys, REPO, expect="token needs read access to Actions (actions:read)")


@pytest.mark.parametrize("status", [403, 429])
def test_rate_limited_says_when_it_resets(gh, capsys, status):
    gh.list_reply = (status, {"message": "API rate limit exceeded"},
                     {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1700000000"})
    err = failed(capsys, REPO, expect="rate limit exceeded")
    assert "resets at 2023-11-14 22:13:20 UTC" in err
    assert "actions:read" not in err


@pytest.mark.parametrize("status", [403, 429])
def test_secondary_rate_limit_reports_its_wait(gh, capsys, status):
    """A secondary limit: 403 or 429 with retry-after, requests still remaining; retry-after wins over reset."""
    gh.list_reply = (status, {"message": "You have exceeded a secondary rate limit. Please wait a few minutes."},
                     {"retry-after": "60", "x-ratelimit-remaining": "4321", "x-ratelimit-reset": "1700000000"})
    err = failed(capsys, REPO, expect="rate limit exceeded while listing artifacts")
    assert "retry after 60 s" in err and "resets at" not in err and "actions:read" not in err


def test_secondary_rate_limit_without_headers_says_wait_a_minute(gh, capsys):
    gh.list_reply = (403, {"message": "You have exceeded a secondary rate limit."}, {"x-ratelimit-remaining": "4321"})
    failed(capsys, REPO, expect="wait at least a minute")


def test_a_fork_pull_requests_artifact_is_refused(gh, capsys):
    """A fork's PR run uploads into the base repository; by default only the repository's own code counts."""
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z"),
                 gh.artifact(2, "mnist-flax-model-acc99.90", "2024-05-02T10:00:00Z", head_repo=FORK_ID)]]
    code, out, _ = cli(capsys, REPO, "--dest", "d")
    assert code == 0 and "artifact: mnist-flax-model-acc98.00" in out
    gh.pages = [[gh.artifact(2, "mnist-flax-model-acc99.90", "2024-05-02T10:00:00Z", head_repo=FORK_ID)]]
    failed(capsys, REPO, "--dest", "e", expect="--allow-forks")
    code, out, _ = cli(capsys, REPO, "--dest", "f", "--allow-forks")
    assert code == 0 and "artifact: mnist-flax-model-acc99.90" in out


def test_the_default_branch_unless_another_is_chosen(gh, capsys):
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z"),
                 gh.artifact(2, "mnist-flax-model-acc99.00", "2024-05-02T10:00:00Z", branch="feature")]]
    code, out, _ = cli(capsys, REPO, "--dest", "d")
    assert code == 0 and "artifact: mnist-flax-model-acc98.00" in out and "on main" in out
    code, out, _ = cli(capsys, REPO, "--dest", "e", "--branch", "feature")
    assert code == 0 and "artifact: mnist-flax-model-acc99.00" in out and "on feature" in out
    failed(capsys, REPO, "--dest", "f", "--branch", "nowhere", expect="branch nowhere")


def test_an_artifact_of_a_failed_run_is_passed_over(gh, capsys):
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z"),
                 gh.artifact(2, "mnist-flax-model-acc99.00", "2024-05-02T10:00:00Z")]]
    gh.conclusions[1002] = "failure"
    code, out, _ = cli(capsys, REPO, "--dest", "d")
    assert code == 0 and "artifact: mnist-flax-model-acc98.00" in out
    gh.conclusions[1001] = "cancelled"
    failed(capsys, REPO, "--dest", "e", expect="comes from a successful run")


def test_repo_not_found_404(gh, capsys):
    failed(capsys, "owner/missing", expect="not found (404)")


def test_gone_410_on_download(gh, capsys, tmp_path):
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z")]]
    gh.download_reply = (410, {"message": "Artifact has expired"})
    failed(capsys, REPO, "--dest", "d", expect="gone (410)")
    assert not (tmp_path / "d").exists()


def test_network_failure_closed_port(gh, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MNIST_FLAX_GITHUB_API", f"http://127.0.0.1:{port}")
    err = failed(capsys, REPO, expect=f"could not reach 127.0.0.1:{port}: ")
    assert "check your network / proxy / MNIST_FLAX_GITHUB_API" in err


def test_network_timeout(gh, capsys):
    gh.delay = 1.0
    err = failed(capsys, REPO, "--timeout", "0.2", expect="could not reach 127.0.0.1")
    assert "timed out" in err and "MNIST_FLAX_GITHUB_API" in err


def test_bad_zip(gh, capsys, tmp_path):
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z", zip_bytes=b"not a zip")]]
    failed(capsys, REPO, "--dest", "out/d", expect="not a valid zip")
    assert leftovers(tmp_path / "out") == []


def test_checksum_mismatch_leaves_nothing(gh, capsys, tmp_path):
    files = checkpoint_files(sha="0" * 64)
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z", zip_bytes=make_zip(files))]]
    failed(capsys, REPO, "--dest", "out/d", expect="does not match its sidecar's")
    assert leftovers(tmp_path / "out") == []


def test_checkpoint_without_sidecar(gh, capsys, tmp_path):
    files = checkpoint_files()
    del files[f"{STEM}.json"]
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z", zip_bytes=make_zip(files))]]
    failed(capsys, REPO, "--dest", "out/d", expect="no sidecar")
    assert leftovers(tmp_path / "out") == []


def test_zip_without_checkpoint(gh, capsys, tmp_path):
    zip_bytes = make_zip({"metrics.jsonl": b"{}\n"})
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z", zip_bytes=zip_bytes)]]
    failed(capsys, REPO, "--dest", "out/d", expect="no .msgpack checkpoint")
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("evil", ["../evil.msgpack", "sub/../../evil.msgpack", "/tmp/evil.msgpack"])
def test_zip_path_traversal_rejected(gh, capsys, tmp_path, evil):
    files = {**checkpoint_files(), evil: b"pwned"}
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z", zip_bytes=make_zip(files))]]
    failed(capsys, REPO, "--dest", "out/d", expect="unsafe path")
    assert leftovers(tmp_path / "out") == []
    assert not (tmp_path / "evil.msgpack").exists()


@pytest.mark.parametrize("compression,expect", [
    (zipfile.ZIP_DEFLATED, "unpacks to more than"),  # a small download that inflates past the cap
    (zipfile.ZIP_STORED, "artifact is larger than"),  # the download itself is over the cap
])
def test_oversized_zip_rejected(gh, capsys, tmp_path, monkeypatch, compression, expect):
    monkeypatch.setattr(artifact, "MAX_BYTES", 2000)
    zip_bytes = make_zip({**checkpoint_files(), "big.bin": b"\0" * 5000}, compression)
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z", zip_bytes=zip_bytes)]]
    failed(capsys, REPO, "--dest", "out/d", expect=expect)
    assert leftovers(tmp_path / "out") == []


def test_existing_dest_is_not_overwritten(gh, capsys, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    gh.pages = [[gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z")]]
    failed(capsys, REPO, "--dest", "d", expect="already exists")
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine" and not gh.storage_hits


def test_no_token(gh, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_TOKEN")
    failed(capsys, REPO, expect="no GitHub token: pass --token or set GITHUB_TOKEN / GH_TOKEN")


def test_token_never_sent_to_a_foreign_download_host(gh, capsys):
    art = gh.artifact(1, "mnist-flax-model-acc98.00", "2024-05-01T10:00:00Z")
    art["archive_download_url"] = art["archive_download_url"].replace("127.0.0.1", "localhost")
    gh.pages = [[art]]
    failed(capsys, REPO, "--dest", "d", expect="refusing to send the token")


def test_fake_storage_rejects_authorization(gh):
    """The redirect tests mean something only if the storage endpoint really refuses a token."""
    gh.zips[1] = b"zip"
    req = urllib.request.Request(f"{gh.storage}/storage/1.zip", headers={"Authorization": "Bearer x"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 400 and gh.storage_auth == ["Bearer x"]


def test_usage_errors_exit_2(gh, capsys):
    code, _, err = cli(capsys, "not-a-repo")
    assert code == 2 and err.startswith("mnist_flax: usage error:") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        cli(capsys)
    assert e.value.code == 2


def test_debug_reraises(gh, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_TOKEN")
    with pytest.raises(github.GitHubError):  # no token: the client says so
        run_main(artifact.main, [REPO, "--debug"])


# Pure helpers


@pytest.mark.parametrize("name,unsafe", [
    ("a.msgpack", False), ("dir/a.json", False), ("a..b.png", False),
    ("../a", True), ("a/../../b", True), ("/etc/passwd", True), ("\\x", True), ("C:/x", True), ("a\\..\\b", True),
])
def test_unsafe_member(name, unsafe):
    assert artifact.unsafe_member(name) is unsafe


def test_choose_artifact_mixed_time_formats():
    listing = [
        {"id": 1, "name": "mnist-flax-model-a", "created_at": "2024-05-02T00:00:00", "expired": False},
        {"id": 2, "name": "mnist-flax-model-b", "created_at": "2024-05-01T00:00:00Z", "expired": False},
        {"id": 3, "name": "mnist-flax-model-c", "created_at": None, "expired": False},
    ]
    assert artifact.choose_artifact(listing, "mnist-flax-model")[0]["id"] == 1


def test_next_link():
    link = '<https://api.github.com/x?page=2>; rel="next", <https://api.github.com/x?page=5>; rel="last"'
    assert github.next_link(link) == "https://api.github.com/x?page=2"
    assert github.next_link('<https://api.github.com/x?page=1>; rel="prev"') is None
    assert github.next_link(None) is None


listing_item = st.fixed_dictionaries({
    "id": st.integers(1, 10**6),
    "name": st.sampled_from(["mnist-flax-model-acc98.00", "mnist-flax-model-acc99.10", "other"]),
    "created_at": st.datetimes(timezones=st.just(dt.timezone.utc)).map(
        lambda d: d.isoformat().replace("+00:00", "Z")),
    "expired": st.booleans(),
})


@given(st.lists(listing_item, max_size=12))
def test_choose_artifact_is_the_newest_alive_match(listing):
    alive = [a for a in listing if a["name"].startswith("mnist-flax-model") and not a["expired"]]
    if not alive:
        with pytest.raises(artifact.ArtifactError):
            artifact.choose_artifact(listing, "mnist-flax-model")
        return
    chosen = artifact.choose_artifact(listing, "mnist-flax-model")[0]
    assert chosen in alive
    assert all(artifact._created(a) <= artifact._created(chosen) for a in alive)
