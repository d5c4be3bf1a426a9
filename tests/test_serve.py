"""fmnist serve: a real uvicorn server in a subprocess, every endpoint and every bad input over HTTP; the app's
dependencies replaced in-process. The page in a real browser is tested in test_page.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import synthetic
from PIL import Image

from fmnist import calibrate, data, predict, serve

LIMIT_MB = 1  # the server's body limit in these tests


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(trained_run):
    """`fmnist serve RUN --port 0` in its own process; its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", str(trained_run), "--port", "0", "--quiet",
                             "--max-body-mb", str(LIMIT_MB), "--rate-limit", "100000/minute"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    assert client.get("/health").json() == {"status": "ok"}  # nothing a stranger should know
    m = client.get("/model").json()
    assert m["name"] == trained_run.name and m["backend"] == "pytorch"
    assert m["model"] == "mlp" and m["config"]["hidden"] == [32] and m["classes"] == list(data.CLASSES)
    assert m["parameters"] == 784 * 32 + 32 + 2 * 32 + 32 * 10 + 10  # Linear, BatchNorm (weight, bias), Linear
    assert 0 < m["validation_accuracy"] <= 1 and 0 < m["test_accuracy"] <= 1
    cal = m["calibration"]  # what the page's line on calibrated probabilities reads
    assert cal == predict.Predictor(trained_run).info["calibration"] and cal["temperature"] > 0
    assert cal["ood_method"] in calibrate.METHODS and np.isfinite(cal["ood_threshold"])
    history = client.get("/history").json()
    assert [r["epoch"] for r in history] == [1, 2, 3]
    n = client.get("/neurons").json()
    assert n == {"count": 32, "shape": [28, 28], "tracked": [5], "epochs": 3, "conv": False, "default": 5,
                 "note": None}
    five = client.get("/neurons/5").json()
    assert len(five["frames"]) == 4 and five["labels"][0] == "epoch 0"  # epoch 0 and after each epoch
    assert np.isclose(five["scale"], np.abs(five["frames"]).max())
    six = client.get("/neurons/6").json()
    assert len(six["frames"]) == 1 and six["labels"][0].startswith("final weights only (best.pt, epoch")
    assert client.get("/neurons/33").json()["detail"] == "the first layer has neurons 1 to 32"
    assert client.get("/neurons/0").status_code == 422
    profile = client.get("/neurons/5/profile").json()  # what neuron 5 responds to on the 200 test images
    x, y = data.load_split(trained_run.parent.parent / "tiny", "test")
    acts = [p["activation"] for p in profile["top"]]
    assert len(profile["top"]) == 9 and acts == sorted(acts, reverse=True)
    assert all(np.array_equal(p["pixels"], x[p["index"]]) and p["label"] == y[p["index"]] for p in profile["top"])
    assert len(profile["per_class"]) == len(profile["votes"]) == 10 and profile["kind"] == "neuron"
    assert client.get("/neurons/33/profile").status_code == 404
    assert "/predict" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="draw"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in client.get("/static/app.js").text.replace("https://", "").split("fetch(")[0]  # no CDN


EXAMPLES = ["ankle-boot.png", "bag.png", "coat.png", "dress.png", "pullover.png", "sandal.png", "shirt.png",
            "sneaker.jpg", "trouser.png", "tshirt.png"]  # one product photo per class, shipped in the package


def test_the_example_photos_are_listed_and_each_is_served(client):
    examples = client.get("/examples").json()
    assert [e["file"] for e in examples] == EXAMPLES
    assert examples[0]["name"] == "ankle boot" and examples[0]["url"] == "static/examples/ankle-boot.png"
    for e in examples:
        r = client.get("/" + e["url"])  # relative to the service's root, as the page asks for it
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/"), e
        assert r.content == (serve.EXAMPLES / e["file"]).read_bytes()
        assert Image.open(io.BytesIO(r.content)).size[0] > 28  # a photo, not a 28x28 input
        assert client.post("/predict", files={"file": (e["file"], r.content)}).status_code == 200


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
    assert r.status_code == 413 and "more than this service's 16 megapixels" in r.json()["detail"]


