"""Fetch the newest trained checkpoint that CI uploaded as a GitHub Actions artifact, or published.

    python -m mnist_flax.artifact OWNER/REPO [--dest DIR] [--token T] [--evaluate]
                                  [--branch B] [--allow-forks]
    python -m mnist_flax.artifact OWNER/REPO --release [TAG] [--dest DIR] [--evaluate]

With --release it takes a published model release instead (release.py): permanent, and with
no token needed for a public repository. Without it:

Lists the repository's artifacts and takes the newest unexpired one whose name starts
with the prefix and that a successful run on the repository's default branch (or
`--branch`) uploaded, from the repository's own code: runs for pull requests from forks
upload into the base repository too, and a sha256 proves integrity, not origin
(`--allow-forks` lifts that). It downloads the zip, unpacks it safely and atomically, and
checks every checkpoint against the sha256 in its sidecar JSON.
"""

import dataclasses
import datetime as dt
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from mnist_flax import cli, github, release, sidecar
from mnist_flax.cli import ArgumentParser, add_debug_flag
from mnist_flax.atomic import staged_directory
from mnist_flax.errors import UsageError
from mnist_flax.github import GitHubError, download, get_json, same_origin

DEFAULT_PREFIX = "mnist-flax-model"
TIMEOUT_S = 30.0
MAX_BYTES = 256 * 1024 * 1024  # cap on the download and on the unpacked total
MAX_PAGES = 20  # 2000 artifacts is far more than this project ever keeps


class ArtifactError(GitHubError):
    """The artifact cannot be listed, downloaded, unpacked or verified."""


@dataclasses.dataclass(frozen=True)
class Trust:
    """Which runs' artifacts to take: those of `branch`, built from the repository's own code."""

    branch: str
    repository_id: int
    allow_forks: bool = False

    def admits(self, artifact: dict) -> bool:
        run = artifact.get("workflow_run") or {}
        if run.get("head_branch") != self.branch:
            return False
        return self.allow_forks or run.get("head_repository_id") == run.get("repository_id") == self.repository_id


def choose_artifact(listing: list[dict], prefix: str, trust: Trust | None = None) -> list[dict]:
    """Unexpired artifacts named `prefix`* that `trust` admits (all, without it), newest first."""
    matching = [a for a in listing if str(a.get("name", "")).startswith(prefix)]
    if not matching:
        raise ArtifactError(f"no artifact named {prefix}* found; has the training workflow run and finished?")
    admitted = [a for a in matching if trust is None or trust.admits(a)]
    if not admitted:
        raise ArtifactError(
            f"none of the {len(matching)} artifacts named {prefix}* comes from a run on branch {trust.branch} of "
            "the repository's own code; choose another with --branch, or take forks' with --allow-forks")
    # Ties on created_at (same run) fall back to the larger, i.e. later, id.
    newest_first = sorted(admitted, key=lambda a: (_created(a), a.get("id", 0)), reverse=True)
    alive = [a for a in newest_first if not a.get("expired")]
    if not alive:
        a = newest_first[0]
        raise ArtifactError(
            f"the newest matching artifact {a.get('name')} has expired ({a.get('expires_at') or 'expired'}); "
            "artifacts expire after 90 days; re-run the workflow"
        )
    return alive


def _created(artifact: dict) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(str(artifact.get("created_at")))
    except ValueError:
        when = dt.datetime.min
    # Naive and aware datetimes don't compare; GitHub's times are UTC anyway.
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def unsafe_member(name: str) -> bool:
    """True for zip member names that could land outside the extraction dir."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None or ".." in parts


def list_artifacts(api: str, repo: str, token: str, timeout: float) -> list[dict]:
    # No `name=` filter: GitHub matches it exactly, and our names end in the accuracy.
    url, found = f"{api}/repos/{repo}/actions/artifacts?per_page=100", []
    for page in github.pages(api, url, token, f"listing artifacts of {repo}", timeout, MAX_PAGES):
        try:
            found.extend(page["artifacts"])
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"unexpected answer from {api} while listing artifacts: {e}"[:300]) from None
    return found


def repository_trust(api: str, repo: str, token: str, timeout: float, branch: str | None,
                     allow_forks: bool) -> Trust:
    info = get_json(api, f"/repos/{repo}", token, f"reading {repo}", timeout)
    if not isinstance(info.get("id"), int) or not isinstance(info.get("default_branch"), str):
        raise ArtifactError(f"unexpected answer from {api} while reading {repo}: no id or default_branch")
    return Trust(branch or info["default_branch"], info["id"], allow_forks)


def first_successful(api: str, repo: str, token: str, timeout: float, candidates: list[dict]) -> dict:
    """The first candidate whose workflow run concluded successfully (an artifact can outlive a failed run)."""
    for candidate in candidates:
        run_id = (candidate.get("workflow_run") or {}).get("id")
        if not isinstance(run_id, int):
            continue
        run = get_json(api, f"/repos/{repo}/actions/runs/{run_id}", token, f"reading run {run_id}", timeout)
        if run.get("conclusion") == "success":
            return candidate
    raise ArtifactError(f"none of the {len(candidates)} matching artifacts comes from a successful run; "
                        "re-run the workflow")


def extract_verified(zip_file, dest: Path) -> list[Path]:
    """Unpacks into `dest` (which must not exist) only if every checksum holds."""
    _check_free(dest)
    try:
        with staged_directory(dest) as tmp:
            extract_checked(zip_file, tmp)
            checkpoints = sorted(tmp.rglob("*.msgpack"))
            if not checkpoints:
                raise ArtifactError("the artifact holds no .msgpack checkpoint")
            for ckpt in checkpoints:
                verify_checksum(ckpt)
            found = [c.relative_to(tmp) for c in checkpoints]
    except OSError as e:
        raise ArtifactError(f"could not unpack into {dest}: {e}") from e
    return [dest / c for c in found]


def extract_checked(zip_file, into: Path) -> None:
    """The zip's files into `into`, refused whole if a name could land outside or it unpacks too large."""
    try:
        with zipfile.ZipFile(zip_file) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            bad = [m.filename for m in members if unsafe_member(m.filename)]
            if bad:
                raise ArtifactError(f"artifact zip has an unsafe path {bad[0]!r}; refusing to unpack it")
            if sum(m.file_size for m in members) > MAX_BYTES:
                raise ArtifactError(f"artifact unpacks to more than {MAX_BYTES / 2**20:g} MiB; refusing it")
            for m in members:
                target = into / m.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise ArtifactError(f"the downloaded artifact is not a valid zip: {e}") from e


