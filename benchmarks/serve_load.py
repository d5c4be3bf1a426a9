"""Load on `fmnist serve`: requests/s and latency with single-image PNG uploads, from an asyncio httpx client.

    python benchmarks/serve_load.py RUN_DIR [--seconds 10] [--soak 60]
    python benchmarks/serve_load.py RUN_DIR --workers 1 2 --clients 32 --soak 0   # 1 worker process against 2

Starts `fmnist serve RUN_DIR --port 0 --quiet` in its own process, then, from
this process, keeps C clients busy (C = 1, 8, 32), each sending POST /predict
with one 28x28 PNG test image (multipart, field `file`) and waiting for the
answer before sending the next, for --seconds each. Then a soak: 32 clients for
--soak seconds, which must finish at least 10,000 requests with no error.
Every answer is checked (status 200 and a class). The client shares the
machine with the server: on 2 cores it takes a good part of one.
Measured 2026-11-29 on the 2-core VM: see README.

With --workers 1 2, one server per worker count runs at once (`fmnist serve
--workers N`), and the repeats take turns between them (1, 2, 1, 2, ...), so
that a neighbour's load on a shared machine falls on both alike; each row is
the median of its repeats, and the ratio of requests/s to the first worker
count's is the median of the per-turn ratios. The mean batch comes from
/metrics (every worker's model calls added up). "server cores" is the CPU
time of the server's processes per second of the run, "client cores" this
process's: on a machine of 2 cores, 2 less their sum is what other jobs took.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fmnist import data

BOUNDARY = "fmnistbenchboundary"


def bodies(n: int = 256) -> list[bytes]:
    """n multipart bodies, each one test image as a PNG (encoded once, so the client spends its time sending)."""
    x, _ = data.load_split(data.locate(), "test")
    out = []
    for img in x[:n]:
        png = io.BytesIO()
        Image.fromarray(img).save(png, format="PNG")
        out.append((f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="test.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n").encode() + png.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode())
    return out


async def load(url: str, clients: int, seconds: float, payloads: list[bytes]) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}

    async def client(k: int) -> None:
        # A client of its own per simulated user, one connection each: httpx's shared pool slows down with
        # many connections (at 32, a third of the requests/s of 32 separate clients on the 2-core VM).
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await _loop(k, http)

    async def _loop(k: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                r = await http.post("/predict", content=payloads[i % len(payloads)], headers=headers)
                ok = r.status_code == 200 and "label" in r.json()
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok
            i += clients

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*[client(k) for k in range(clients)])
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors, "rps": len(latencies) / wall,
            "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "client_cores": cpu / wall, "wall": wall}


def _run(coro):
    """asyncio.run on uvloop when it is installed (uvicorn[standard] brings it): the client then costs less of
    the CPU it shares with the server. Python's garbage collector is off while it runs: its pauses in this
    process are the instrument's, not the server's latency."""
    gc.collect()
    gc.disable()
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
    finally:
        gc.enable()


def model_calls(url: str) -> tuple[float, float]:
    """(model calls, images) so far, every worker's, from /metrics."""
    found = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
             for s in f.samples}
    return found["fmnist_batch_images_count"], found["fmnist_batch_images_sum"]


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far (Linux /proc; nan elsewhere)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats = [Path(f"/proc/{pid}/stat")] + [p for p in Path("/proc").glob("[0-9]*/stat")
                                               if _parent(p) == pid]
        return sum(sum(int(x) for x in p.read_text().rsplit(")", 1)[1].split()[11:13]) for p in stats) / tick
    except (OSError, ValueError):
        return float("nan")


def _parent(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def start(run: str, workers: int) -> tuple[subprocess.Popen, str]:
    """`fmnist serve RUN --workers N` on a free port, with no rate per client (every request here comes from one
    address); (the process, its URL) once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", run, "--port", "0", "--quiet",
                             "--workers", str(workers), "--rate-limit", "1000000/minute"], stdout=subprocess.PIPE,
                            text=True)
    url = re.search(r"http://\S+/", proc.stdout.readline()).group(0).rstrip("/")
    while True:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="the run directory to serve")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per concurrency level (default: 10)")
    ap.add_argument("--soak", type=float, default=60.0, help="seconds of the 32-client soak, 0 for none "
                                                             "(default: 60)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per concurrency level; medians (default: 3)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels "
                                                                              "(default: 1 8 32)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="worker processes of the server, one "
                                                                        "server per number (default: 1)")
    args = ap.parse_args()
    servers = {w: start(args.run, w) for w in args.workers}
    try:
        payloads = bodies()
        for _, url in servers.values():
            _run(load(url, 8, 2.0, payloads))  # warm-up
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("| workers | clients | requests/s | ratio | p50 latency | p99 latency | errors | mean batch | "
              "server cores | client cores |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for clients in args.clients:
            runs: dict[int, list[dict]] = {w: [] for w in args.workers}
            for _ in range(args.repeats):
                for w, (proc, url) in servers.items():  # taking turns
                    calls, images = model_calls(url)
                    cpu = cpu_seconds(proc.pid)
                    r = _run(load(url, clients, args.seconds, payloads))
                    r["server_cores"] = (cpu_seconds(proc.pid) - cpu) / r["wall"]
                    calls2, images2 = model_calls(url)
                    r["batch"] = (images2 - images) / max(calls2 - calls, 1)
                    runs[w].append(r)
            base = runs[args.workers[0]]
            for w in args.workers:
                med = {k: statistics.median(r[k] for r in runs[w])
                       for k in ("rps", "p50", "p99", "batch", "server_cores", "client_cores")}
                ratio = statistics.median(r["rps"] / b["rps"] for r, b in zip(runs[w], base))
                print(f"| {w} | {clients} | {med['rps']:,.0f} | {ratio:.2f} | {med['p50']:.1f} ms | "
                      f"{med['p99']:.1f} ms | {sum(r['errors'] for r in runs[w])} | {med['batch']:.1f} | "
                      f"{med['server_cores']:.2f} | {med['client_cores']:.2f} |", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        for w, (_, url) in servers.items():
            if args.soak > 0:
                soak = _run(load(url, 32, args.soak, payloads))
                print(f"\nsoak, {w} workers: 32 clients for {args.soak:.0f} s: {soak['requests']:,} requests, "
                      f"{soak['errors']} errors, {soak['rps']:,.0f} requests/s, p50 {soak['p50']:.1f} ms, "
                      f"p99 {soak['p99']:.1f} ms")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