def test_wrong_fields_and_queries_are_422(client):
    x, _ = synthetic(1, 23)
    assert client.post("/predict", files={"image": ("a.png", _png(x[0]))}).status_code == 422
    assert client.post("/predict", files={"file": ("a.png", _png(x[0]))}, params={"top_k": 11}).status_code == 422
    assert client.post("/predict", files={"file": ("a.png", _png(x[0]))}, params={"top_k": 0}).status_code == 422
    assert client.post("/predict").status_code == 422


def test_limits_are_what_the_api_enforces(client):
    """The page reads its limits from GET /limits: they must be the ones the API holds to."""
    x, _ = synthetic(1, 28)
    limits = client.get("/limits").json()
    assert limits["max_body_bytes"] == LIMIT_MB * 2**20
    top = limits["top_k"]
    for k, status in ((top["min"] - 1, 422), (top["min"], 200), (top["max"], 200), (top["max"] + 1, 422)):
        r = client.post("/predict", files={"file": ("a.png", _png(x[0]))}, params={"top_k": k})
        assert r.status_code == status, k
    assert len(client.post("/predict", files={"file": ("a.png", _png(x[0]))}).json()["top"]) == top["default"]
    big = b"\0" * (limits["max_body_bytes"] + 1)
    assert client.post("/predict", files={"file": ("big.png", big)}).status_code == 413


def test_routes_take_what_the_dependencies_give_them(trained_run):
    """The run the lifespan loaded reaches the routes through a dependency, so a test can serve another one:
    here the same run as if it had tracked no neuron."""
    app = serve.create_app(trained_run)

    async def go():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:  # the run loads here, once
            served = app.state.served
            before = (await c.get("/neurons")).json()
            app.dependency_overrides[serve.get_served] = lambda: dataclasses.replace(served, tracked={})
            after, five = (await c.get("/neurons")).json(), (await c.get("/neurons/5")).json()
            app.dependency_overrides.clear()
            return served, before, after, five, (await c.get("/neurons/5")).json()

    served, before, after, five, tracked_five = asyncio.run(go())
    assert before["tracked"] == [5] and before["default"] == 5
    assert after["tracked"] == [] and after["epochs"] == 0 and after["default"] == 1  # 32 neurons: no 50 to open at
    assert not five["tracked"] and five["labels"][0].startswith("final weights only")
    np.testing.assert_allclose(five["frames"], served.pictures[4:5], atol=1e-6)  # best.pt's weights
    assert tracked_five["tracked"] and len(tracked_five["frames"]) == 4


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
    head = ("POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {50 * 2**20}\r\n\r\n")
    answer, seconds = _raw_request(server, head)
    assert answer.startswith(b"HTTP/1.1 413") and answer.endswith(b"Content Too Large") and seconds < 5
    # No declared length (chunked): refused once the bytes received pass the limit, not at the end.
    opening = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    chunk = b"\0" * 65536
    parts = [b"%x\r\n" % len(c) + c + b"\r\n" for c in [opening] + [chunk] * (LIMIT_MB * 16 + 400)]  # +25 MiB
    head = ("POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    answer, _ = _raw_request(server, head, parts)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


def test_health_answers_while_an_upload_crawls_and_under_load(server, client, trained_run):
    x, _ = synthetic(32, 24)
    head = ("POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
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

    before = client.get("/model").json()
    *answers, health = asyncio.run(many())
    after = client.get("/model").json()
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
        results = await asyncio.gather(*[batcher.outputs(x[i:i + 1]) for i in range(10)])
        task.cancel()
        return results

    results = asyncio.run(go())
    probs, scores = p.outputs(x)
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), probs, atol=1e-6)
    # each its own score (another image's differs by tenths; a score near 0 may differ by float rounding)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), scores, rtol=1e-5, atol=1e-5)
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


def test_a_neuron_profile_without_the_test_images_says_so(trained_run, monkeypatch):
    from fmnist.errors import DataError

    def nowhere(*a, **kw):
        raise DataError("no Fashion-MNIST files in /somewhere/private")

    monkeypatch.setattr(data, "locate", nowhere)
    app = serve.create_app(trained_run)

    async def go():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            return await c.get("/neurons/5/profile"), await c.get("/neurons/5")

    r, pictures = asyncio.run(go())
    assert r.status_code == 404 and r.json()["detail"].startswith("the test images are not on the server")
    assert "/somewhere" not in r.text  # the server's paths are not for clients
    assert pictures.status_code == 200  # its pictures still are
