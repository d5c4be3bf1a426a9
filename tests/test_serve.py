"""fmnist serve: a real uvicorn server in a subprocess, every endpoint and every bad input over HTTP, and the page
in a real browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import re
import shutil
import socket
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

from fmnist import data, predict, serve

LIMIT_MB = 1  # the server's body limit in these tests


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(trained_run):
    """`fmnist serve RUN --port 0` in its own process; its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", str(trained_run), "--port", "0", "--quiet",
                             "--max-body-mb", str(LIMIT_MB)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    url = match.group(0)
    for _ in range(100):
        try:
            if httpx.get(url + "health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url.rstrip("/")
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def test_health_model_history_neurons_docs_and_page(client, trained_run):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == trained_run.name and h["backend"] == "pytorch"
    m = client.get("/model").json()
    assert m["model"] == "mlp" and m["config"]["hidden"] == [32] and m["classes"] == list(data.CLASSES)
    assert m["parameters"] == 784 * 32 + 32 + 2 * 32 + 32 * 10 + 10  # Linear, BatchNorm (weight, bias), Linear
    assert 0 < m["validation_accuracy"] <= 1 and 0 < m["test_accuracy"] <= 1
    history = client.get("/history").json()
    assert [r["epoch"] for r in history] == [1, 2, 3]
    n = client.get("/neurons").json()
    assert n == {"count": 32, "shape": [28, 28], "tracked": [5], "epochs": 3, "conv": False, "default": 5}
    five = client.get("/neurons/5").json()
    assert len(five["frames"]) == 4 and five["labels"][0] == "epoch 0"  # epoch 0 and after each epoch
    assert np.isclose(five["scale"], np.abs(five["frames"]).max())
    six = client.get("/neurons/6").json()
    assert len(six["frames"]) == 1 and "best.pt" in six["labels"][0]
    assert client.get("/neurons/33").status_code == 404 and client.get("/neurons/0").status_code == 422
    assert "/predict" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="draw"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in client.get("/static/app.js").text.replace("https://", "").split("fetch(")[0]  # no CDN


def test_predict_answers_what_the_cli_answers(client, trained_run, tmp_path):
    x, _ = synthetic(3, 21)
    path = tmp_path / "a.png"
    path.write_bytes(_png(x[0]))
    rec = client.post("/predict", files={"file": ("a.png", path.read_bytes(), "image/png")},
                      params={"top_k": 4, "input": "true"}).json()
    cli = predict.Predictor(trained_run).predict([path], top_k=4)[0]
    assert {k: v for k, v in rec.items() if k not in ("file", "input")} == {k: v for k, v in cli.items()
                                                                             if k != "file"}
    assert rec["file"] == "a.png"
    seen = Image.open(io.BytesIO(base64.b64decode(rec["input"].split(",", 1)[1])))
    np.testing.assert_array_equal(np.asarray(seen), x[0])
    several = client.post("/predict", files=[("file", (f"{i}.png", _png(img), "image/png")) for i, img in
                                             enumerate(x)]).json()
    assert isinstance(several, list) and [r["file"] for r in several] == ["0.png", "1.png", "2.png"]
    alone = client.post("/predict", files={"file": ("0.png", _png(x[0]))}).json()["top"]
    assert [t["label"] for t in several[0]["top"]] == [t["label"] for t in alone]  # in a batch of 3, or alone
    assert np.allclose([t["probability"] for t in several[0]["top"]], [t["probability"] for t in alone], atol=1e-5)


def test_pixels_are_classified_as_the_dataset_is(client, trained_run):
    x, _ = synthetic(1, 22)
    rec = client.post("/predict/pixels", json={"pixels": x[0].tolist()}, params={"top_k": 10}).json()
    probs = predict.Predictor(trained_run).probabilities(x)[0]
    assert rec["preprocess"] == "dataset" and rec["index"] == int(probs.argmax())
    assert np.allclose([t["probability"] for t in rec["top"]], np.sort(probs)[::-1], atol=1e-5)
    for body in ({"pixels": [[0] * 28] * 27}, {"pixels": [[300] * 28] * 28}, {"pixels": [[0] * 5] * 28},
                 {"pixel": x[0].tolist()}, {"pixels": "abc"}):
        r = client.post("/predict/pixels", json=body)
        assert r.status_code == 422 and r.json()["detail"], body


BAD_FILES = {
    "not an image": (b"hello, I am text", "not an image"),
    "empty": (b"", "not an image"),
    "truncated": (_png(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8))[:400],
                  "damaged or truncated"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_get_a_4xx_with_a_detail(client, case):
    raw, words = BAD_FILES[case]
    r = client.post("/predict", files={"file": ("upload.png", raw, "image/png")})
    assert r.status_code == 400 and words in r.json()["detail"] and "upload.png" in r.json()["detail"]


def test_a_decompression_bomb_is_refused(client):
    from test_predict import _raw_png

    r = client.post("/predict", files={"file": ("bomb.png", _raw_png(30_000, 30_000))})
    assert r.status_code == 400 and "decompression bomb" in r.json()["detail"]


def test_wrong_fields_and_queries_are_422(client):
    x, _ = synthetic(1, 23)
    assert client.post("/predict", files={"image": ("a.png", _png(x[0]))}).status_code == 422
    assert client.post("/predict", files={"file": ("a.png", _png(x[0]))}, params={"top_k": 11}).status_code == 422
    assert client.post("/predict", files={"file": ("a.png", _png(x[0]))}, params={"top_k": 0}).status_code == 422
    assert client.post("/predict").status_code == 422


def _raw_request(server: str, head: str, body_parts=(), pause: float = 0.0) -> tuple[bytes, float]:
    """Send a request by hand (headers, then the body in parts); the answer, and how soon it began."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        start = time.perf_counter()
        s.sendall(head.encode())
        try:
            for part in body_parts:
                s.sendall(part)
                time.sleep(pause)
        except OSError:
            pass  # the server answered and closed: what we want to see
        answer, first = b"", None
        with contextlib.suppress(OSError):  # a timeout, or the server closing: the answer is complete
            s.settimeout(2)
            while chunk := s.recv(4096):
                first = first or time.perf_counter() - start  # when the answer began
                answer += chunk
                if b"\r\n\r\n" in answer and len(answer.split(b"\r\n\r\n", 1)[1]) >= _length(answer):
                    break
        return answer, first if first is not None else float("inf")


def _length(answer: bytes) -> int:
    match = re.search(rb"content-length: (\d+)", answer.split(b"\r\n\r\n", 1)[0], re.IGNORECASE)
    return int(match.group(1)) if match else 1 << 30


def test_a_large_body_is_refused_before_it_is_read(server):
    # A declared length over the limit: 413 at once, with none of the body sent.
    head = ("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {50 * 2**20}\r\n\r\n")
    answer, seconds = _raw_request(server, head)
    assert answer.startswith(b"HTTP/1.1 413") and answer.endswith(b"Content Too Large") and seconds < 5
    # No declared length (chunked): refused once the bytes received pass the limit, not at the end.
    opening = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    chunk = b"\0" * 65536
    parts = [b"%x\r\n" % len(c) + c + b"\r\n" for c in [opening] + [chunk] * (LIMIT_MB * 16 + 400)]  # +25 MiB
    head = ("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    answer, _ = _raw_request(server, head, parts)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


def test_health_answers_while_an_upload_crawls_and_under_load(server, client, trained_run):
    x, _ = synthetic(32, 24)
    head = ("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Content-Length: 900000\r\n\r\n")
    slow = threading.Thread(target=_raw_request, args=(server, head, [b"\0" * 1000] * 30, 0.1))
    slow.start()  # 3 s to send 30 kB of a body it promised to be 900 kB
    time.sleep(0.3)
    t = time.perf_counter()
    assert client.get("/health").status_code == 200 and time.perf_counter() - t < 1.0

    async def many():
        async with httpx.AsyncClient(base_url=server, timeout=30) as c:
            return await asyncio.gather(*[c.post("/predict", files={"file": (f"{i}.png", _png(img))})
                                          for i, img in enumerate(x)], c.get("/health"))

    before = client.get("/health").json()
    *answers, health = asyncio.run(many())
    after = client.get("/health").json()
    slow.join()
    assert health.status_code == 200
    want = predict.Predictor(trained_run).probabilities(x).argmax(1)
    assert [a.json()["index"] for a in answers] == want.tolist()
    assert after["images"] - before["images"] == 32
    assert after["model_calls"] - before["model_calls"] <= 32


def test_requests_waiting_together_share_one_model_call(trained_run):
    p = predict.Predictor(trained_run)
    batcher = serve.Batcher(p)
    x, _ = synthetic(10, 25)

    async def go():
        task = asyncio.create_task(batcher.run())
        await asyncio.sleep(0)  # the batcher starts and waits for work
        results = await asyncio.gather(*[batcher.probabilities(x[i:i + 1]) for i in range(10)])
        task.cancel()
        return results

    results = asyncio.run(go())
    np.testing.assert_allclose(np.concatenate(results), p.probabilities(x), atol=1e-6)
    assert batcher.calls == 1 and batcher.images == 10  # all ten were waiting when the batcher woke: one call


def test_paths_from_clients_name_nothing_on_the_server(client):
    x, _ = synthetic(1, 26)
    r = client.post("/predict", files={"file": ("../../etc/passwd", _png(x[0]))})
    assert r.status_code == 200 and r.json()["file"] == "../../etc/passwd"  # echoed, never opened
    for path in ("/static/../serve.py", "/static/%2e%2e/serve.py", "/static/..%2fserve.py", "/neurons/..%2f1"):
        assert client.get(path).status_code in (404, 422), path


def test_serve_errors_are_one_sentence(trained_run, tmp_path, capsys):
    from fmnist import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [([str(tmp_path / "nothing")], "does not exist"), ([str(trained_run), "--port", str(port)],
                                                                    f"port {port}"),
                 ([str(trained_run), "--port", "70000"], "--port 70000"),
                 ([str(trained_run), "--max-body-mb", "0"], "--max-body-mb")]
        for argv, words in cases:
            assert cli.main(["serve", *argv]) == 2  # before any server starts
            err = capsys.readouterr().err
            assert err.startswith("fmnist: error: ") and words in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------- the page, in a real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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


@pytest.mark.slow
def test_the_page_classifies_an_upload_and_a_drawing_and_shows_neurons(browser, server, client, tmp_path):
    x, _ = synthetic(1, 27)
    upload = tmp_path / "shirt.png"
    upload.write_bytes(_png(x[0]))
    expected = client.post("/predict", files={"file": ("shirt.png", upload.read_bytes())}).json()["label"]
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(r.url))
    page.goto(server + "/")

    with page.expect_response(lambda r: "/predict?" in r.url):
        page.set_input_files("#file-input", str(upload))
    page.wait_for_function("document.querySelector('#result-label').textContent !== '–'")
    assert page.text_content("#result-label") == expected
    assert page.get_attribute("#input-img", "src").startswith("data:image/png;base64,")
    assert page.locator("#bars .barrow").count() == 5

    box = page.locator("#draw").bounding_box()
    with page.expect_response(lambda r: "/predict/pixels" in r.url) as drawn:
        page.mouse.move(box["x"] + 60, box["y"] + 40)
        page.mouse.down()
        for i in range(20):
            page.mouse.move(box["x"] + 60 + 8 * i, box["y"] + 40 + 10 * i)
        page.mouse.up()
    rec = drawn.value.json()
    assert drawn.value.status == 200 and rec["preprocess"] == "dataset"
    page.wait_for_function(f"document.querySelector('#result-label').textContent === {rec['label']!r}")
    page.screenshot(path=str(tmp_path / "classify.png"))

    page.click("#tab-explore")
    page.wait_for_function("document.querySelector('#epoch-label').textContent === 'epoch 3'")
    assert page.input_value("#neuron-input") == "5"  # the tracked neuron, at its last epoch
    last = page.evaluate("document.querySelector('#neuron-canvas').toDataURL()")
    page.fill("#epoch-slider", "0")
    page.wait_for_function("document.querySelector('#epoch-label').textContent === 'epoch 0'")
    first = page.evaluate("document.querySelector('#neuron-canvas').toDataURL()")
    assert first != last  # the picture changed with the epoch
    page.fill("#neuron-input", "6")
    page.dispatch_event("#neuron-input", "change")
    page.wait_for_function("document.querySelector('#epoch-label').textContent.startsWith('best.pt')")
    assert page.is_disabled("#epoch-slider")  # an untracked neuron: its final weights only
    assert page.locator("#facts dt").count() == 5
    page.screenshot(path=str(tmp_path / "explore.png"))
    assert not errors, errors
    page.close()
