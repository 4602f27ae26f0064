"""The static demo site: prepare.js equals predict.py, the folder it builds, and the page in a real browser.

prepare.js runs in Node against predict.prepare on drawings of every kind (sizes, inversion,
transparency, blank ones); the built folder is served by a real `python -m http.server`, and
headless Chromium draws test digits on it, as test_page.py does on the served page.
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import test_page
from conftest import REPO, require
from mnist_flax import checkpoint, predict, site, step
from mnist_flax.cli import run_main
from mnist_flax.errors import ImageError

browser = test_page.browser  # test_page's fixture (Chromium), found by pytest under this name

NODE_RUNNER = """
const {mnistPrepare} = require(process.argv[1]);
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
console.log(JSON.stringify(cases.map(({h, w, rgba, constants}) => {
  try {
    const gray = mnistPrepare.grayscale(Buffer.from(rgba, "base64"), h, w, constants);
    const {image, inverted} = mnistPrepare.toMnist(gray, h, w, constants);
    return {image: Array.from(image), inverted};
  } catch (e) { return {error: e.message}; }
})));
"""


def node() -> str:
    """Node.js, which runs prepare.js outside a browser; its absence fails the test under $CI."""
    path = shutil.which("node")
    if path is None:
        message = "node is not installed: install Node.js (Debian: apt install nodejs)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return path


def drawing(rng: np.random.Generator) -> Image.Image:
    """A random digit-like drawing: strokes of random width on a canvas of random size, light on
    dark or dark on light, opaque or on a transparent background; a few are blank."""
    h, w = (int(n) for n in rng.integers(29, 240, 2))
    dark_ink = rng.random() < 0.3
    transparent = rng.random() < 0.2
    ink, paper = ((20, 20, 20), (235, 235, 235)) if dark_ink else ((255, 255, 255), (0, 0, 0))
    im = Image.new("RGBA", (w, h), (*paper, 0 if transparent else 255))
    pen = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(0, 4)) if rng.random() < 0.1 else int(rng.integers(1, 5))):
        points = [tuple(float(v) for v in rng.uniform((0, 0), (w, h))) for _ in range(int(rng.integers(2, 6)))]
        pen.line(points, fill=(*ink, 255), width=int(rng.integers(1, max(2, min(h, w) // 6))), joint="curve")
    return im


def python_reads(im: Image.Image) -> dict:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    buf.seek(0)
    try:
        prepared = predict.prepare(buf, "drawing")
    except ImageError as e:
        return {"error": str(e)}
    return {"image": prepared.image.ravel().tolist(), "inverted": prepared.inverted}


def test_prepare_js_gives_predict_pys_28x28_within_one_grey_level():
    rng = np.random.default_rng(0)
    drawings = [drawing(rng) for _ in range(300)]
    drawings.append(Image.fromarray(np.full((40, 40), 200, np.uint8)).convert("RGBA"))  # blank: no digit
    constants = site.prepare_constants()
    cases = [{"h": im.height, "w": im.width, "constants": constants,
              "rgba": base64.b64encode(np.asarray(im).tobytes()).decode()} for im in drawings]
    result = subprocess.run([node(), "-e", NODE_RUNNER, str(REPO / "mnist_flax" / site.PREPARE_FILE)],
                            input=json.dumps(cases), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = 0
    for i, (js, im) in enumerate(zip(json.loads(result.stdout), drawings)):
        want = python_reads(im)
        if "error" in want:
            errors += 1
            assert js.get("error") and js["error"] in want["error"], (i, js, want)
            continue
        assert js.get("inverted") == want["inverted"], (i, js.get("error"))
        diff = np.abs(np.array(js["image"], int) - np.array(want["image"], int))
        assert diff.max() <= 1, (i, int(diff.max()), int((diff > 1).sum()))
    assert 0 < errors < len(drawings) // 4  # the blank ones, and only those


def test_round_half_even_is_pythons_round():
    script = (f"const {{mnistPrepare}} = require({json.dumps(str(REPO / 'mnist_flax' / site.PREPARE_FILE))});"
              "console.log(JSON.stringify([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, 2.5001, 7].map(mnistPrepare.roundHalfEven)))")
    result = subprocess.run([node(), "-e", script], capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout) == [round(v) for v in [0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, 2.5001, 7]]


# --------------------------------------------------------------------------- the folder


@pytest.fixture(scope="session")
def onnxruntime_web(tmp_path_factory) -> Path:
    """npm's onnxruntime-web package, as the site command gets it (its cache, else the registry)."""
    try:
        data = site.fetch_package()
    except site.SiteError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e}")
        pytest.skip(f"no onnxruntime-web package: {e}")
    path = tmp_path_factory.mktemp("npm") / site.package_file_name()
    path.write_bytes(data)
    return path


SITE_ENV, SITE_CHECKPOINT_ENV = "MNIST_FLAX_TEST_SITE", "MNIST_FLAX_TEST_SITE_CHECKPOINT"


@pytest.fixture(scope="session")
def built(request, tmp_path_factory) -> tuple[Path, Path]:
    """(the site's folder, the checkpoint it was built from): $MNIST_FLAX_TEST_SITE and
    $MNIST_FLAX_TEST_SITE_CHECKPOINT when set (the workflow tests the folder it publishes), else
    a site built here from the session's trained checkpoint."""
    if os.environ.get(SITE_ENV):
        return Path(os.environ[SITE_ENV]), checkpoint.find(os.environ[SITE_CHECKPOINT_ENV])
    require("onnxruntime", "pip install 'mnist-flax[onnx]'")
    trained, package = request.getfixturevalue("trained_checkpoint"), request.getfixturevalue("onnxruntime_web")
    out = tmp_path_factory.mktemp("site") / "site"
    assert run_main(site.main, [str(trained), "-o", str(out), "--onnxruntime-web", str(package)]) == 0
    return out, trained


