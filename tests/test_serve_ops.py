"""fmnist serve run by an operator: /metrics in Prometheus' text format, JSON access logs, /ready, several worker
processes, a graceful stop on SIGTERM, and an exported ONNX model served without torch."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fmnist import predict, serve

KEY = "operator-key-123"


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


# Python with torch made impossible to import, then fmnist's command line: what a deployment without torch runs
NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("no torch in this deployment", name=name)
sys.meta_path.insert(0, NoTorch())
import fmnist
sys.argv = ["fmnist"] + sys.argv[1:]
sys.exit(fmnist.main())
"""


def start(*argv: str, python: tuple[str, ...] = ("-m", "fmnist")) -> tuple[subprocess.Popen, str]:
    """`fmnist serve ARGV --port 0` in its own process; (the process, its base URL once it answers /ready)."""
    proc = subprocess.Popen([sys.executable, *python, "serve", *argv, "--port", "0",
                             "--rate-limit", "100000/minute"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    url = match.group(0)
    for _ in range(300):
        try:
            if httpx.get(url + "/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("the server never became ready")
    return proc, url


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_was_sent_and_the_json_log_holds_no_image(trained_run):
    proc, url = start(str(trained_run), "--log-format", "json", "--quiet")
    uploads = [_png(i) for i in range(7)]
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            for png in uploads:
                assert http.post("/predict", files={"file": ("x.png", png, "image/png")}).status_code == 200
            assert http.get("/neurons/99999").status_code == 404
            r = http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = samples(r.text)
        assert m[("fmnist_requests_total", frozenset({("method", "POST"), ("route", "/predict"),
                                                       ("status", "200")}))] == 7
        # by route template: a path of its own per neuron would be a label per neuron
        assert m[("fmnist_requests_total", frozenset({("method", "GET"), ("route", "/neurons/{k}"),
                                                       ("status", "404")}))] == 1
        assert m[("fmnist_request_seconds_count", frozenset({("route", "/predict")}))] == 7
        calls = m[("fmnist_model_calls_total", frozenset())]
        assert 1 <= calls <= 7
        assert m[("fmnist_batch_images_count", frozenset())] == calls
        assert m[("fmnist_batch_images_sum", frozenset())] == 7  # every image went through the model once
        assert m[("fmnist_queue_images", frozenset())] == 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    posts = [x for x in lines if x["route"] == "/predict"]
    assert len(posts) == 7
    for x in posts:
        assert x["method"] == "POST" and x["status"] == 200 and x["client"] == "127.0.0.1" and x["duration_ms"] > 0
    assert any(x["route"] == "/neurons/{k}" and x["status"] == 404 for x in lines)
    assert "PNG" not in err and "IHDR" not in err  # nothing of an upload in the log


def test_metrics_need_the_key_and_ready_is_open(trained_run):
    app = serve.create_app(trained_run, policy=serve.Policy(api_keys=(KEY,)))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/metrics").status_code == 401
        r = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "fmnist_requests_total" in r.text
        # the refused scrape was counted too: Observe is outside the key check
        assert 'status="401"' in r.text
        assert client.get("/ready").status_code == 200  # no key: load balancers poll it


def test_ready_is_503_until_the_model_is_loaded(trained_run):
    app = serve.create_app(trained_run)
    client = TestClient(app, base_url="http://127.0.0.1")  # not entered: no lifespan, no model
    r = client.get("/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    with client:
        assert client.get("/ready").status_code == 200
    assert app.state.ready is False  # stopped: no longer ready


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` that are worker processes (multiprocessing's spawned children)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_two_workers_share_the_port_and_their_metrics_add_up(trained_run):
    proc, url = start(str(trained_run), "--workers", "2", "--quiet")
    try:
        assert len(_children(proc.pid)) == 2
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(12):  # a connection each: the kernel spreads them over the workers
                r = httpx.post(url + "/predict", files={"file": ("x.png", _png(i), "image/png")}, timeout=30)
                assert r.status_code == 200 and "label" in r.json()
            m = samples(http.get("/metrics").text)
        assert m[("fmnist_requests_total", frozenset({("method", "POST"), ("route", "/predict"),
                                                       ("status", "200")}))] == 12
        assert m[("fmnist_batch_images_sum", frozenset())] == 12
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_answers_the_request_in_flight(trained_run, workers):
    proc, url = start(str(trained_run), "--workers", str(workers), "--quiet")
    port = int(url.rsplit(":", 1)[1])
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + _png(0) + f"\r\n--{boundary}--\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall((f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                       f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode() + body[:100])
            time.sleep(0.5)  # the head is read: the request is in flight
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the server is stopping
            s.sendall(body[100:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer[:300]
        assert "label" in json.loads(payload)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn ends by the signal it stopped for
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.TransportError):  # stopped: nothing listens any more
        httpx.get(url + "/health", timeout=2)


@pytest.mark.slow
def test_an_exported_model_is_served_without_torch(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "fmnist", "export", str(run)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    blocked = subprocess.run([sys.executable, "-c", NO_TORCH.replace("import fmnist", "import torch")],
                             capture_output=True, text=True)
    assert "no torch in this deployment" in blocked.stderr  # the blocker works
    image = tmp_path / "x.png"
    image.write_bytes(_png(3))
    proc, url = start(str(run / "model.onnx"), "--quiet", python=("-c", NO_TORCH))
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/predict", files={"file": ("x.png", _png(3), "image/png")})
            assert r.status_code == 200
            assert r.json()["label"] == predict.Predictor(run).predict([image])[0]["label"]  # PyTorch's answer
            assert http.get("/model").json()["backend"] == "onnxruntime"
            neurons = http.get("/neurons").json()
            assert neurons["count"] == 0 and "PyTorch" in neurons["note"]  # what the page's Explore tab says
            assert http.get("/neurons/1").status_code == 404
            assert http.get("/history").status_code == 404
            assert "fmnist_model_calls_total 1.0" in http.get("/metrics").text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err


def test_no_workers_is_one_sentence(trained_run):
    from conftest import assert_one_sentence, run_fmnist

    assert_one_sentence(run_fmnist("serve", str(trained_run), "--workers", "0", "--port", "0"), "--workers 0")
