"""A model that CI published as a GitHub Release: chosen, downloaded, verified and unpacked.

    python -m mnist_flax.artifact OWNER/REPO --release [TAG]

CI publishes one release per push to the default branch, tagged `model-<UTC date>-<short sha>`
(TAG_PREFIX), with the checkpoint, its sidecar, the exports, the model card and the plots as
assets. Releases are public for a public repository, so no token is needed; one is sent when
given, and then only to the API (github.py). Without a TAG the newest published `model-*`
release is taken; drafts and prereleases never are. Every asset must have a plain file name,
stay within the size limits and match the sha256 digest GitHub reports for it; the checkpoint
must match the sha256 in its sidecar. Only then is the folder moved into place, whole.
"""

import dataclasses
import datetime as dt
import hashlib
import re
import urllib.parse
from pathlib import Path

from mnist_flax import sidecar
from mnist_flax.atomic import staged_directory
from mnist_flax.checkpoint import SUFFIX as CHECKPOINT_SUFFIX
from mnist_flax.github import GitHubError, download, get_json, pages, same_origin

TAG_PREFIX = "model-"
MAX_PAGES = 10
ASSET_NAME = re.compile(r"[\w-][\w.-]*")  # one plain path component: it becomes a file name here


class ReleaseError(GitHubError):
    """The release cannot be found, downloaded or verified."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_bytes: int  # on each asset and on all of them together
    timeout: float


def tag_for(created: dt.datetime, sha: str) -> str:
    """The tag CI gives the release of commit `sha` built at `created` (UTC)."""
    return f"{TAG_PREFIX}{created.astimezone(dt.timezone.utc):%Y-%m-%d}-{sha[:7]}"


def published(release: dict) -> tuple[str, int]:
    return str(release.get("published_at") or release.get("created_at") or ""), int(release.get("id") or 0)


def choose_release(releases: list[dict]) -> dict:
    """The newest published, non-draft, non-prerelease release whose tag starts with TAG_PREFIX."""
    models = [r for r in releases if str(r.get("tag_name", "")).startswith(TAG_PREFIX)]
    usable = [r for r in models if not r.get("draft") and not r.get("prerelease")]
    if not usable:
        held = f" ({len(models)} are drafts or prereleases)" if models else ""
        raise ReleaseError(f"no published release tagged {TAG_PREFIX}*{held}; has the workflow run on the "
                           "default branch? Without releases, download the artifact instead (drop --release)")
    return max(usable, key=published)


def list_releases(api: str, repo: str, token: str | None, limits: Limits) -> list[dict]:
    url, found = f"{api}/repos/{repo}/releases?per_page=100", []
    for page in pages(api, url, token, f"listing the releases of {repo}", limits.timeout, MAX_PAGES):
        if not isinstance(page, list):
            raise ReleaseError(f"unexpected answer from {api} while listing releases: not a JSON list")
        found += [r for r in page if isinstance(r, dict)]
    return found


def find_release(api: str, repo: str, tag: str | None, token: str | None, limits: Limits) -> dict:
    if tag is None:
        return choose_release(list_releases(api, repo, token, limits))
    release = get_json(api, f"/repos/{repo}/releases/tags/{urllib.parse.quote(tag, safe='')}", token,
                       f"reading release {tag} of {repo}", limits.timeout)
    if release.get("draft") or release.get("prerelease"):
        raise ReleaseError(f"release {tag} is a draft or a prerelease, not a published model; choose another tag")
    return release


def checked_assets(release: dict, limits: Limits) -> list[dict]:
    """The release's assets, refused unless every name is plain and the sizes are within the limits."""
    assets = release.get("assets")
    if not isinstance(assets, list) or not assets:
        raise ReleaseError(f"release {release.get('tag_name')} has no assets")
    for asset in assets:
        name = str(asset.get("name", ""))
        if not ASSET_NAME.fullmatch(name) or name in (".", ".."):
            raise ReleaseError(f"release asset {name!r} is not a plain file name; refusing the release")
        if not isinstance(asset.get("size"), int) or asset["size"] > limits.max_bytes:
            raise ReleaseError(f"release asset {name} is larger than {limits.max_bytes / 2**20:g} MiB; refusing it")
    if sum(a["size"] for a in assets) > limits.max_bytes:
        raise ReleaseError(f"release {release.get('tag_name')} is larger than {limits.max_bytes / 2**20:g} MiB "
                           "in all; refusing it")
    if not any(str(a["name"]).endswith(CHECKPOINT_SUFFIX) for a in assets):
        raise ReleaseError(f"release {release.get('tag_name')} holds no {CHECKPOINT_SUFFIX} checkpoint")
    return assets


def check_digest(path: Path, asset: dict) -> None:
    """GitHub reports each asset's `digest` as "sha256:<hex>"; a file that differs is refused."""
    digest = asset.get("digest")
    if digest is None:
        return
    want = str(digest).removeprefix("sha256:")
    if hashlib.sha256(path.read_bytes()).hexdigest() != want:
        raise ReleaseError(f"release asset {asset['name']} does not match its sha256 digest; refusing the release")


def download_release(api: str, repo: str, release: dict, dest: Path, token: str | None, limits: Limits) -> list[Path]:
    """Downloads every asset into a folder beside `dest`, verifies them, then moves it to `dest`.

    Returns the checkpoints in `dest`. `dest` must not exist; on any failure nothing is left.
    """
    assets = checked_assets(release, limits)
    if dest.exists():
        raise ReleaseError(f"{dest} already exists; remove it or choose another --dest")
    try:
        with staged_directory(dest) as tmp:
            for asset in assets:
                target = tmp / asset["name"]
                with open(target, "wb") as out:  # the API's asset URL; it redirects to storage, without the token
                    download(same_origin(str(asset.get("url")), api), token, out, limits.timeout, limits.max_bytes,
                             f"release asset {asset['name']}", accept="application/octet-stream")
                check_digest(target, asset)
            checkpoints = sorted(tmp.glob(f"*{CHECKPOINT_SUFFIX}"))
            for ckpt in checkpoints:
                sidecar.verify(ckpt, ckpt.read_bytes(), sidecar.read(ckpt), required=True)
    except OSError as e:
        raise ReleaseError(f"could not write the release into {dest}: {e}") from e
    return [dest / c.name for c in checkpoints]