@pytest.fixture(scope="session")
def built_site(built) -> Path:
    return built[0]


def test_the_folder_holds_the_page_the_model_and_the_runtime(built):
    built_site, source = built
    names = {p.name for p in built_site.iterdir()}
    assert names == {site.INDEX_FILE, site.MODEL_FILE, site.SITE_FILE, site.PREPARE_FILE, ".nojekyll",
                     *site.ONNXRUNTIME_WEB["files"]}
    described = json.loads((built_site / site.SITE_FILE).read_text())
    assert described["prepare"] == site.prepare_constants()
    record = checkpoint.load_checkpoint(source)[1]
    assert described["info"]["checkpoint"] == source.name
    assert described["info"]["test_accuracy"] == record["test_accuracy"]
    html = (built_site / site.INDEX_FILE).read_text()
    assert '<body data-backend="onnx">' in html and "http-equiv=\"Content-Security-Policy\"" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from another origin


def test_a_package_that_is_not_the_pinned_one_is_refused(tmp_path, trained_checkpoint, capsys):
    fake = tmp_path / "onnxruntime-web.tgz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("package/dist/ort.wasm.min.js"), io.BytesIO(b""))
    code = run_main(site.main, [str(trained_checkpoint), "-o", str(tmp_path / "s"), "--onnxruntime-web", str(fake)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "its sha512 differs" in err
    assert not (tmp_path / "s").exists()


def test_a_folder_that_is_not_a_site_is_never_replaced(tmp_path, trained_checkpoint, onnxruntime_web, capsys):
    require("onnxruntime", "pip install 'mnist-flax[onnx]'")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("mine")
    code = run_main(site.main, [str(trained_checkpoint), "-o", str(tmp_path / "docs"),
                                "--onnxruntime-web", str(onnxruntime_web)])
    assert code == 2 and "is not a site this command built" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["docs"] and (tmp_path / "docs" / "notes.md").read_text() == "mine"


def test_offline_without_a_package_says_how_to_give_one(tmp_path, trained_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached package
    monkeypatch.setenv(site.REGISTRY_ENV, "http://127.0.0.1:9")  # nothing listens there: offline
    code = run_main(site.main, [str(trained_checkpoint), "-o", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--onnxruntime-web" in err, err


# --------------------------------------------------------------------------- the page in a browser


@pytest.fixture(scope="module")
def site_url(built_site):
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "-d", str(built_site),
                             "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
    port = re.search(r"port (\d+)", line)
    assert port, line
    yield f"http://127.0.0.1:{port.group(1)}/"
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_drawn_test_digit_is_read_as_the_flax_model_reads_it(browser_page, site_url, built, test_set, tmp_path,
                                                               index):
    page, requested = browser_page(site_url)
    test_page.draw(page, test_set[0][index, :, :, 0])
    digit, probabilities = test_page.shown(page)
    seen = np.array(page.locator("body").get_attribute("data-seen").split(","), int).reshape(28, 28)
    drawn = base64.b64decode(page.eval_on_selector("#pad", "c => c.toDataURL('image/png')").split(",")[1])
    python = predict.prepare(io.BytesIO(drawn), "pad").image.astype(int)
    assert np.abs(seen - python).max() <= 1
    variables, record = checkpoint.load_checkpoint(built[1])
    flax = step.predict_probabilities(variables, python.astype(np.uint8)[None, :, :, None],
                                      model=checkpoint.network_for(record))[0]
    assert digit == str(int(flax.argmax())) == str(test_set[1][index])
    assert np.abs(np.array(probabilities) - flax).max() < 1e-3
    test_page.screenshot(page, tmp_path / f"static_{index}.png")
    assert [u for u in requested if not u.startswith(site_url)] == []  # nothing from elsewhere


@pytest.fixture
def browser_page(browser):
    """A function opening a URL in a new page, waiting for its model line; returns (page, requested URLs)."""
    contexts = []

    def open_page(url, ready="test accuracy"):
        context = browser.new_context(viewport={"width": 900, "height": 560})
        contexts.append(context)
        page = context.new_page()
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(url)
        page.locator("#model", has_text=ready).wait_for()
        return page, requested
    yield open_page
    for context in contexts:
        context.close()


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "could not be loaded (HTTP 404)"),
    (lambda p: p.write_bytes(b"not a model"), "is not a model onnxruntime can run"),
])
def test_a_missing_or_corrupt_model_file_says_so_on_the_page(browser_page, built_site, tmp_path, damage, message):
    broken = tmp_path / "site"
    shutil.copytree(built_site, broken)
    damage(broken / site.MODEL_FILE)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "-d", str(broken), "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = "http://127.0.0.1:%s/" % re.search(r"port (\d+)", proc.stdout.readline()).group(1)
        page, _ = browser_page(url, ready="could not be loaded")
        page.locator("body[data-state=error]").wait_for()
        assert message in page.inner_text("#status") and "python -m mnist_flax.site" in page.inner_text("#status")
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_new_build_replaces_the_site_before_it_whole(tmp_path):
    out = tmp_path / "site"
    site.write_site({site.SITE_FILE: b"{}", "old.txt": b"old"}, out)
    site.write_site({site.SITE_FILE: b"{}", "new.txt": b"new"}, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt", site.SITE_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no staging folder is left beside it
