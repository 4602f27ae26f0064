"""Command line: the static demo site, the drawing page running the exported model in the browser.

    python -m mnist_flax.site CHECKPOINT_OR_DIR [-o DIR] [--onnxruntime-web TGZ]

Writes DIR (default site/), whole or not at all, for any static host (GitHub Pages, or
`python -m http.server -d site`); no Python runs behind it:

  index.html      page.html with its ONNX backend (page.py), and a policy that loads nothing
                  from another origin
  model.onnx      the network, exported and checked in onnxruntime as `export --format onnx` does
  site.json       what the page shows of the model, predict.py's preparation constants, and
                  the graph's input and output names
  prepare.js      predict.py's image preparation in JavaScript
  ort.*, *.wasm   onnxruntime-web's WebAssembly build, ONNXRUNTIME_WEB from npm, verified
                  against the registry's sha512 and kept in ~/.cache/mnist_flax/npm; offline,
                  --onnxruntime-web gives the package's .tgz instead
"""

import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mnist_flax import checkpoint, cli, page, predict, runtime
from mnist_flax.atomic import atomic_write_bytes, staged_directory
from mnist_flax.errors import MnistFlaxError, UsageError, missing_path

ONNXRUNTIME_WEB = {
    "name": "onnxruntime-web", "version": "1.31.1", "license": "MIT",
    "integrity": "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw==",
    # The WebAssembly build: its script, the module it imports, and the module's binary.
    "files": ["ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"],
}
REGISTRY = "https://registry.npmjs.org"
REGISTRY_ENV = "MNIST_FLAX_NPM_REGISTRY"  # a mirror, as npm's own --registry
MAX_PACKAGE_BYTES = 128 * 2**20
DOWNLOAD_TIMEOUT_S = 60
MODEL_FILE, SITE_FILE, PREPARE_FILE, INDEX_FILE = "model.onnx", "site.json", "prepare.js", "index.html"


class SiteError(MnistFlaxError):
    """The site cannot be built: no onnxruntime-web package, or one that is not the pinned one."""


def package_file_name(package: dict = ONNXRUNTIME_WEB) -> str:
    return f"{package['name']}-{package['version']}.tgz"


def cache_dir() -> Path:
    return Path(runtime.default_compilation_cache_dir()).parent / "npm"


def verified(data: bytes, package: dict, source: str) -> bytes:
    """`data` if its sha512 is the registry's `integrity` for the pinned version, else SiteError."""
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != package["integrity"]:
        raise SiteError(f"{source} is not {package_file_name(package)} as npm publishes it (its sha512 differs); "
                        "remove it, or give the right one with --onnxruntime-web")
    return data


def fetch_package(package: dict = ONNXRUNTIME_WEB, given: Path | None = None) -> bytes:
    """The package's .tgz: `given`, else the cached copy, else downloaded from npm into the cache."""
    if given is not None:
        try:
            return verified(given.read_bytes(), package, str(given))
        except FileNotFoundError:
            raise UsageError(f"{missing_path(given)}: no such file (--onnxruntime-web takes the package's .tgz)") from None
    cached = cache_dir() / package_file_name(package)
    if cached.is_file():
        return verified(cached.read_bytes(), package, str(cached))
    registry = os.environ.get(REGISTRY_ENV, REGISTRY).rstrip("/")
    url = f"{registry}/{package['name']}/-/{package_file_name(package)}"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            data = resp.read(MAX_PACKAGE_BYTES + 1)
    except (urllib.error.URLError, OSError) as e:
        raise SiteError(f"could not download {url} ({getattr(e, 'reason', e)}); offline, download "
                        f"{package_file_name(package)} elsewhere and give it with --onnxruntime-web") from None
    if len(data) > MAX_PACKAGE_BYTES:
        raise SiteError(f"{url} is larger than {MAX_PACKAGE_BYTES / 2**20:g} MiB; refusing it")
    verified(data, package, url)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached, data)
    except OSError as e:  # a read-only cache costs a download next time, nothing more
        print(f"mnist_flax.site: could not keep {package_file_name(package)} in {cached.parent} ({e})", file=sys.stderr)
    return data


