"""fmnist serve on a network: the API key, headers, Host names, CORS, rates and sizes, slow clients, and the
refusals that come before anything is served. A real server in a subprocess where the behaviour depends on
uvicorn (deadlines, the moment it listens, memory); the app in-process otherwise."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import synthetic
from PIL import Image
from test_predict import _raw_png

from fmnist import runs, serve
from fmnist.errors import RunError

KEY = "env-key-0123456789"
FILE_KEY = "file-key-0123456789"


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`fmnist serve ... --port 0` in its own process; (the process, its base URL) once it says where it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", *args, "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    # Told the address, the server must accept at once: a connection now is not refused, and it is answered.
    with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    return proc, match.group(0).rstrip("/")


@pytest.fixture(scope="module")
def keyed(trained_run, tmp_path_factory):
    """A server with a key from the environment and another from a key file; (its URL, the key file, its pid)."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# one key a line\n{FILE_KEY}\n")
    proc, url = _start([str(trained_run), "--api-key-file", str(key_file), "--rate-limit", "100000/minute",
                        "--max-files", "3", "--header-timeout", "1"], env={"FMNIST_API_KEY": KEY})
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    yield url, key_file, proc.pid
    proc.terminate()
    proc.wait(10)


API_ROUTES = [("GET", "/model"), ("GET", "/limits"), ("GET", "/history"), ("GET", "/neurons"), ("GET", "/neurons/5"),
              ("GET", "/examples"), ("POST", "/predict"), ("POST", "/predict/pixels")]


def test_every_api_route_needs_the_key_and_health_the_page_and_docs_do_not(keyed):
    url, _, _ = keyed
    with httpx.Client(base_url=url, timeout=30) as c:
        for method, path in API_ROUTES:
            r = c.request(method, path)
            assert r.status_code == 401 and "API key" in r.json()["detail"], path
            assert r.headers["www-authenticate"] == "Bearer"
            r = c.request(method, path, headers={"X-API-Key": KEY + "x"})
            assert r.status_code == 401 and r.json()["detail"] == "the API key is not valid", path
        for path in ("/health", "/", "/static/app.js", "/docs", "/openapi.json", "/docs/swagger-ui-bundle.js"):
            assert c.get(path).status_code == 200, path
        assert c.get("/health").json() == {"status": "ok"}  # nothing a stranger should know
        x, _ = synthetic(1, 40)
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}, {"authorization": f"bearer {KEY}"},
                        {"X-API-Key": FILE_KEY}):
            assert c.get("/model", headers=headers).status_code == 200, headers
            r = c.post("/predict", files={"file": ("a.png", _png(x[0]))}, headers=headers)
            assert r.status_code == 200 and r.json()["top"], headers


def test_the_key_file_is_read_again_when_it_changes(keyed):
    url, key_file, _ = keyed
    new = "rotated-key-0123456789"
    try:
        key_file.write_text(new + "\n")
        os.utime(key_file, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later time, whatever the clock's grain
        assert httpx.get(url + "/model", headers={"X-API-Key": new}).status_code == 200
        assert httpx.get(url + "/model", headers={"X-API-Key": FILE_KEY}).status_code == 401  # rotated out
        assert httpx.get(url + "/model", headers={"X-API-Key": KEY}).status_code == 200  # the environment's stays
    finally:
        key_file.write_text(FILE_KEY + "\n")
        os.utime(key_file, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))


