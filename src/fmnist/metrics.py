"""What `fmnist serve` tells whoever runs it: Prometheus metrics at /metrics and one JSON log line per request.

    metrics = Metrics()                       # made by serve.create_app, one per app
    app = Observe(app, metrics, log_json=True)  # outermost middleware: it sees every answer, 401 and 429 included

Metrics (Prometheus' text format, from prometheus_client):

    fmnist_requests_total{method, route, status}   requests answered, by route template (/neurons/{k}, not /neurons/7)
    fmnist_request_seconds{route}                   latency histogram, from the request's arrival to its last byte
    fmnist_batch_images                             histogram of the images in each model call (the batcher's batches)
    fmnist_queue_images                             images waiting for the model now
    fmnist_model_calls_total                        model calls

With several worker processes (`fmnist serve --workers N`) each process writes its
values into the folder named by PROMETHEUS_MULTIPROC_DIR (serve makes it) and
whichever worker answers /metrics adds up every worker's: counters and
histograms are sums, the queue a sum over the live workers.

The access log (`--log-format json`) is one JSON object a line on stderr, when a
request has been answered: time, method, route, path, status, duration in
milliseconds, client address. Nothing of a request's body (no image) is in it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as prom_multiprocess

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # images per model call (serve's max_batch: 1024)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    """The folder the workers share their values in, when serving with several processes."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The service's metrics in a registry of its own (two apps in one process count apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fmnist_requests", "Requests answered", ["method", "route", "status"], registry=r)
        self.latency = Histogram("fmnist_request_seconds", "Seconds from a request's arrival to its answer's end",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("fmnist_batch_images", "Images in each model call", buckets=BATCH_BUCKETS,
                               registry=r)
        self.queue = Gauge("fmnist_queue_images", "Images waiting for the model", registry=r,
                           multiprocess_mode="livesum")
        self.calls = Counter("fmnist_model_calls", "Model calls", registry=r)

    def model_call(self, images: int) -> None:
        self.calls.inc()
        self.batch.observe(images)

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's metrics, or every worker's added up."""
        if multiprocess_dir():
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)
            return prometheus_client.generate_latest(registry)
        return prometheus_client.generate_latest(self.registry)


def route_of(scope: dict[str, Any]) -> str:
    """The route template a request matched (a bounded set of labels, whatever paths clients send)."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    path = scope.get("path", "")
    for prefix in ("/static/", "/docs/"):
        if path.startswith(prefix):
            return prefix + "*"
    return "unmatched"


class Observe:
    """ASGI middleware: counts and times every request, and logs it as one JSON line when `log_json`."""

    def __init__(self, app, metrics: Metrics, log_json: bool = False, stream=None):
        self.app, self.metrics, self.log_json, self.stream = app, metrics, log_json, stream

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # unless an answer starts

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            route = route_of(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if self.log_json:
                client = scope.get("client")
                line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "method": scope["method"],
                        "route": route, "path": scope.get("path", ""), "status": status,
                        "duration_ms": round(seconds * 1000, 3), "client": client[0] if client else None}
                stream = self.stream or sys.stderr
                stream.write(json.dumps(line) + "\n")
                stream.flush()
