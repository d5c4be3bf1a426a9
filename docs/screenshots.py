"""The README's pictures of the page: `fmnist serve RUN` in a real browser (Debian's Chromium, Playwright).

    python docs/screenshots.py runs/default

Clicks the example photo of a sneaker, then Why?, then opens Explore at the
run's default neuron, at its last epoch; writes docs/serve_classify.png,
docs/serve_why.png and docs/serve_explore.png (1000x820); and docs/serve_phone.png: a pair of trousers
drawn on a 390x844 touch screen with 2 device pixels per CSS pixel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Predicates are functions: Playwright would poll a bare expression with eval, which the page's CSP forbids.
DONE = "() => document.querySelector('#result').dataset.state === 'done'"
TROUSERS = [(0.36, 0.1), (0.64, 0.1), (0.7, 0.9), (0.55, 0.9), (0.5, 0.35), (0.45, 0.9), (0.3, 0.9)]  # one stroke
NEURON_SHOWN = "() => document.querySelector('#neuron-canvas').dataset.neuron !== undefined"


def classify(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("button", name="example photo: sneaker").click()  # the page's own example photos
    page.wait_for_function(DONE)


def main() -> None:
    run = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", run, "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+/", proc.stdout.readline()).group(0)  # printed once the model answers
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                         args=FLAGS)
            page = browser.new_page(viewport={"width": 1000, "height": 820})
            classify(page, url)
            page.screenshot(path=str(HERE / "serve_classify.png"))
            page.click("#why")  # why it said Sneaker: the attribution over the input
            page.wait_for_function("() => !document.querySelector('#why-canvas').hidden")
            page.screenshot(path=str(HERE / "serve_why.png"))
            page.click("#why")
            page.click("#tab-explore")
            page.wait_for_function(NEURON_SHOWN)
            page.screenshot(path=str(HERE / "serve_explore.png"))
            phone = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True,
                                     device_scale_factor=2)
            phone.goto(url)
            phone.evaluate("scrollTo(0, document.querySelector('#draw').getBoundingClientRect().top - 60)")
            box = phone.locator("#draw").bounding_box()
            phone.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.9 * box["height"])
            phone.mouse.down()
            for x, y in TROUSERS:
                phone.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
            phone.mouse.up()
            phone.wait_for_function(DONE)
            phone.screenshot(path=str(HERE / "serve_phone.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
