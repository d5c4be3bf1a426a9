"""The page of `fmnist serve` in a real browser (Debian's Chromium driven by Playwright): keyboard only, on a
phone, behind a path prefix, with a slow, failing or stopped server; the example photos, and an image that does
not look like a product.

The app runs in this process under uvicorn (`create_app` on a port of its own), so that a test can hold or break
its model through `app.dependency_overrides`, and stop the server and start it again on the same port.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import synthetic
from PIL import Image

from fmnist import serve

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"viewport": {"width": 390, "height": 844}, "has_touch": True, "is_mobile": True, "device_scale_factor": 2}
DONE = "() => document.querySelector('#result').dataset.state === 'done'"
UNSURE = "Does not look like a Fashion-MNIST product"
EXAMPLES_SHOWN = ("() => [...document.querySelectorAll('#examples img')].length === 10 && "
                  "[...document.querySelectorAll('#examples img')].every((i) => i.complete && i.naturalWidth)")


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class Live:
    """`create_app(run_dir)` under uvicorn in a thread of this process, on one port across stops and starts;
    with `prefix`, mounted below that path as a reverse proxy would serve it."""

    def __init__(self, run_dir: Path, prefix: str = "", policy: serve.Policy | None = None):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Mount

        policy = policy or serve.Policy(rate_limit="100000/minute")  # every test's page loads come from one address
        self.uvicorn, self.app, self.port = uvicorn, serve.create_app(run_dir, max_body=2**20, policy=policy), 0
        self.asgi = self.app if not prefix else Starlette(
            routes=[Mount(prefix, app=self.app)], lifespan=lambda _: self.app.router.lifespan_context(self.app))
        self.prefix = prefix

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def start(self) -> Live:
        sock = serve.listen("127.0.0.1", self.port)
        self.port = sock.getsockname()[1]
        self.server = self.uvicorn.Server(self.uvicorn.Config(self.asgi, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        if os.environ.get("FMNIST_REQUIRE_BROWSER"):
            pytest.fail("FMNIST_REQUIRE_BROWSER is set but Chromium is not installed (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(trained_run):
    server = Live(trained_run).start()
    yield server
    server.stop()


# Predicates below are written as functions ("() => ..."): Playwright would poll a bare expression with eval,
# which the server's Content-Security-Policy forbids.
# Every Content-Security-Policy violation of the page, as the browser reports it to the page's own listeners.
CSP_WATCH = ("window.cspViolations = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));")


def _csp_violations(p, console: list[str]) -> list[str]:
    return [m for m in console if "Content Security Policy" in m] + (
        [] if p.is_closed() else p.evaluate("window.cspViolations || []"))


@pytest.fixture
def page(browser, live):
    """A desktop-sized page; fails the test on any script error (an uncaught promise rejection is one) and on any
    Content-Security-Policy violation (the server's policy allows only the page's own files)."""
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.add_init_script(CSP_WATCH)
    p = context.new_page()
    errors: list[str] = []
    console: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("console", lambda m: console.append(m.text))
    yield p
    violations = _csp_violations(p, console)
    context.close()
    live.app.dependency_overrides.clear()
    assert not errors, errors
    assert not violations, violations


@pytest.fixture(scope="module")
def shirt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "shirt.png"
    path.write_bytes(_png(synthetic(1, 27)[0][0]))
    return path


def _shown(rec: dict) -> str:
    """What the page says a record is: its class, or that the image does not look like a product."""
    return UNSURE if rec["unsure"] else rec["label"]


def _focused(page) -> str:
    return page.evaluate("document.activeElement.id")


def _tab_to(page, element_id: str, presses: int = 8) -> None:
    for _ in range(presses):
        page.keyboard.press("Tab")
        if _focused(page) == element_id:
            return
    raise AssertionError(f"Tab never reached #{element_id} (focus on #{_focused(page)})")


def _draw(page, canvas: str = "#draw") -> None:
    box = page.locator(canvas).bounding_box()
    page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.15 * box["height"])
    page.mouse.down()
    for i in range(20):
        page.mouse.move(box["x"] + (0.2 + 0.03 * i) * box["width"], box["y"] + (0.15 + 0.035 * i) * box["height"])
    page.mouse.up()


def test_a_keyboard_only_user_uploads_an_image_and_gets_its_class_behind_a_path_prefix(browser, trained_run,
                                                                                       shirt, tmp_path):
    server = Live(trained_run, prefix="/tools/fmnist").start()  # as behind a reverse proxy
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url))
    try:
        _keyboard_upload(page, server, shirt, tmp_path, asked)
    finally:
        context.close()
        server.stop()
    assert asked and all(url.startswith(server.url + "/") for url in asked), asked  # every URL was relative


def _keyboard_upload(page, server: Live, shirt: Path, tmp_path: Path, asked: list[str]) -> None:
    expected = httpx.post(server.url + "/predict", files={"file": ("s.png", shirt.read_bytes())}).json()["label"]
    page.on("filechooser", lambda chooser: None)  # file choosers are caught from now on, before any key is pressed
    page.goto(server.url + "/")
    page.wait_for_function("() => document.querySelector('#model-name').textContent !== ''")
    page.wait_for_function(EXAMPLES_SHOWN)
    broken = page.evaluate("[...document.images].filter((i) => !i.hidden && !(i.complete && i.naturalWidth))"
                           ".map((i) => i.id)")
    assert broken == []  # no broken-image icon on first view
    icon = page.evaluate("document.querySelector('link[rel=icon]').href")
    assert httpx.get(icon).headers["content-type"].startswith("image/svg")

    _tab_to(page, "drop")  # a real button: focusable, with a focus ring one can see
    ring = page.evaluate("getComputedStyle(document.activeElement)")
    assert ring["outlineStyle"] != "none" and float(ring["outlineWidth"].removesuffix("px")) >= 2
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(shirt))
    page.wait_for_function(DONE)
    assert page.text_content("#result-label") == expected
    assert page.get_attribute("#result", "aria-live") == "polite" and expected in page.text_content("#result")
    assert page.locator("#bars .barrow").count() == 5 and page.is_visible("#input-img")

    notes = tmp_path / "notes.png"
    notes.write_bytes(b"hello, I am text")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press(" ")  # Space works too
    chooser.value.set_files(str(notes))
    page.wait_for_function("() => document.querySelector('#result').dataset.state === 'failed'")
    assert page.get_attribute("#error", "role") == "alert" and page.is_visible("#error")
    assert "notes.png: not an image" in page.text_content("#error")
    assert page.locator("#bars .barrow").count() == 0 and not page.is_visible("#input-img")  # no stale answer

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (3 * 2**19))  # 1.5 MiB, over this server's 1 MiB
    posts = len([r for r in asked if "/predict" in r])
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(big))
    page.wait_for_function("() => document.querySelector('#result-prob').textContent === 'not sent'")
    assert "big.png is 1.5 MiB; this server takes files up to 1.0 MiB" in page.text_content("#error")
    assert len([r for r in asked if "/predict" in r]) == posts  # said at once, from GET limits, nothing sent

    _tab_to(page, "clear", presses=16)  # past the ten example photos
    page.keyboard.press("Enter")
    assert page.get_attribute("#result", "data-state") == "empty" and not page.is_visible("#error")


def test_tabs_neuron_field_and_slider_work_by_keyboard(page, live):
    page.goto(live.url + "/")
    _tab_to(page, "tab-classify")
    assert page.get_attribute("[role=tablist] >> nth=0", "role") == "tablist"
    page.keyboard.press("ArrowRight")
    assert _focused(page) == "tab-explore" and page.get_attribute("#tab-explore", "aria-selected") == "true"
    assert page.get_attribute("#tab-classify", "aria-selected") == "false"
    assert page.is_visible("#explore") and not page.is_visible("#classify")
    assert page.get_attribute("#tab-explore", "aria-controls") == "explore"
    assert page.get_attribute("#explore", "role") == "tabpanel"
    page.wait_for_function("() => document.querySelector('#epoch-label').textContent === 'epoch 3'")
    assert page.input_value("#neuron-input") == "5"  # the tracked neuron, from GET neurons
    assert "Loss by epoch, 1 to 3: training" in page.get_attribute("#loss-chart", "aria-label")
    assert "Neuron 5, epoch 3" in page.get_attribute("#neuron-canvas", "aria-label")

    _tab_to(page, "neuron-input")
    page.keyboard.press("Control+A")
    page.keyboard.type("6")
    page.wait_for_function("() => document.querySelector('#neuron-canvas').dataset.neuron === '6'")
    assert page.text_content("#epoch-label").startswith("final weights only")
    assert not page.is_visible("#epoch-slider")  # nothing to scrub through
    page.keyboard.press("Control+A")
    page.keyboard.type("5")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#epoch-label').textContent === 'epoch 3'")
    last = page.evaluate("document.querySelector('#neuron-canvas').toDataURL()")
    _tab_to(page, "epoch-slider")
    page.keyboard.press("Home")
    assert page.text_content("#epoch-label") == "epoch 0"
    assert page.get_attribute("#epoch-slider", "aria-valuetext") == "epoch 0"
    assert page.evaluate("document.querySelector('#neuron-canvas').toDataURL()") != last
    page.keyboard.press("ArrowRight")
    assert page.text_content("#epoch-label") == "epoch 1"
    page.keyboard.press("Shift+Tab")
    assert _focused(page) == "neuron-input"  # the order is the page's order
    page.keyboard.press("Shift+Tab")
    assert _focused(page) == "tab-explore"  # only the selected tab is in the Tab order; arrows move between tabs
    page.keyboard.press("ArrowLeft")
    assert page.is_visible("#classify") and not page.is_visible("#explore")


def test_the_neuron_field_says_what_is_wrong_and_never_shows_another_neurons_picture(page, live):
    page.goto(live.url + "/")
    page.click("#tab-explore")
    page.wait_for_function("() => document.querySelector('#neuron-canvas').dataset.neuron === '5'")
    for typed, words in [("999", "no neuron 999"), ("300", "no neuron 300"), ("0", "no neuron 0"),
                         ("-1", "no neuron -1"), ("abc", "“abc” is not a whole number"), ("", "Enter a neuron")]:
        page.fill("#neuron-input", typed)
        message = page.text_content("#neuron-message")
        assert words in message and "1 to 32" in message and page.is_visible("#neuron-message"), typed
        assert page.get_attribute("#neuron-input", "aria-invalid") == "true"
        assert not page.is_visible("#neuron-canvas"), typed  # no picture, so not neuron 5's under 999

    held = []  # the answer for neuron 6 waits until the test lets it go
    page.route("**/neurons/6", lambda route: held.append(route))
    page.fill("#neuron-input", "6")
    page.wait_for_function("() => document.querySelector('#epoch-label').textContent === 'loading neuron 6…'")
    assert not page.is_visible("#neuron-canvas") and not page.is_visible("#neuron-message")
    held[0].continue_()
    page.wait_for_function("() => document.querySelector('#neuron-canvas').dataset.neuron === '6'")
    assert page.is_visible("#neuron-canvas") and page.get_attribute("#neuron-input", "aria-invalid") == "false"
    assert page.text_content("#epoch-label").startswith("final weights only (best.pt, epoch")


def test_a_phone_390_wide_never_scrolls_sideways_and_draws_sharp_charts(browser, live):
    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.goto(live.url + "/")
    fits = "document.scrollingElement.scrollWidth <= innerWidth"
    assert page.evaluate(fits)
    _draw(page)
    page.wait_for_function(DONE)
    assert page.evaluate(fits)
    canvas, label = page.locator("#draw").bounding_box(), page.locator("#result-label").bounding_box()
    assert label["y"] + label["height"] <= 844 and label["y"] - (canvas["y"] + canvas["height"]) < 200  # in view
    page.evaluate("scrollTo(0, 0)")
    with page.expect_response(lambda r: "/predict?" in r.url) as answered:
        page.get_by_role("button", name="example photo: bag").tap()  # the photos sit above the pad, the answer below
    shown = _shown(answered.value.json())
    page.wait_for_function(f"() => document.querySelector('#result-label').textContent === {shown!r}")
    label = page.locator("#result-label").bounding_box()
    assert 0 <= label["y"] and label["y"] + label["height"] <= 844 and page.evaluate(fits)  # scrolled into view

    page.click("#tab-explore")
    page.wait_for_function("() => document.querySelector('#neuron-canvas').dataset.neuron === '5'")
    assert page.evaluate(fits)
    size = "(c => [c.clientWidth, c.width, c.getBoundingClientRect().right])(document.querySelector({!r}))"
    for chart in ("#loss-chart", "#acc-chart", "#neuron-canvas"):
        css_width, backing, right = page.evaluate(size.format(chart))
        assert 250 <= css_width and right <= 390 and backing == round(2 * css_width), chart  # 2 pixels per CSS px
    page.click("#tab-classify")
    css_width, backing, right = page.evaluate(size.format("#draw"))
    assert right <= 390 and backing == round(2 * css_width)
    context.close()


def test_the_neuron_viewer_shows_the_images_that_excite_the_neuron_most_on_a_phone(browser, live, trained_run):
    from fmnist import data

    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.goto(live.url + "/")
    page.click("#tab-explore")
    shown = ("() => [...document.querySelectorAll('#profile-top img')].length === 9 && "
             "[...document.querySelectorAll('#profile-top img')].every((i) => i.complete && i.naturalWidth === 28)")
    page.wait_for_function(shown)
    answer = httpx.get(live.url + "/neurons/5/profile").json()
    alts = page.eval_on_selector_all("#profile-top img", "(imgs) => imgs.map((i) => i.alt)")
    assert alts == [f"test image {t['index']}, a {data.CLASSES[t['label']]}, response {t['activation']:.2f}"
                    for t in answer["top"]]  # the server's nine, most first
    rows = page.eval_on_selector_all("#profile-classes li", "(li) => li.map((l) => l.textContent)")
    assert len(rows) == 10 and all(r.startswith(name) and "vote" in r for r, name in zip(rows, data.CLASSES))
    assert "neuron 5" in page.text_content("#profile-message")
    assert page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
    right = page.evaluate("Math.max(...[...document.querySelectorAll('#neuron-profile *')].map("
                          "(e) => e.getBoundingClientRect().right))")
    assert right <= 390
    page.fill("#neuron-input", "6")  # another neuron: its own images, none of 5's left behind meanwhile
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#profile-message').textContent.includes('neuron 6 most,')")
    six = httpx.get(live.url + "/neurons/6/profile").json()
    alts = page.eval_on_selector_all("#profile-top img", "(imgs) => imgs.map((i) => i.alt)")
    assert [a.split(",")[0] for a in alts] == [f"test image {t['index']}" for t in six["top"]]
    context.close()


class Held:
    """A batcher whose answers wait until the test lets them go."""

    def __init__(self, batcher: serve.Batcher):
        self.batcher, self.go = batcher, threading.Event()

    async def outputs(self, pixels: np.ndarray, photo: np.ndarray | None = None):
        await asyncio.to_thread(self.go.wait, 10)
        return await self.batcher.outputs(pixels, photo)


def test_the_page_says_classifying_and_never_shows_a_stale_answer(page, live, shirt):
    from fastapi import HTTPException

    page.goto(live.url + "/")
    page.set_input_files("#file-input", str(shirt))
    page.wait_for_function(DONE)
    answer = page.text_content("#result-label")

    held = Held(live.app.state.batcher)
    live.app.dependency_overrides[serve.get_batcher] = lambda: held
    _draw(page)
    page.wait_for_function("() => document.querySelector('#result').dataset.state === 'waiting'")
    assert page.text_content("#result-label") == "classifying…"  # not the previous answer
    assert "stale" in page.get_attribute("#bars", "class")  # which stays, greyed, until the new one comes
    held.go.set()
    page.wait_for_function(DONE)

    def broken():
        raise HTTPException(503, "the model is being replaced")

    live.app.dependency_overrides[serve.get_batcher] = broken
    page.set_input_files("#file-input", str(shirt))
    page.wait_for_function("() => document.querySelector('#result').dataset.state === 'failed'")
    assert "503" in page.text_content("#error") and "being replaced" in page.text_content("#error")
    assert answer not in page.text_content("#result") and page.locator("#bars .barrow").count() == 0
    assert not page.is_visible("#input-img")

    live.app.dependency_overrides.clear()
    page.set_input_files("#file-input", str(shirt))
    page.wait_for_function(DONE)
    assert page.text_content("#result-label") == answer and not page.is_visible("#error")
    page.click("#clear")
    assert page.get_attribute("#result", "data-state") == "empty" and page.locator("#bars .barrow").count() == 0


def test_a_stopped_server_is_said_plainly_and_explore_loads_once_it_is_back(browser, trained_run):
    server = Live(trained_run).start()
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server.url + "/")
        server.stop()
        page.click("#tab-explore")
        page.wait_for_function("() => document.querySelector('#explore-status').textContent.includes('not answering')")
        assert "stopped" in page.text_content("#explore-status") and page.is_visible("#explore-status")
        page.click("#tab-classify")
        _draw(page)
        page.wait_for_function("() => document.querySelector('#result').dataset.state === 'failed'")
        assert "not answering" in page.text_content("#error") and page.is_visible("#error")

        server.start()  # the same port: Explore asks again by itself
        page.click("#tab-explore")
        page.wait_for_function("() => document.querySelector('#neuron-canvas').dataset.neuron === '5'", timeout=10_000)
        assert page.locator("#facts dt").count() == 5 and not page.is_visible("#explore-status")
        assert not errors, errors  # no uncaught promise rejection on the way
    finally:
        context.close()
        server.stop()


def test_the_page_classifies_an_upload_and_a_drawing_and_shows_neurons(page, live, shirt, tmp_path):
    expected = httpx.post(live.url + "/predict", files={"file": ("shirt.png", shirt.read_bytes())}).json()["label"]
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(live.url + "/")
    with page.expect_response(lambda r: "/predict?" in r.url):
        page.set_input_files("#file-input", str(shirt))
    page.wait_for_function(DONE)
    assert page.text_content("#result-label") == expected
    assert page.get_attribute("#input-img", "src").startswith("data:image/png;base64,")
    assert page.locator("#bars .barrow").count() == 5

    with page.expect_response(lambda r: "/predict/pixels" in r.url) as drawn:
        _draw(page)
    rec = drawn.value.json()
    assert drawn.value.status == 200 and rec["preprocess"] == "dataset"
    page.wait_for_function(f"() => document.querySelector('#result-label').textContent === {_shown(rec)!r}")

    page.click("#tab-explore")
    page.wait_for_function("() => document.querySelector('#epoch-label').textContent === 'epoch 3'")
    assert page.input_value("#neuron-input") == "5"  # the tracked neuron, at its last epoch
    last = page.evaluate("document.querySelector('#neuron-canvas').toDataURL()")
    page.fill("#epoch-slider", "0")
    page.wait_for_function("() => document.querySelector('#epoch-label').textContent === 'epoch 0'")
    assert page.evaluate("document.querySelector('#neuron-canvas').toDataURL()") != last  # changed with the epoch
    page.fill("#neuron-input", "6")
    page.wait_for_function("() => document.querySelector('#epoch-label').textContent.startsWith('final weights only')")
    assert not page.is_visible("#epoch-slider")  # an untracked neuron: its final weights only
    assert page.locator("#facts dt").count() == 5
    assert not failed, failed


def _never_unsure(live: Live) -> None:
    """Serve the run as if it had no out-of-distribution threshold (the tiny run, trained on bars over noise,
    finds every real photo unlike its products): every answer is a class."""
    served = live.app.state.served
    predictor = copy.copy(served.predictor)
    predictor.threshold = None
    live.app.dependency_overrides[serve.get_served] = lambda: dataclasses.replace(served, predictor=predictor)


def test_an_example_photo_is_classified_as_an_upload_of_it_is_by_mouse_and_keyboard(page, live):
    _never_unsure(live)
    photos = {name: (serve.EXAMPLES / name).read_bytes() for name in ("sneaker.jpg", "bag.png")}
    expected = {name: httpx.post(live.url + "/predict", files={"file": (name, raw)}, params={"top_k": 5}).json()
                for name, raw in photos.items()}
    assert not any(rec["unsure"] for rec in expected.values())
    page.goto(live.url + "/")
    page.wait_for_function(EXAMPLES_SHOWN)  # ten thumbnails, every one loaded
    sneaker = page.get_by_role("button", name="example photo: sneaker")
    with page.expect_response(lambda r: "/predict?" in r.url) as answered:
        sneaker.click()
    rec = expected["sneaker.jpg"]
    got = answered.value.json()  # the photo itself, sent as an upload of it is: the same file, the same record
    assert got.pop("input").startswith("data:image/png;base64,") and got == rec
    page.wait_for_function(DONE)
    assert page.text_content("#result-label") == rec["label"]
    assert page.get_attribute("#result", "data-unsure") == "false"
    assert page.text_content("#result-prob") == f"{rec['probability'] * 100:.1f} % (calibrated)"
    assert [t["label"] for t in rec["top"]] == page.locator("#bars .barrow > span:first-child").all_text_contents()
    assert "(photo preprocessing)" in page.text_content("#input-note") and page.is_visible("#input-img")

    page.focus("#examples button >> nth=1")  # bag.png, second in the list
    assert page.get_attribute("#examples button >> nth=1", "title") == "bag"
    page.keyboard.press("Enter")
    bag = expected["bag.png"]["label"]
    page.wait_for_function(f"() => document.querySelector('#result-label').textContent === {bag!r}"
                           " && document.querySelector('#result').dataset.state === 'done'")
    assert _focused(page) == "" and page.evaluate("document.activeElement.title") == "bag"  # focus stays put


def test_an_image_unlike_any_product_is_said_plainly_with_the_guess_muted(page, live, shirt, tmp_path):
    noise = tmp_path / "noise.png"
    noise.write_bytes(_png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)))
    rec = httpx.post(live.url + "/predict", files={"file": ("noise.png", noise.read_bytes())}).json()
    assert rec["unsure"] is True  # the calibrated run says so, before the page is asked
    model = httpx.get(live.url + "/model").json()
    page.goto(live.url + "/")
    page.wait_for_function("() => !document.querySelector('#calibration-note').hidden")
    t = model["calibration"]["temperature"]
    temperature = f"{float(f'{t:.3g}'):g}"  # 3 significant digits, as the page writes it
    note = page.text_content("#calibration-note")
    assert f"calibrated (temperature {temperature})" in note and model["calibration"]["ood_method"] in note

    page.set_input_files("#file-input", str(noise))
    page.wait_for_function(DONE)
    assert page.text_content("#result-label") == UNSURE and page.get_attribute("#result", "data-unsure") == "true"
    said = page.text_content("#result")  # the live region: what a screen reader announces
    assert page.get_attribute("#result", "aria-live") == "polite" and UNSURE in said
    assert f"guess {rec['label']} ({rec['probability'] * 100:.1f} %)" in page.text_content("#result-note")
    assert rec["label"] not in page.text_content("#result-label")  # the class is not given as the answer
    assert "guess" in page.text_content("#bars-title") and "guess" in page.get_attribute("#bars", "class")
    unsure_look = page.evaluate("[getComputedStyle(document.querySelector('#result')).borderLeftWidth, "
                                "getComputedStyle(document.querySelector('#bars .fill')).backgroundColor]")

    page.set_input_files("#file-input", str(shirt))  # an image like the training products: a plain answer again
    page.wait_for_function("() => document.querySelector('#result').dataset.unsure === 'false' && "
                           "document.querySelector('#result').dataset.state === 'done'")
    assert page.text_content("#result-label") != UNSURE and not page.is_visible("#result-note")
    assert "guess" not in page.text_content("#bars-title") and "guess" not in page.get_attribute("#bars", "class")
    sure_look = page.evaluate("[getComputedStyle(document.querySelector('#result')).borderLeftWidth, "
                              "getComputedStyle(document.querySelector('#bars .fill')).backgroundColor]")
    assert unsure_look[0] != sure_look[0] and unsure_look[1] != sure_look[1]  # styled apart, bars muted


def test_a_server_with_a_key_is_asked_for_it_once_and_the_page_works(browser, trained_run):
    key = "page-key-0123456789"
    server = Live(trained_run, policy=serve.Policy(api_keys=(key,), rate_limit="100000/minute")).start()
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.add_init_script(CSP_WATCH)
    try:
        page, asked, console, sent = context.new_page(), [], [], []
        page.on("dialog", lambda d: (asked.append(d.message), d.accept(key)))
        page.on("console", lambda m: console.append(m.text))
        page.on("request", lambda r: sent.append((r.url, r.headers.get("x-api-key"))))
        page.goto(server.url + "/")
        page.wait_for_function("() => document.querySelector('#model-name').textContent !== ''")
        page.wait_for_function(EXAMPLES_SHOWN)
        with page.expect_response(lambda r: "/predict/pixels" in r.url) as drawn:
            _draw(page)
        assert drawn.value.status == 200
        page.wait_for_function(DONE)
        page.click("#tab-explore")
        page.wait_for_function("() => document.querySelector('#epoch-label').textContent === 'epoch 3'")
        assert len(asked) == 1 and "API key" in asked[0]  # once, however many calls were refused together
        assert page.evaluate("sessionStorage.getItem('fmnist-api-key')") == key
        api = [(u, k) for u, k in sent if not re.search(r"/static/|/$", u)]
        assert api and all(k == key for u, k in api[-6:]), api  # every call since sends it
        page.reload()  # the same session: not asked again
        page.wait_for_function("() => document.querySelector('#model-name').textContent !== ''")
        assert len(asked) == 1
        assert not _csp_violations(page, console)
    finally:
        context.close()
        server.stop()


def test_the_api_docs_render_from_local_files_within_the_policy(browser, live):
    context = browser.new_context()
    context.add_init_script(CSP_WATCH)
    try:
        page, console, elsewhere = context.new_page(), [], []
        page.on("console", lambda m: console.append(m.text))
        page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith(live.url) else None)
        page.goto(live.url + "/docs")
        # Swagger UI read openapi.json and drew a block per route (Swagger UI 4 could not read OpenAPI 3.1)
        page.wait_for_function("() => document.querySelectorAll('.opblock').length >= 9", timeout=15_000)
        paths = [t.replace("\u200b", "") for t in page.locator(".opblock-summary-path").all_inner_texts()]
        assert "/predict/pixels" in paths and "/health" in paths, paths
        assert not elsewhere, elsewhere
        assert not _csp_violations(page, console)
    finally:
        context.close()


def test_an_exported_model_says_in_explore_what_it_cannot_show_and_still_classifies(browser, trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "fmnist", "export", str(run)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    server = Live(run / "model.onnx").start()
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.add_init_script(CSP_WATCH)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server.url + "/")
        page.click("#tab-explore")
        page.wait_for_function("() => !document.querySelector('#neuron-message').hidden")
        assert "PyTorch" in page.text_content("#neuron-message")  # the neurons need the checkpoint
        assert not page.is_visible("#neuron-figure") and page.is_disabled("#neuron-input")
        assert "no training history" in page.text_content("#history-note") and page.is_visible("#history-note")
        assert not page.is_visible("#explore-status")  # loaded: nothing else to say
        page.click("#tab-classify")
        _draw(page)
        page.wait_for_function(DONE)
        assert not errors, errors
        assert not _csp_violations(page, []), "Content-Security-Policy"
    finally:
        context.close()
        server.stop()


def test_why_overlays_the_attribution_on_the_input_by_keyboard_on_a_phone(browser, live, shirt):
    context = browser.new_context(**PHONE)
    context.add_init_script(CSP_WATCH)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(live.url + "/")
    assert page.is_disabled("#why")  # nothing to explain yet
    with page.expect_response(lambda r: "/predict?" in r.url):
        page.set_input_files("#file-input", str(shirt))
    page.wait_for_function(DONE)
    plain = page.evaluate("document.querySelector('#input-img').src")
    page.focus("#why")
    with page.expect_response(lambda r: "/explain?" in r.url) as explained:
        page.keyboard.press("Enter")
    rec = explained.value.json()
    assert explained.value.status == 200 and np.shape(rec["attribution"]) == (28, 28)
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(plain.split(",")[1]))))
    assert (np.asarray(rec["input"]) == sent).all()  # it explains the very input the model classified
    page.wait_for_function("() => !document.querySelector('#why-canvas').hidden")
    assert page.get_attribute("#why", "aria-pressed") == "true" and not page.is_visible("#input-img")
    assert page.is_visible("#why-legend") and "against" in page.text_content("#why-legend")
    assert rec["target"] in page.get_attribute("#why-canvas", "aria-label")
    tinted = page.evaluate("(c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; "
                           "let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] !== d[i + 2]; return n; })"
                           "(document.querySelector('#why-canvas'))")
    assert tinted > 0  # coloured pixels over a grey input: the overlay was drawn
    box = page.locator("#why-canvas").bounding_box()
    assert box["x"] + box["width"] <= 390 and page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
    assert page.evaluate("document.querySelector('#why-canvas').width") == 2 * 168  # sharp at 2 pixels per CSS px
    page.keyboard.press(" ")  # Space toggles it off again
    assert page.get_attribute("#why", "aria-pressed") == "false" and page.is_visible("#input-img")
    assert not page.is_visible("#why-canvas") and not page.is_visible("#why-legend")
    violations = page.evaluate("window.cspViolations")
    context.close()
    assert not errors and not violations, (errors, violations)