def _check_free(dest: Path) -> None:
    if dest.exists():
        raise ArtifactError(f"{dest} already exists; remove it or choose another --dest")


def verify_checksum(ckpt: Path) -> None:
    """The checkpoint's sha256 must match its sidecar's: an artifact has to prove its integrity."""
    sidecar.verify(ckpt, ckpt.read_bytes(), sidecar.read(ckpt), required=True)


def _percent(acc) -> str:
    return f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m mnist_flax.artifact", description=__doc__.splitlines()[0])
    p.add_argument("repo", help="GitHub repository as OWNER/REPO")
    p.add_argument("--dest", type=Path, help="where to unpack (default artifacts/downloaded/<artifact name>)")
    p.add_argument("--token", help="GitHub token (default: $GITHUB_TOKEN, then $GH_TOKEN, then `gh auth token`)")
    p.add_argument("--name-prefix", default=DEFAULT_PREFIX, help="artifact name prefix (default %(default)s)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per request (default %(default)s)")
    p.add_argument("--evaluate", action="store_true", help="also measure the checkpoint's test accuracy")
    p.add_argument("--branch", help="take runs on this branch (default: the repository's default branch)")
    p.add_argument("--allow-forks", action="store_true",
                   help="also take artifacts of runs on code from other repositories (forks' pull requests)")
    p.add_argument("--release", nargs="?", const="", metavar="TAG",
                   help=f"take a published release instead: TAG, or the newest {release.TAG_PREFIX}* one "
                        "(no token needed for a public repository)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", args.repo):
        raise UsageError(f"repository must look like OWNER/REPO, got {args.repo!r}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")

    if args.release is not None and (args.branch or args.allow_forks or args.name_prefix != DEFAULT_PREFIX):
        raise UsageError("--branch, --allow-forks and --name-prefix choose artifacts; a release is chosen by its tag")
    api = github.api_root()
    fetch = fetch_release if args.release is not None else fetch_artifact
    checkpoints = fetch(api, args)

    for ckpt in checkpoints:
        meta = sidecar.read(ckpt) or {}
        print(f"checkpoint: {ckpt} (sha256 verified)")
        print(f"test accuracy (sidecar): {_percent(meta.get('test_accuracy'))}")
        if args.evaluate:
            from mnist_flax.evaluate import evaluate_checkpoint  # loads JAX: only when asked

            measured = evaluate_checkpoint(str(ckpt))["accuracy"]
            print(f"test accuracy (measured): {_percent(measured)} (sidecar: {_percent(meta.get('test_accuracy'))})")
    return 0


def plain_name(name: str, fallback: str) -> str:
    """`name`, which comes from the server and becomes a path, if it is one plain component."""
    return name if re.fullmatch(r"[\w-][\w.-]*", name) else fallback


def fetch_artifact(api: str, args) -> list[Path]:
    token = github.token(args.token)
    trust = repository_trust(api, args.repo, token, args.timeout, args.branch, args.allow_forks)
    candidates = choose_artifact(list_artifacts(api, args.repo, token, args.timeout), args.name_prefix, trust)
    art = first_successful(api, args.repo, token, args.timeout, candidates)
    run = art.get("workflow_run") or {}
    print(f"artifact: {art['name']} (created {art.get('created_at')}, run {run.get('id')} "
          f"on {run.get('head_branch')} @ {str(run.get('head_sha'))[:7]})")
    dest = args.dest or Path("artifacts", "downloaded", plain_name(art["name"], f"artifact-{art.get('id')}"))
    _check_free(dest)  # before spending time on the download
    with tempfile.TemporaryFile() as zip_file:
        download(same_origin(art["archive_download_url"], api), token, zip_file, args.timeout, MAX_BYTES)
        zip_file.seek(0)
        return extract_verified(zip_file, dest)


def fetch_release(api: str, args) -> list[Path]:
    token = github.token(args.token, required=False)
    limits = release.Limits(MAX_BYTES, args.timeout)
    chosen = release.find_release(api, args.repo, args.release or None, token, limits)
    tag = str(chosen.get("tag_name"))
    print(f"release: {tag} (published {chosen.get('published_at')}, commit {str(chosen.get('target_commitish'))[:7]})")
    dest = args.dest or Path("artifacts", "downloaded", plain_name(tag, f"release-{chosen.get('id')}"))
    _check_free(dest)
    return release.download_release(api, args.repo, chosen, dest, token, limits)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
