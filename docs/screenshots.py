"""The README's pictures of the page: `fmnist serve RUN` in a real browser (Debian's Chromium, Playwright).

    python docs/screenshots.py runs/default

Classifies docs/examples/sneaker.jpg and a drawn stroke, then opens Explore at
the tracked neuron's last epoch; writes docs/serve_classify.png and docs/serve_explore.png.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    run = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", run, "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+/", proc.stdout.readline()).group(0)
        while httpx.get(url + "health").status_code != 200:
            time.sleep(0.1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1000, "height": 820})
            page.goto(url)
            with page.expect_response(lambda r: "/predict?" in r.url):
                page.set_input_files("#file-input", str(HERE / "examples" / "sneaker.jpg"))
            page.wait_for_function("document.querySelector('#result-label').textContent !== '–'")
            page.screenshot(path=str(HERE / "serve_classify.png"))
            page.click("#tab-explore")
            page.wait_for_function("document.querySelector('#epoch-label').textContent.startsWith('epoch')")
            time.sleep(0.3)
            page.screenshot(path=str(HERE / "serve_explore.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