def test_every_answer_carries_the_security_headers(keyed):
    url, _, _ = keyed
    for path in ("/", "/health", "/model", "/static/app.js", "/docs", "/nothing-here"):
        h = httpx.get(url + path).headers
        csp = h["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer", path
        assert h["x-frame-options"] == "DENY", path


def test_other_origins_and_host_names_are_refused(keyed):
    url, _, _ = keyed
    evil = "http://evil.example"
    # A page elsewhere sending the key header needs a preflight: it gets no CORS permission.
    pre = httpx.options(url + "/predict", headers={"Origin": evil, "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "x-api-key"})
    assert "access-control-allow-origin" not in pre.headers and pre.status_code >= 400
    # A cross-site form post (no preflight) carries no key: refused before its body is read.
    x, _ = synthetic(1, 41)
    r = httpx.post(url + "/predict", files={"file": ("a.png", _png(x[0]))}, headers={"Origin": evil})
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
    # DNS rebinding: a page of evil.example whose name now points here sends Host: evil.example.
    port = url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example"):
        r = httpx.get(url + "/model", headers={"Host": host, "X-API-Key": KEY})
        assert r.status_code == 400, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert httpx.get(url + "/model", headers={"Host": host, "X-API-Key": KEY}).status_code == 200, host


def test_cors_opens_only_to_the_origins_given_and_hosts_to_the_names_given(trained_run):
    policy = serve.Policy(api_keys=(KEY,), cors_origins=("https://ok.example",), allowed_hosts=("proxy.example",))
    app = serve.create_app(trained_run, policy=policy)

    async def go():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://proxy.example") as c:
            pre = {o: await c.options("/model", headers={"Origin": o, "Access-Control-Request-Method": "GET",
                                                          "Access-Control-Request-Headers": "x-api-key"})
                   for o in ("https://ok.example", "https://evil.example")}
            got = await c.get("/model", headers={"Origin": "https://ok.example", "X-API-Key": KEY})
            other = await c.get("/model", headers={"Host": "other.example", "X-API-Key": KEY})
            return pre, got, other

    pre, got, other = asyncio.run(go())
    assert pre["https://ok.example"].headers["access-control-allow-origin"] == "https://ok.example"
    assert "x-api-key" in pre["https://ok.example"].headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in pre["https://evil.example"].headers
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == "https://ok.example"
    assert other.status_code == 400


def test_docs_load_nothing_from_elsewhere(keyed):
    url, _, _ = keyed
    page = httpx.get(url + "/docs").text
    assert "SwaggerUIBundle" not in page and "<script>" not in page  # no inline script
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(not s.startswith(("http", "//")) for s in sources), sources
    for s in sources:
        assert httpx.get(f"{url}/{s}").status_code == 200, s
    schemes = httpx.get(url + "/openapi.json").json()["components"]["securitySchemes"]  # /docs' Authorize button
    assert {v["type"] for v in schemes.values()} == {"http", "apiKey"}


def test_no_answer_names_a_path_on_the_server(keyed, trained_run):
    url, _, _ = keyed
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}) as c:
        model = c.get("/model").json()
        assert model["name"] == trained_run.name
        text = json.dumps(model) + c.get("/neurons").text + c.get("/examples").text + c.get("/limits").text
    assert str(trained_run.parent) not in text and "/tmp" not in text and "runs/r" not in text
    assert model["config"]["data_dir"] == "tiny" and model["config"]["out_dir"] == "runs"  # the last part only


def test_too_many_files_too_many_pixels_and_a_flood_of_large_images(keyed):
    url, _, pid = keyed
    x, _ = synthetic(4, 42)
    h = {"X-API-Key": KEY}
    r = httpx.post(url + "/predict", files=[("file", (f"{i}.png", _png(a))) for i, a in enumerate(x)], headers=h)
    assert r.status_code == 413 and r.json()["detail"] == "4 files in one request: send at most 3."
    # A 64-megapixel 1-bit PNG is 8 kB: refused from its header, before a pixel is decoded or allocated.
    big = _raw_png(8000, 8000)
    assert len(big) < 20_000

    def peak() -> int:  # kB: the server's largest resident size so far
        return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))

    before = peak()

    async def flood():
        async with httpx.AsyncClient(base_url=url, headers=h, timeout=30) as c:
            async def health_ms():
                times = []
                for _ in range(5):
                    await asyncio.sleep(0.01)
                    t = time.perf_counter()
                    assert (await c.get("/health")).status_code == 200
                    times.append((time.perf_counter() - t) * 1000)
                return float(np.median(times))
            return await asyncio.gather(*[c.post("/predict", files={"file": (f"{i}.png", big)}) for i in range(10)],
                                        health_ms())

    *answers, ms = asyncio.run(flood())
    for a in answers:
        assert a.status_code == 413 and "8000x8000 pixels is more than this service's 16 megapixels" in a.json()[
            "detail"]
    print(f"peak memory grew {peak() - before} kB; /health median {ms:.1f} ms")
    assert peak() - before < 50_000  # kB: ten decoded images would be 640 MB
    assert ms < 100


def test_large_images_are_decoded_off_the_event_loop(keyed):
    """Eight clients each sending a 16-megapixel 1-bit PNG (2 kB, slow to decode): /health still answers quickly."""
    url, _, _ = keyed
    big = _raw_png(4000, 4000)

    async def go():
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as c:
            posts = [asyncio.ensure_future(c.post("/predict", files={"file": (f"{i}.png", big)})) for i in range(8)]
            times = []  # ms: /health while the images are being decoded (each about 150 ms of CPU)
            await asyncio.sleep(0.05)
            while not all(p.done() for p in posts) and len(times) < 50:
                t = time.perf_counter()
                await c.get("/health")
                times.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(0.02)
            return await asyncio.gather(*posts), times

    answers, times = asyncio.run(go())
    print("health ms while decoding:", np.round(times).tolist())
    assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers]
    assert len(times) >= 3 and float(np.percentile(times, 75)) < 100, times


def test_connections_that_never_finish_their_headers_are_closed(keyed):
    url, _, _ = keyed
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(100):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the rest
        socks.append(s)
    t = time.perf_counter()
    assert httpx.get(url + "/health", timeout=5).status_code == 200  # the server still answers others
    closed = 0
    for s in socks:
        s.settimeout(max(0.1, 5 - (time.perf_counter() - t)))
        try:
            closed += s.recv(1) == b""  # the server closed it
        except (TimeoutError, OSError):
            pass
        s.close()
    print(f"{closed} of 100 closed within {time.perf_counter() - t:.2f} s")
    assert closed == 100 and time.perf_counter() - t < 5  # --header-timeout 1


