"""fmnist serve run by an operator: /metrics in Prometheus' text format, JSON access logs, /ready, several worker
processes, a graceful stop on SIGTERM, and an exported ONNX model served without torch."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fmnist import serve

KEY = "operator-key-123"


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def start(*argv: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`fmnist serve ARGV --port 0` in its own process; (the process, its base URL once it answers /ready)."""
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", *argv, "--port", "0",
                             "--rate-limit", "100000/minute"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
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
