"""Does the service stay fair and bounded? Against a real `fmnist serve` on loopback:

    python benchmarks/serve_limits.py RUN_DIR fair     # 8 polite clients alone, beside a flooder, alone again
    python benchmarks/serve_limits.py RUN_DIR memory   # RSS after 1,000 and 20,000 requests, then a burst

fair: the server limits each client address to 300 requests a minute; 8
polite clients (each its own address, 127.0.0.10-17, 2 requests a second)
run 20 s alone, then beside a flooder from 127.0.0.99 sending 10x the limit
(50 a second on 4 connections), then alone again; it prints their latency's
p99 and median, and how many of the flooder's requests got 429.
memory: the server's resident memory after 1,000 and after 20,000 one-image
requests from 8 clients, then after a burst of 400 requests of 16 images at
once. Loopback addresses other than 127.0.0.1 work on Linux. Results:
benchmarks/RESULTS.md, "Serving on a network".
"""

from __future__ import annotations

import io
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image

LIMIT = 300  # requests a minute per client address, in the fairness run


def png(seed: int) -> bytes:
    a = (np.random.default_rng(seed).random((28, 28)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    return out.getvalue()


IMAGE = png(0)


def start(run: str, *extra: str) -> tuple[subprocess.Popen, str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen(["fmnist", "serve", run, "--port", str(port), "--quiet", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:  # the address is told once the server accepts
        if "http://" in line:
            break
    return p, f"http://127.0.0.1:{port}"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def client(base: str, address: str, seconds: float, rate: float, out: list) -> None:
    """Requests of one image at `rate` a second for `seconds`: (latency, status) into `out`."""
    c = httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        r = c.post(base + "/predict", files={"file": ("a.png", IMAGE, "image/png")})
        out.append((time.perf_counter() - t, r.status_code))
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - t)))


def fair(run: str) -> None:
    p, base = start(run, "--rate-limit", f"{LIMIT}/minute")
    try:
        alone = None
        for phase in ("alone", "beside a flooder", "alone again"):
            polite, flood = [[] for _ in range(8)], []
            threads = [threading.Thread(target=client, args=(base, f"127.0.0.{10 + i}", 20, 2.0, polite[i]))
                       for i in range(8)]
            if phase == "beside a flooder":
                threads += [threading.Thread(target=client, args=(base, "127.0.0.99", 20, LIMIT / 60 * 10 / 4, flood))
                            for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seen = [x for o in polite for x in o]
            ok = [lat for lat, code in seen if code == 200]
            p99 = float(np.percentile(ok, 99)) * 1e3
            alone = alone or p99
            print(f"{phase}: polite p99 {p99:.1f} ms (x{p99 / alone:.2f} of alone), median "
                  f"{statistics.median(ok) * 1e3:.1f} ms, {len(ok)} of {len(seen)} answered 200; flooder "
                  f"{len(flood)} sent, {sum(c == 429 for _, c in flood)} got 429", flush=True)
    finally:
        p.terminate()
        p.wait()


def memory(run: str) -> None:
    p, base = start(run, "--rate-limit", "1000000/minute")
    try:
        codes: list[int] = []

        def send(n: int) -> None:
            c = httpx.Client(timeout=60)
            for _ in range(n):
                codes.append(c.post(base + "/predict", files={"file": ("a.png", IMAGE, "image/png")}).status_code)

        for total in (1000, 20000):
            threads = [threading.Thread(target=send, args=((total - len(codes)) // 8,)) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print(f"after {len(codes):,} requests: RSS {rss_mb(p.pid):.1f} MB; answers "
                  f"{ {k: codes.count(k) for k in set(codes)} }", flush=True)
        many = [("file", (f"{i}.png", png(i), "image/png")) for i in range(16)]
        burst: list[int] = []
        threads = [threading.Thread(target=lambda: burst.append(httpx.post(base + "/predict", files=many,
                                                                           timeout=120).status_code))
                   for _ in range(400)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"a burst of 400 requests of 16 images: {dict((k, burst.count(k)) for k in set(burst))}; RSS "
              f"{rss_mb(p.pid):.1f} MB")
    finally:
        p.terminate()
        p.wait()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("fair", "memory"):
        sys.exit(__doc__)
    (fair if sys.argv[2] == "fair" else memory)(sys.argv[1])
