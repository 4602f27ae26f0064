"""The drawing page in a real browser: a real MNIST digit drawn with the mouse, read by the model.

Headless Chromium, driven by Playwright, opens the page of a real `mnist_flax.serve` process
(conftest's `served_url`), draws test digits onto the canvas as mouse strokes (and once as
touches), row by row along their ink, and checks what the page shows. The browser is $MNIST_FLAX_CHROMIUM, else
`chromium` on the PATH (Debian's package), else Playwright's own (`playwright install chromium`).
Screenshots go to the test's folder, and to $MNIST_FLAX_SCREENSHOT when it is set (that is how
docs/serve_page.png is made).
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import require

pytestmark = pytest.mark.slow  # a real browser on a real server process

playwright = require("playwright.sync_api", "pip install playwright (the test extra)")

# The flags that make Chromium quiet and self-contained in a container, offline.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SCALE = 10  # canvas pixels per MNIST pixel: the 280x280 pad over a 28x28 digit
INK = 128  # MNIST pixels at least this bright are drawn over
DRAWN = [0, 1, 2]  # test-set indices: a 7, a 2 and a 1


def chromium_path() -> str | None:
    return os.environ.get("MNIST_FLAX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        except playwright.Error as e:
            if os.environ.get("CI"):
                pytest.fail(f"no Chromium to run the page test with ({e.message.splitlines()[0]}); "
                            "install Debian's chromium, or run `playwright install chromium`")
            pytest.skip(f"no Chromium: {e.message.splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser, served_url):
    context = browser.new_context(viewport={"width": 900, "height": 560})
    page = context.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(served_url)
    # Waits use selectors: the page's Content-Security-Policy forbids the eval that wait_for_function needs.
    page.locator("#model", has_text="test accuracy").wait_for()
    yield page
    context.close()
    outside = [u for u in requested if not u.startswith(served_url) and not u.startswith(("data:", "blob:"))]
    assert outside == [], "the page fetched something from elsewhere"


def draw(page, image: np.ndarray) -> None:
    """Mouse strokes along each row's runs of ink, in canvas coordinates."""
    box = page.locator("#pad").bounding_box()
    for y, row in enumerate(image >= INK):
        xs = np.flatnonzero(row)
        for run in np.split(xs, np.flatnonzero(np.diff(xs) > 1) + 1) if len(xs) else []:
            cy = box["y"] + (y + 0.5) * SCALE
            page.mouse.move(box["x"] + (run[0] + 0.5) * SCALE, cy)
            page.mouse.down()
            page.mouse.move(box["x"] + (run[-1] + 0.5) * SCALE, cy, steps=max(2, len(run)))
            page.mouse.up()


def shown(page) -> tuple[str, list[float]]:
    page.locator("body[data-state=ready]").wait_for()
    assert page.inner_text("#digit") != "?", page.inner_text("#status")
    probabilities = page.eval_on_selector_all(".row", "rows => rows.map(r => Number(r.dataset.probability))")
    return page.inner_text("#digit"), probabilities


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path))
    if os.environ.get("MNIST_FLAX_SCREENSHOT"):
        shutil.copyfile(path, os.environ["MNIST_FLAX_SCREENSHOT"])


@pytest.mark.parametrize("index", DRAWN)
def test_a_digit_drawn_with_the_mouse_is_read_right(page, test_set, tmp_path, index):
    images, labels = test_set
    draw(page, images[index, :, :, 0])
    digit, probabilities = shown(page)
    assert digit == str(labels[index])
    assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-5
    best = page.locator(".row.best")
    assert best.get_attribute("data-digit") == digit
    assert page.eval_on_selector("#seen", "img => [img.naturalWidth, img.naturalHeight]") == [28, 28]
    screenshot(page, tmp_path / f"drawn_{index}.png")
    # Clear empties the pad and the answer.
    page.click("#clear")
    assert page.inner_text("#digit") == "?"
    assert page.eval_on_selector("#pad", "c => c.getContext('2d').getImageData(0, 0, 280, 280).data.some("
                                          "(v, i) => i % 4 !== 3 && v !== 0)") is False


def test_a_digit_drawn_by_touch_is_read_right(browser, served_url, test_set):
    """The same strokes as touches (Chromium's own touch events, through the DevTools protocol)."""
    images, labels = test_set
    context = browser.new_context(viewport={"width": 900, "height": 560}, has_touch=True)
    page = context.new_page()
    page.goto(served_url)
    page.locator("#model", has_text="test accuracy").wait_for()
    box = page.locator("#pad").bounding_box()
    touch = context.new_cdp_session(page)
    index = DRAWN[1]
    for y, row in enumerate(images[index, :, :, 0] >= INK):
        xs = np.flatnonzero(row)
        for run in np.split(xs, np.flatnonzero(np.diff(xs) > 1) + 1) if len(xs) else []:
            cy = box["y"] + (y + 0.5) * SCALE
            path = np.linspace(box["x"] + (run[0] + 0.5) * SCALE, box["x"] + (run[-1] + 0.5) * SCALE, len(run) + 1)
            for kind, x in [("touchStart", path[0]), *[("touchMove", x) for x in path[1:]]]:
                touch.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": cy}]})
            touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    digit, probabilities = shown(page)
    assert digit == str(labels[index]) and abs(sum(probabilities) - 1) < 1e-5
    context.close()


def test_an_uploaded_photo_of_dark_ink_is_inverted_and_read(page, test_set, tmp_path):
    images, labels = test_set
    path = tmp_path / "paper.png"
    Image.fromarray(255 - images[DRAWN[0], :, :, 0]).resize((120, 120)).save(path)
    page.set_input_files("#upload", str(path))
    digit, probabilities = shown(page)
    assert digit == str(labels[DRAWN[0]]) and abs(sum(probabilities) - 1) < 1e-5
    assert "inverted" in page.inner_text("#status")


def test_a_file_that_is_no_image_shows_the_apis_message(page):
    page.set_input_files("#upload", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
    page.locator("#status", has_text="not a readable PNG or JPEG").wait_for()
    assert page.inner_text("#digit") == "?"