def test_the_rate_per_client_is_limited_and_health_is_not(trained_run):
    app = serve.create_app(trained_run, policy=serve.Policy(rate_limit="3/minute"))

    async def go():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, client=("10.0.0.1", 1)), base_url="http://127.0.0.1") as c:
            first = [(await c.get("/limits")).status_code for _ in range(4)]
            health = [(await c.get("/health")).status_code for _ in range(5)]
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.2", 1)),
                                         base_url="http://127.0.0.1") as other:
                theirs = (await other.get("/limits")).status_code
            return first, (await c.get("/model")), health, theirs

    first, refused, health, theirs = asyncio.run(go())
    assert first == [200, 200, 200, 429] and health == [200] * 5 and theirs == 200
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert "too many requests" in refused.json()["detail"]


def test_a_full_queue_is_503_with_retry_after(trained_run):
    app = serve.create_app(trained_run)
    x, _ = synthetic(1, 43)

    async def go():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            full = serve.Batcher(app.state.served.predictor, max_queue=0)
            app.dependency_overrides[serve.get_batcher] = lambda: full
            return (await c.post("/predict", files={"file": ("a.png", _png(x[0]))}),
                    await c.post("/predict/pixels", json={"pixels": x[0].tolist()}))

    for r in asyncio.run(go()):
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]


def test_the_batcher_holds_at_most_max_queue_images(trained_run):
    batcher = serve.Batcher(runs_predictor(trained_run), max_queue=5)
    x, _ = synthetic(6, 44)

    async def go():  # the batcher's task is not running: what is queued stays queued
        waiting = [asyncio.ensure_future(batcher.outputs(x[:4]))]
        await asyncio.sleep(0)
        with pytest.raises(serve.Busy):
            await batcher.outputs(x[:2])
        one = asyncio.ensure_future(batcher.outputs(x[:1]))  # 4 + 1 fit
        await asyncio.sleep(0)
        task = asyncio.create_task(batcher.run())
        results = await asyncio.gather(*waiting, one)
        task.cancel()
        return results

    results = asyncio.run(go())
    assert [len(r[0]) for r in results] == [4, 1] and batcher.waiting == 0


def runs_predictor(run_dir):
    from fmnist import predict

    return predict.Predictor(run_dir)


def test_tracked_neurons_that_are_not_neurons_are_refused_at_load(trained_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    frames = runs.read_neurons(run)[5]
    for bad in ({"neuron_-5": frames}, {"neuron_33": frames}, {"neuron_5": frames[:, :10]}):
        np.savez(run / "neurons.npz", **bad)
        with pytest.raises(RunError, match="neurons.npz tracks neuron .*delete it"):
            serve.load(run)
    np.savez(run / "neurons.npz", neuron_7=frames)
    assert serve.load(run).default_neuron == 7


@pytest.mark.parametrize("argv, words", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 reaches beyond this machine"),
    (["--host", "::"], "--host :: reaches beyond this machine"),
    (["--host", ""], "--host '' reaches beyond this machine"),
    (["--host", "192.0.2.7"], "--host 192.0.2.7 reaches beyond this machine"),
    (["--max-body-mb", "nan"], "--max-body-mb nan is not a size"),
    (["--max-body-mb", "inf"], "--max-body-mb inf is not a size"),
    (["--api-key", "short"], "must be 8 or more"),
    (["--rate-limit", "lots"], "--rate-limit 'lots' is not a rate"),
    (["--max-files", "0"], "--max-files 0"),
    (["--header-timeout", "nan"], "--header-timeout nan"),
    (["--api-key-file", "/nonexistent/keys"], "cannot read the API key file"),
])
def test_unsafe_or_broken_settings_are_one_sentence_before_serving(trained_run, argv, words, capsys, monkeypatch):
    from fmnist import cli

    monkeypatch.delenv("FMNIST_API_KEY", raising=False)
    assert cli.main(["serve", str(trained_run), "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmnist: error: ") and words in err and len(err.splitlines()) == 1, err
    if "beyond" in words:
        assert "--api-key" in err and "--insecure-no-key" in err


def test_loopback_names_need_no_key():
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("localhost") and serve.is_loopback("::1")
    assert not any(serve.is_loopback(h) for h in ("0.0.0.0", "", "::", "192.0.2.7"))


def test_keys_are_compared_whole(tmp_path):
    keys = serve.Keys((KEY,), None)
    assert keys.valid(KEY) and not keys.valid(KEY[:-1]) and not keys.valid(KEY + "0") and not keys.valid("")
    assert not keys.valid(None) and not keys.valid("é" * 18)
    assert not serve.Keys((), None).required
    f = tmp_path / "keys"
    f.write_text("\n# comment\n")
    with pytest.raises(Exception, match="holds no key"):
        serve.Keys((), f)
    dataclasses.replace(serve.Policy(), api_key_file=f)  # a Policy is a plain dataclass