def package_files(tgz: bytes, package: dict = ONNXRUNTIME_WEB) -> dict[str, bytes]:
    """The files the page needs, read out of the package's dist/ (nothing else is unpacked)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            return {name: tar.extractfile(f"package/dist/{name}").read() for name in package["files"]}
    except (tarfile.TarError, KeyError, AttributeError) as e:
        raise SiteError(f"{package_file_name(package)} does not hold the files the page needs ({e})") from None


def prepare_constants() -> dict:
    """predict.py's constants, under the names prepare.js reads them by."""
    return {"side": predict.SIDE, "fit": predict.FIT, "invert_above": predict.INVERT_ABOVE,
            "ink_fraction": predict.INK_FRACTION, "min_contrast": predict.MIN_CONTRAST,
            "centre_decimals": predict.CENTRE_DECIMALS}


def site_description(path: Path, record: dict | None, variables: dict) -> dict:
    """site.json: what the page shows of the model, how it prepares images, and what it runs."""
    from mnist_flax.model import count_params
    from mnist_flax.onnx_graph import INPUT, OUTPUT
    record = record or {}
    return {
        "info": {"checkpoint": path.name, "test_accuracy": record.get("test_accuracy"),
                 "parameters": count_params(variables["params"]), "sha256": record.get("sha256")},
        "prepare": prepare_constants(),
        "model": {"file": MODEL_FILE, "input": INPUT, "output": OUTPUT},
        "onnxruntime": {"package": f"{ONNXRUNTIME_WEB['name']}@{ONNXRUNTIME_WEB['version']}",
                        "license": ONNXRUNTIME_WEB["license"], "script": ONNXRUNTIME_WEB["files"][0]},
    }


def site_files(path: Path, tgz: bytes) -> dict[str, bytes]:
    """Every file of the site, by name."""
    from mnist_flax import export
    variables, record = checkpoint.load_checkpoint(path)
    html, _ = page.page_html(page.ONNX)
    description = site_description(path, record, variables)
    return {INDEX_FILE: html.encode(), MODEL_FILE: export.onnx_bytes(variables, path, record),
            SITE_FILE: (json.dumps(description, indent=2) + "\n").encode(),
            PREPARE_FILE: page.source(PREPARE_FILE).encode(), **package_files(tgz),
            ".nojekyll": b""}  # GitHub Pages: serve the files as they are


def write_site(files: dict[str, bytes], out: Path) -> None:
    """Writes `files` into a new folder beside `out`, then puts it in `out`'s place (an earlier
    site there is replaced; any other folder is refused)."""
    if out.exists() and not (out / SITE_FILE).is_file():
        raise UsageError(f"{out} exists and is not a site this command built; choose another -o")
    built, previous = (out.with_name(f".{out.name}.{part}") for part in ("built", "previous"))
    for leftover in (built, previous):  # of a run that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    with staged_directory(built) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
    if out.exists():
        os.rename(out, previous)
    os.rename(built, out)
    shutil.rmtree(previous, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.site", description=__doc__.splitlines()[0])
    p.add_argument("path", metavar="CHECKPOINT_OR_DIR", help="a .msgpack, or a directory (its newest one is used)")
    p.add_argument("-o", "--output", type=Path, default=Path("site"), help="the folder to write (default %(default)s)")
    p.add_argument("--onnxruntime-web", type=Path, metavar="TGZ",
                   help=f"npm's {package_file_name()} (default: downloaded once from {REGISTRY})")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    path = checkpoint.find(args.path)
    checkpoint.load_checkpoint(path)  # a bad checkpoint fails before the package is fetched
    files = site_files(path, fetch_package(given=args.onnxruntime_web))
    write_site(files, args.output)
    print(f"site: {args.output} ({len(files)} files, {sum(map(len, files.values())) / 2**20:.1f} MiB); "
          f"try it with: python -m http.server -d {args.output}")
    return 0


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
