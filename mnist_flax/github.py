"""A small GitHub REST client: JSON and downloads, one-line errors, and the token kept to the API.

The token goes only to the API's own origin: a redirect to another host (the pre-signed
storage URL a download is sent to) is followed without it. Rate limits, rejected tokens and
unreachable hosts each become one GitHubError that says what to do.
"""

import datetime as dt
import http.client
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from mnist_flax.errors import MnistFlaxError

DEFAULT_API = "https://api.github.com"
API_ENV = "MNIST_FLAX_GITHUB_API"  # another API root: GitHub Enterprise, or a test's server


class GitHubError(MnistFlaxError):
    """GitHub cannot be reached, refuses the request, or answers what it should not."""


def api_root() -> str:
    return os.environ.get(API_ENV, DEFAULT_API).rstrip("/")


def next_link(link_header: str | None) -> str | None:
    """The rel="next" URL of a GitHub Link header, if any."""
    for part in (link_header or "").split(","):
        m = re.match(r'\s*<([^>]*)>\s*;.*\brel="?next"?', part)
        if m:
            return m.group(1)
    return None


class _StripAuthOnHostChange(urllib.request.HTTPRedirectHandler):
    # urllib copies every header onto the redirected request; GitHub redirects
    # the zip to a pre-signed storage URL that must not see our token.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def rate_limit_wait(status: int, headers, message: str) -> str | None:
    """How long GitHub asks a rate-limited client to wait, or None if this is no rate limit.

    As GitHub documents it: a primary or secondary limit answers 403 or 429. Wait the
    `retry-after` seconds if given; else, if `x-ratelimit-remaining` is 0, until
    `x-ratelimit-reset`; else (a secondary limit without either) at least a minute.
    """
    if status not in (403, 429):
        return None
    retry, remaining, reset = (headers.get(h, "") for h in ("retry-after", "x-ratelimit-remaining", "x-ratelimit-reset"))
    if retry.isdigit():
        return f"retry after {int(retry)} s"
    if remaining == "0" and reset.isdigit():
        return f"it resets at {dt.datetime.fromtimestamp(int(reset), dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    if status == 429 or remaining == "0" or "rate limit" in message.lower():
        return "wait at least a minute before retrying"
    return None


def _http_error(e: urllib.error.HTTPError, what: str) -> GitHubError:
    try:
        detail = json.loads(e.read(64 * 1024) or b"{}").get("message", "")
    except (ValueError, AttributeError, OSError):
        detail = ""
    detail = f" ({detail})" if detail else ""
    wait = rate_limit_wait(e.code, e.headers, detail)
    if wait:
        return GitHubError(f"GitHub API rate limit exceeded while {what}{detail}; {wait}")
    if e.code == 401:
        return GitHubError(f"GitHub rejected the token (401{detail}); check --token / GITHUB_TOKEN / GH_TOKEN")
    if e.code == 403:
        return GitHubError(
            f"forbidden (403{detail}) while {what}; the token needs read access to Actions (actions:read)"
        )
    if e.code == 404:
        return GitHubError(
            f"not found (404) while {what}; check OWNER/REPO, and that the token can see a private repository"
        )
    if e.code == 410:
        return GitHubError(
            f"the artifact is gone (410) while {what}; artifacts expire after 90 days; re-run the workflow"
        )
    return GitHubError(f"HTTP {e.code} {e.reason}{detail} while {what}")


def open_api(url: str, token: str | None, what: str, timeout: float, accept: str = "application/vnd.github+json"):
    """Opens `url` of the API, with the token if there is one (public releases need none)."""
    headers = {"Accept": accept, "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "mnist-flax-artifact"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.build_opener(_StripAuthOnHostChange).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise _http_error(e, what) from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise unreachable(url, e) from e


def unreachable(url: str, e: Exception) -> GitHubError:
    reason = getattr(e, "reason", None) or e
    host = urllib.parse.urlsplit(url).netloc
    return GitHubError(f"could not reach {host}: {reason}; check your network / proxy / MNIST_FLAX_GITHUB_API")


def same_origin(url: str, base: str) -> str:
    # The token goes to every URL we open ourselves, so only ever open the API's.
    u, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base)
    if (u.scheme, u.netloc) != (b.scheme, b.netloc):
        raise GitHubError(f"refusing to send the token to {u.scheme}://{u.netloc} (API is {base})")
    return url


def read_json(resp, url: str, api: str, what: str):
    """The parsed JSON body of an open API response; one GitHubError if it is none or breaks off."""
    try:
        return json.loads(resp.read())
    except (ValueError, RecursionError) as e:
        raise GitHubError(f"unexpected answer from {api} while {what}: {e}"[:300]) from None
    except (OSError, http.client.HTTPException) as e:
        raise unreachable(url, e) from e


def get_json(api: str, path: str, token: str | None, what: str, timeout: float) -> dict:
    url = f"{api}{path}"
    with open_api(url, token, what, timeout) as resp:
        value = read_json(resp, url, api, what)
    if not isinstance(value, dict):
        raise GitHubError(f"unexpected answer from {api} while {what}: not a JSON object")
    return value


def pages(api: str, url: str, token: str | None, what: str, timeout: float, max_pages: int) -> Iterator:
    """Each page of a paginated listing from `url` on, as parsed JSON, following rel="next" links
    (only within the API's origin) for at most `max_pages` pages."""
    for _ in range(max_pages):
        with open_api(url, token, what, timeout) as resp:
            page = read_json(resp, url, api, what)
            url = next_link(resp.headers.get("Link"))
        yield page
        if not url:
            return
        same_origin(url, api)


def download(url: str, token: str | None, into, timeout: float, max_bytes: int, what: str = "the artifact",
             accept: str = "application/vnd.github+json") -> None:
    """Streams `url` into the open file `into`, refusing more than `max_bytes`."""
    with open_api(url, token, f"downloading {what}", timeout, accept) as resp:
        total = 0
        try:
            while chunk := resp.read(1 << 20):
                total += len(chunk)
                if total > max_bytes:
                    raise GitHubError(f"{what} is larger than {max_bytes / 2**20:g} MiB; refusing it")
                into.write(chunk)
        except (OSError, http.client.HTTPException) as e:
            raise unreachable(url, e) from e


GH_TIMEOUT_S = 10.0


def gh_auth_token() -> str | None:
    """The token GitHub's CLI is logged in with (`gh auth token`), or None without gh or a login."""
    gh = shutil.which("gh")
    if gh is None:
        return None
    try:
        result = subprocess.run([gh, "auth", "token"], capture_output=True, text=True, timeout=GH_TIMEOUT_S,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    token = result.stdout.strip()
    return token if result.returncode == 0 and token else None


def token(flag: str | None, required: bool = True) -> str | None:
    """--token, else $GITHUB_TOKEN, else $GH_TOKEN, else GitHub's CLI's; None if there is none and
    none is `required` (a public repository's releases)."""
    token = flag or os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN") or gh_auth_token()
    if not token and required:
        raise GitHubError(
            "no GitHub token: pass --token or set GITHUB_TOKEN / GH_TOKEN, or log in to GitHub's CLI with "
            "`gh auth login` (downloading artifacts needs a token even from public repositories)"
        )
    return token
