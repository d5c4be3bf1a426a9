"""The web service and its page: try a model in the browser, and watch what its neurons learned.

    app = create_app("runs/default")   # a FastAPI app, for any ASGI server (tests start it on any port)
    serve("runs/default", "127.0.0.1", 8000, ready=print)   # what `fmnist serve RUN_DIR` runs

Endpoints: POST /predict (multipart, field `file`, one or several images),
POST /predict/pixels (a 28x28 JSON array, what the page's drawing canvas sends),
POST /explain (as /predict, under the same limits: why the model answered, each input pixel's attribution from
explain.py, with the 28x28 input it explains; 409 for an exported model, which has no gradients),
GET /health, GET /ready (503 until the model is loaded), GET /metrics (Prometheus' text format, metrics.py),
GET /limits, GET /model, GET /history, GET /neurons,
GET /neurons/{k}, GET /neurons/{k}/profile (what the neuron responds to on the test split, computed on first
asking and kept; 404 with a sentence when the test images are not on the server), GET /examples (the product
photos shipped in static/examples/, which the page offers to click), the OpenAPI docs at /docs (Swagger UI served
from the swagger-ui-bundle-v2 package, nothing from a CDN), and the page at /
(plain HTML, CSS and JavaScript in static/, nothing fetched from elsewhere,
every URL relative).

What is served is a run directory, or a model.onnx that `fmnist export` wrote (onnxruntime, no torch: then no
neurons and no history). `serve(..., workers=N)` runs N processes on one port, each building its app with
`app_from_env`.

In FastAPI's own shape: the app's lifespan loads the run once (`load`: the
Predictor over best.pt, the first layer's pictures, the tracked neurons, the
summary) and starts the batcher; the routes live on `router` and receive what
they share through dependencies (`get_served`, `get_batcher`), which tests may
replace with `app.dependency_overrides`. `serve` holds the serving policy.

Requests that arrive together are classified as one batch: a single task feeds
the model, and every request waiting when it is free joins the next call; when
more than `max_queue` images wait, a request is answered 503 with Retry-After.
An image's size is read from its header first: above `max_pixels` it is refused
with 413 before anything is decoded; a large one is decoded in a worker thread
(at most DECODERS at once), so a large upload never holds up /health. A body
over the limit is refused with 413 as soon as its declared length, or the bytes
received, pass the limit (FastAPI's own max_body_size). Nothing a client sends
names a file on the server, and no answer names a path on it.

Safe on a network (`Policy`, enforced by `Guard` before a body is read): an API
key on every API route when one is set (the page, its files, /docs and /health
stay open), a request rate per client, allowed Host names (a DNS-rebinding page
cannot read the API), CORS closed unless origins are given, a strict
Content-Security-Policy and no framing, and connections that do not finish
their request head within `header_timeout` closed. `serve` refuses to listen
beyond loopback without a key unless told `insecure_no_key`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import io
import ipaddress
import json
import math
import os
import secrets
import socket
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import limits
import numpy as np
import swagger_ui_bundle
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import __version__, metrics, predict, preprocess
from .errors import ConfigError, DataError, ImageError, RunError

MAX_BODY = 10 * 2**20  # bytes: the default limit on a request body (10 MiB)
INLINE_BYTES = 32 * 2**10  # uploads up to this size (and INLINE_PIXELS) are decoded on the event loop
INLINE_PIXELS = 256 * 256  # declared pixels: a 28x28 PNG decodes in about 0.2 ms; a larger image goes to a thread
DECODERS = 2  # images decoded at once in worker threads (the 2-core VM): bounds their memory and CPU
MAX_PIXELS = 16_000_000  # per image: a 28x28 classifier needs no more (a 12-megapixel phone photo passes)
MAX_FILES = 16  # images per POST /predict
MAX_QUEUE = 4096  # images waiting for the model; beyond it, 503 with Retry-After
RATE_LIMIT = "300/minute"  # per client address, every route but /health (a page load is about 20 requests)
HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's head
MAX_CONNECTIONS = 512  # connections and requests at once; uvicorn answers 503 beyond
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # Host names always allowed
TOP_K = 3  # classes in an answer unless the request asks for another number
TOP_K_MAX = 10  # every class of Fashion-MNIST
STATIC = Path(__file__).parent / "static"
EXAMPLES = STATIC / "examples"  # product photos to try, one per class: served as static/examples/<file>


class Busy(Exception):
    """More images wait for the model than the queue holds: the request is answered 503, to be retried."""


class Batcher:
    """One task feeds the model; the requests waiting when it is free go in together as one batch. At most
    max_queue images wait (more raise Busy), so that a flood costs refusals, not memory."""

    def __init__(self, predictor: predict.Predictor, max_batch: int = 1024, max_queue: int = MAX_QUEUE,
                 watch: metrics.Metrics | None = None):
        self.predictor, self.max_batch, self.max_queue, self.watch = predictor, max_batch, max_queue, watch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.waiting = 0  # images in the queue
        self.calls = self.images = 0  # model calls and images so far: images / calls is the mean batch

    async def run(self) -> None:
        while True:
            waiting = [await self.queue.get()]
            size = len(waiting[0][0])
            while not self.queue.empty() and size < self.max_batch:
                waiting.append(self.queue.get_nowait())
                size += len(waiting[-1][0])
            self.waiting -= size
            if self.watch:
                self.watch.queue.set(self.waiting)
            x = np.concatenate([pixels for pixels, _, _ in waiting])
            photo = np.concatenate([made for _, made, _ in waiting])
            try:
                probs, scores = await asyncio.to_thread(self.predictor.outputs, x, photo)
            except Exception as e:  # a bug: every waiting request gets it as a 500
                for _, _, future in waiting:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.calls += 1
            self.images += len(x)
            if self.watch:
                self.watch.model_call(len(x))
            start = 0
            for pixels, _, future in waiting:
                if not future.done():  # its client may have gone
                    part = slice(start, start + len(pixels))
                    future.set_result((probs[part], None if scores is None else scores[part]))
                start += len(pixels)

    async def outputs(self, pixels: np.ndarray, photo: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated probabilities, out-of-distribution scores or None) of these images, as Predictor.outputs
        (`photo`: which were made from photos)."""
        if self.waiting + len(pixels) > self.max_queue:
            raise Busy(f"{self.waiting} images are waiting for the model")
        future = asyncio.get_running_loop().create_future()
        made = np.zeros(len(pixels), bool) if photo is None else np.asarray(photo, bool).reshape(-1)
        self.queue.put_nowait((pixels, made, future))
        self.waiting += len(pixels)
        if self.watch:
            self.watch.queue.set(self.waiting)
        return await future


# ---------------------------------------------------------------- what a network may do

@dataclasses.dataclass
class Policy:
    """What the service allows: keys, origins, hosts, rates and sizes. The defaults suit loopback."""

    api_keys: tuple[str, ...] = ()  # any of these opens the API
    api_key_file: Path | None = None  # more keys, one a line ('#' starts a comment), re-read when the file changes
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API (none: CORS stays closed)
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides LOOPBACK_NAMES ('*': any)
    rate_limit: str = RATE_LIMIT  # per client address, in the `limits` notation: "60/minute", "5/second"
    max_files: int = MAX_FILES
    max_queue: int = MAX_QUEUE
    max_pixels: int = MAX_PIXELS
    header_timeout: float = HEADER_TIMEOUT


def check_key(key: str, where: str) -> str:
    """A key as sent in a header: printable ASCII without spaces, 8 characters or more; else one sentence."""
    if len(key) < 8 or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ConfigError(f"the API key from {where} must be 8 or more printable ASCII characters without spaces.")
    return key


class Keys:
    """The keys that open the API: given ones, plus a file's, re-read whenever the file's size or time changes
    (so keys rotate without a restart). Compared in constant time."""

    def __init__(self, keys: tuple[str, ...], path: Path | None):
        self.given = [k.encode() for k in keys]
        self.path, self.stamp, self.from_file = path, None, []
        if path is not None:
            self._reload(strict=True)

    @property
    def required(self) -> bool:
        return bool(self.given) or self.path is not None

    def _reload(self, strict: bool = False) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size) == self.stamp:
                return
            lines = Path(self.path).read_text(encoding="utf-8").splitlines()
            keys = [check_key(k, f"line {i + 1} of {self.path}") for i, line in enumerate(lines)
                    if (k := line.split("#", 1)[0].strip())]
        except (OSError, UnicodeError, ConfigError) as e:
            if strict:
                raise ConfigError(str(e) if isinstance(e, ConfigError) else
                                  f"cannot read the API key file {self.path}: {getattr(e, 'strerror', None) or e}.")\
                    from None
            return  # a file being rewritten: the keys read last stay in force
        if strict and not keys:
            raise ConfigError(f"the API key file {self.path} holds no key: write one per line.")
        self.from_file, self.stamp = [k.encode() for k in keys], (st.st_mtime_ns, st.st_size)

    def valid(self, presented: str | None) -> bool:
        if not presented or not presented.isascii():
            return False
        if self.path is not None:
            self._reload()
        given = presented.encode()
        ok = False
        for key in self.given + self.from_file:  # every key compared, so the time says nothing of which matched
            ok |= secrets.compare_digest(given, key)
        return ok


OPEN_PATHS = ("/", "/health", "/ready", "/docs", "/openapi.json")  # and /static/..., /docs/...: open to strangers
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                    (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin")]


def parse_rate(text: str) -> limits.RateLimitItem:
    try:
        return limits.parse(text)
    except ValueError:
        raise ConfigError(f"--rate-limit {text!r} is not a rate: write it as 60/minute, 5/second or "
                          "1000/hour.") from None


def _json(status: int, detail: str, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": detail}, status, headers=headers)


class Guard:
    """ASGI middleware in front of everything: security headers on every answer; the rate per client (429 with
    Retry-After); the API key on every API route (401), checked before the body is read."""

    def __init__(self, app, rate: limits.RateLimitItem, keys: Keys):
        self.app, self.rate, self.keys = app, rate, keys
        self.limiter = limits.strategies.MovingWindowRateLimiter(limits.storage.MemoryStorage())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in SECURITY_HEADERS if h[0] not in names]
            await send(message)

        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted below a prefix: the path within this app
            path = path[len(root):] or "/"
        refusal = None
        if path not in ("/health", "/ready"):  # what load balancers poll
            client = (scope.get("client") or ("unknown", 0))[0]
            if not self.limiter.hit(self.rate, client):
                reset = self.limiter.get_window_stats(self.rate, client).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                refusal = _json(429, f"too many requests: at most {self.rate} from one address; try again in "
                                     f"{wait} s", {"Retry-After": str(wait)})
        if refusal is None and self.keys.required and scope["method"] != "OPTIONS" and not (  # CORS preflights
                path in OPEN_PATHS or path.startswith(("/static/", "/docs/"))):
            headers = dict((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"])
            auth = headers.get("authorization", "")
            presented = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key")
            if not self.keys.valid(presented):
                refusal = _json(401, "this server needs an API key: send it as 'Authorization: Bearer KEY' or "
                                     "'X-API-Key: KEY'" if not presented else "the API key is not valid",
                                {"WWW-Authenticate": "Bearer"})
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------- the state the lifespan builds

@dataclasses.dataclass
class Served:
    """A run as the routes read it: loaded once, when the app starts."""

    run_dir: Path
    predictor: predict.Predictor  # over best.pt
    epoch: int  # best.pt's epoch
    summary: dict[str, Any]  # summary.json ({} while it is missing)
    pictures: np.ndarray  # (units, h, w): every first-layer neuron's incoming weights at best.pt
    tracked: dict[int, np.ndarray]  # neuron (1-based) -> (epochs + 1, h, w): the neurons followed every epoch
    parameters: int
    conv: bool  # the first layer is a convolution (its pictures are kernels)
    profiles: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)  # neuron -> /profile's answer
    test_split: tuple[np.ndarray, np.ndarray] | None = None  # (images, labels) the profiles are taken on

    def profile(self, k: int) -> dict[str, Any]:
        """What first-layer neuron `k` responds to on the run's test split (evaluate.neuron_profile), computed
        once per neuron on a copy of the model (its forward hook must not touch the predictions being served).
        DataError when the test images are not on this machine."""
        if k not in self.profiles:
            import copy

            from . import data, evaluate, runs

            if self.test_split is None:  # read once, on the first neuron asked for
                directory = data.locate(runs.read_config(self.run_dir).data_dir or None)
                self.test_split = data.load_split(directory, "test")
            images, labels = self.test_split
            found = evaluate.neuron_profile(copy.deepcopy(self.predictor.model).cpu(), images, labels, k)
            self.profiles[k] = {
                "neuron": k, "kind": "filter" if self.conv else "neuron", "classes": list(data.CLASSES),
                "top": [{"index": i, "label": int(labels[i]), "activation": round(float(found["activation"][i]), 4),
                         "pixels": images[i].tolist()} for i in found["top"].tolist()],
                "per_class": [round(float(v), 4) for v in found["per_class"]],
                "votes": [round(float(v), 4) for v in found["votes"]]}
        return self.profiles[k]

    @property
    def default_neuron(self) -> int:
        """The neuron the page opens at: 50 (the course project's) when tracked, else the first tracked."""
        if self.tracked:
            return 50 if 50 in self.tracked else min(self.tracked)
        return 50 if len(self.pictures) >= 50 else 1


NO_NEURONS = ("this server holds an exported model (ONNX), which keeps no layers to picture: serve the run "
              "directory (its best.pt, with PyTorch installed) to see the neurons and the training curves")


def load(run_dir: str | Path, device: str = "cpu") -> Served:
    """Read a run directory for serving: best.pt once, through its Predictor; or a model.onnx that `fmnist export`
    wrote, with onnxruntime and without torch (no neurons then, no history). One sentence if it cannot be."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".onnx":
        predictor = predict.Predictor(run_dir, batch_size=1024)
        info = predictor.info
        return Served(run_dir=run_dir, predictor=predictor, epoch=info.get("epoch", 0),
                      summary=info.get("summary", {}), pictures=np.zeros((0, 28, 28), np.float32), tracked={},
                      parameters=info.get("parameters", 0), conv=False)
    if run_dir.is_file():
        raise RunError(f"{run_dir} is a file: fmnist serve takes a run directory (its best.pt, history and "
                       "neurons) or a model.onnx written by fmnist export.")
    from . import models, runs

    predictor = predict.Predictor(run_dir, device=device, batch_size=1024)
    try:
        tracked = runs.read_neurons(run_dir)
    except RunError:  # trained without --track-neurons: the final weights are still there
        tracked = {}
    pictures = models.first_layer_pictures(predictor.model).numpy()
    for k, frames in tracked.items():  # the page opens at one of these: each must be a neuron of this model
        if not 1 <= k <= len(pictures) or np.ndim(frames) != 3 or np.shape(frames)[1:] != pictures.shape[1:]:
            raise RunError(f"{run_dir.name}/neurons.npz tracks neuron {k} (frames {list(np.shape(frames))}), but "
                           f"the first layer has neurons 1 to {len(pictures)} of {list(pictures.shape[1:])}: the "
                           "file is damaged or from another model; delete it to serve without tracked neurons.")
    return Served(run_dir=run_dir, predictor=predictor, epoch=predictor.info["epoch"],
                  summary=predictor.info.get("summary", {}), pictures=pictures, tracked=tracked,
                  parameters=models.count_parameters(predictor.model), conv=models.is_conv(predictor.model))


def model_threads(workers: int) -> int:
    """Threads for the model in each of `workers` processes: its share of the cores this process may use, less
    one for its event loop, at least one. The batches are small, and a second thread only fights the event loop
    (one process on the 2-core VM: 750 requests/s with 1 thread against 620 with 2, p99 130 ms against 160, with
    wrk at 32 clients)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, workers) - 1)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the run and start the batcher when the app starts; stop the batcher when it stops."""
    served = load(app.state.run_dir, app.state.device)
    batcher = Batcher(served.predictor, max_queue=app.state.policy.max_queue, watch=app.state.metrics)
    task = asyncio.create_task(batcher.run())
    app.state.served, app.state.batcher = served, batcher
    app.state.decoders = anyio.CapacityLimiter(DECODERS)  # on this event loop
    app.state.explainers = anyio.CapacityLimiter(1)  # POST /explain's gradients: one request at a time
    if app.state.serving:  # a server's process, not a test's
        if served.predictor.backend != "onnxruntime":
            import torch

            torch.set_num_threads(model_threads(app.state.workers))
        gc.collect()
        # The model, torch and FastAPI are loaded for good: later collections need not walk them again
        # (with wrk at 32 clients on the 2-core VM, p99 latency 62 ms against 174 ms without).
        gc.freeze()
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False  # shutting down: a load balancer sends no more
        task.cancel()


def get_served(request: Request) -> Served:
    return request.app.state.served


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


ServedDep = Annotated[Served, Depends(get_served)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]


# ---------------------------------------------------------------- the routes

# The key itself is checked by Guard, before a body is read; these declare it, so that /docs offers to send it.
_bearer, _header = HTTPBearer(auto_error=False, description="the API key, when the server has one"), \
    APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, when the server has one")
router = APIRouter(dependencies=[Depends(_bearer), Depends(_header)])
open_router = APIRouter()  # what load balancers and strangers may read


class Pixels(BaseModel):
    pixels: list[list[float]] = Field(description="28 rows of 28 values from 0 to 255: a light drawing on black, "
                                                  "as a Fashion-MNIST image")


TopK = Annotated[int, Query(ge=1, le=TOP_K_MAX, description="classes per image")]
WithInput = Annotated[bool, Query(description="add the 28x28 input the model saw, as a PNG data URL")]


def _data_url(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _declared_pixels(name: str | None, raw: bytes, max_pixels: int) -> int:
    """An upload's width x height from its header alone (nothing decoded); HTTPException 413 above max_pixels.
    An upload Pillow cannot identify counts 0: preprocess says what is wrong with it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw)) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:  # Pillow's own limit, far above ours
        raise HTTPException(413, f"{name or 'the upload'}: far more than this service's {max_pixels / 1e6:g} "
                                 "megapixels; send a smaller image (28x28 pixels are all the model sees).") from e
    except Exception:
        return 0
    if width * height > max_pixels:
        raise HTTPException(413, f"{name or 'the upload'}: {width}x{height} pixels is more than this service's "
                                 f"{max_pixels / 1e6:g} megapixels; send a smaller image (28x28 pixels are all the "
                                 "model sees).")
    return width * height


def _prepare_uploads(uploads: list[tuple[str, bytes]], max_pixels: int, how: str = "auto"
                     ) -> list[tuple[np.ndarray, str]]:
    """Decode and preprocess (in a worker thread); HTTPException 400 names the first file that is not an image."""
    out = []
    for name, raw in uploads:
        try:
            out.append(preprocess.prepare(raw, how, max_pixels=max_pixels))
        except ImageError as e:
            raise HTTPException(400, f"{name or 'the upload'}: {e}") from None
    return out




async def _classify(served: Served, batcher: Batcher, prepared: list[tuple[np.ndarray, str]],
                    names: list[str | None], top_k: int, with_input: bool) -> list[dict[str, Any]]:
    try:
        probs, scores = await batcher.outputs(np.stack([p for p, _ in prepared]),
                                              np.array([chosen == "photo" for _, chosen in prepared]))
    except Busy:
        raise HTTPException(503, "the model is busy: too many images are waiting; try again in a second",
                            headers={"Retry-After": "1"}) from None
    records = []
    for i, (name, (pixels, chosen)) in enumerate(zip(names, prepared)):
        score = None if scores is None else scores[i]
        rec = {"file": name, **served.predictor.record(probs[i], top_k, score), "preprocess": chosen}
        if with_input:
            rec["input"] = _data_url(pixels)
        records.append(rec)
    return records


async def _read_uploads(request: Request, file: list[UploadFile], preprocess: str = "auto"
                        ) -> list[tuple[np.ndarray, str]]:
    """The uploads of POST /predict and /explain as 28x28 model inputs, under the service's limits: 413 for too
    many files or pixels (from the headers, before decoding), 400 naming the first file that is not an image."""
    policy: Policy = request.app.state.policy
    if len(file) > policy.max_files:
        raise HTTPException(413, f"{len(file)} files in one request: send at most {policy.max_files}.")
    uploads = [(f.filename, await f.read()) for f in file]
    pixels = sum(_declared_pixels(name, raw, policy.max_pixels) for name, raw in uploads)  # 413 before decoding
    if sum(len(raw) for _, raw in uploads) <= INLINE_BYTES and pixels <= INLINE_PIXELS:
        return _prepare_uploads(uploads, policy.max_pixels, preprocess)  # small: quicker than handing it to a thread
    # large: in a worker thread (at most DECODERS at once), so that the server goes on answering meanwhile
    return await anyio.to_thread.run_sync(_prepare_uploads, uploads, policy.max_pixels, preprocess,
                                          limiter=request.app.state.decoders)


Files = Annotated[list[UploadFile], File(description="image files: PNG, JPEG, WebP, BMP, TIFF, GIF")]


@router.post("/predict", summary="Classify one or several uploaded images")
async def predict_files(request: Request, served: ServedDep, batcher: BatcherDep, file: Files,
                        top_k: TopK = TOP_K, input: WithInput = False):
    prepared = await _read_uploads(request, file)
    records = await _classify(served, batcher, prepared, [f.filename for f in file], top_k, input)
    return records[0] if len(records) == 1 else records


Method = Annotated[Literal["ig", "saliency", "occlusion"], Query(
    description="ig: integrated gradients from a black (no product) baseline; saliency: the gradient's size; "
                "occlusion: the logit's fall under a 4x4 black patch")]
Target = Annotated[str | None, Query(description="the class to explain (a name or an index); default: the "
                                                 "predicted one")]
Preprocess = Annotated[Literal["auto", "photo", "dataset"], Query(
    description="as fmnist predict --preprocess; dataset: a 28x28 input is taken as it is (the page sends the "
                "input the model saw)")]


@router.post("/explain", summary="Why the model answered: each input pixel's share in the class's calibrated logit")
async def explain_files(request: Request, served: ServedDep, file: Files, method: Method = "ig",
                        target: Target = None, preprocess: Preprocess = "auto"):
    if served.predictor.pixel_classifier is None:
        raise HTTPException(409, "this server holds an exported model (ONNX), which gives probabilities only and "
                                 "no gradients to explain: serve the run directory to ask why")
    from . import explain

    try:
        k = explain.parse_target(target, served.predictor.classes)
    except predict.PredictError as e:
        raise HTTPException(422, str(e).replace("--target", "target")) from None
    prepared = await _read_uploads(request, file, preprocess)
    pixels = np.stack([px for px, _ in prepared])
    # gradients in a worker thread, one request at a time: a convnet's 50 IG steps take a while on a CPU
    photo = np.array([chosen == "photo" for _, chosen in prepared])
    a, t, probs = await anyio.to_thread.run_sync(explain.attribute, served.predictor, pixels, method, k, photo,
                                                 limiter=request.app.state.explainers)
    e = explain.Explanation(method, tuple(served.predictor.classes), pixels, a, t, probs)
    records = [{"file": f.filename, "preprocess": chosen, **e.record(i), "input": pixels[i].tolist()}
               for i, (f, (_, chosen)) in enumerate(zip(file, prepared))]
    return records[0] if len(records) == 1 else records


@router.post("/predict/pixels", summary="Classify a 28x28 drawing")
async def predict_pixels(body: Pixels, served: ServedDep, batcher: BatcherDep, top_k: TopK = TOP_K,
                         input: WithInput = False):
    a = np.asarray(body.pixels, dtype=np.float64) if all(len(r) == 28 for r in body.pixels) else None
    if a is None or a.shape != (28, 28):
        raise HTTPException(422, "pixels must be 28 rows of 28 values")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
        raise HTTPException(422, "pixels must be numbers from 0 to 255")
    pixels = a.round().astype(np.uint8)
    return (await _classify(served, batcher, [(pixels, "dataset")], [None], top_k, input))[0]


@open_router.get("/health", summary="Whether the service answers (open to all: it says nothing else)")
async def health():
    return {"status": "ok"}


@open_router.get("/ready", summary="200 once the model is loaded and requests are taken; 503 before, and while "
                                    "shutting down (open to all, as /health)")
async def ready(request: Request):
    if not getattr(request.app.state, "ready", False):
        raise HTTPException(503, "the model is not loaded yet", headers={"Retry-After": "1"})
    return {"status": "ready"}


@router.get("/metrics", summary="Requests, latency, batch sizes, queue and model calls in Prometheus' text format")
async def prometheus_metrics(request: Request):
    from starlette.responses import Response

    return Response(request.app.state.metrics.exposition(), media_type=metrics.CONTENT_TYPE)


@router.get("/limits", summary="What the API accepts: the largest request body, files and pixels, classes per "
                               "answer")
async def api_limits(request: Request):
    policy: Policy = request.app.state.policy
    return {"max_body_bytes": request.app.state.max_body, "max_files": policy.max_files,
            "max_pixels": policy.max_pixels, "top_k": {"min": 1, "max": TOP_K_MAX, "default": TOP_K}}


def _no_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The config with every path cut to its last part: no answer names a place on the server."""
    return {k: Path(v).name if isinstance(v, str) and ("/" in v or "\\" in v) else v for k, v in config.items()}


@router.get("/model", summary="The run's name, configuration, size and accuracy; model calls so far")
async def model_info(served: ServedDep, batcher: BatcherDep):
    info = served.predictor.info
    return {"name": served.run_dir.name, "model": info["model"], "config": _no_paths(info["config"]),
            "backend": served.predictor.backend, "model_calls": batcher.calls, "images": batcher.images,
            "parameters": served.parameters, "epoch": served.epoch,
            "validation_accuracy": served.summary.get("best_val_accuracy"),
            "test_accuracy": served.summary.get("test_accuracy"), "classes": list(served.predictor.classes),
            "calibration": info.get("calibration")}


@router.get("/examples", summary="The example photos to try: file name, what it shows, and its URL relative to "
                                 "the service's root")
async def examples():
    return [{"file": f.name, "name": f.stem.replace("-", " "), "url": f"static/examples/{f.name}"}
            for f in sorted(EXAMPLES.iterdir()) if f.suffix.lower() in (".png", ".jpg", ".jpeg")]


@router.get("/history", summary="One row per epoch: loss, accuracy, learning rate")
async def history(served: ServedDep):
    if served.predictor.backend == "onnxruntime":
        raise HTTPException(404, "an exported model carries no training history: serve its run directory to see "
                                 "the curves")
    from . import runs

    try:
        return runs.read_history(served.run_dir)
    except RunError:  # its sentence names the run's path: not for clients
        raise HTTPException(404, "this run has no readable history.jsonl") from None


@router.get("/neurons", summary="The first layer's neurons: how many, which were tracked every epoch, "
                                "which the page opens at")
async def neurons(served: ServedDep):
    frames = max((len(a) for a in served.tracked.values()), default=1)
    return {"count": len(served.pictures), "note": None if len(served.pictures) else NO_NEURONS,
            "shape": list(served.pictures.shape[1:]), "tracked": sorted(served.tracked),
            "epochs": frames - 1, "conv": served.conv, "default": served.default_neuron}


@router.get("/neurons/{k}", summary="A first-layer neuron's incoming weights: every epoch if tracked, else final")
async def neuron(served: ServedDep, k: int = PathParam(ge=1, description="1-based, as --track-neurons")):
    if not len(served.pictures):
        raise HTTPException(404, NO_NEURONS)
    if k > len(served.pictures):
        raise HTTPException(404, f"the first layer has neurons 1 to {len(served.pictures)}")
    if k in served.tracked:
        frames = served.tracked[k]
        labels = [f"epoch {e}" for e in range(len(frames))]
    else:
        frames = served.pictures[k - 1][None]
        labels = [f"final weights only (best.pt, epoch {served.epoch}): this neuron was not followed during "
                  f"training; train with --track-neurons {k} to see every epoch"]
    scale = float(np.abs(frames).max()) or 1.0  # one colour scale across the epochs, as neuron_<k>.png
    return {"neuron": k, "tracked": k in served.tracked, "labels": labels, "scale": scale,
            "frames": np.round(frames, 6).tolist()}


@router.get("/neurons/{k}/profile", summary="What a first-layer neuron responds to on the test split: the nine "
                                            "images that excite it most, its mean per class, its vote per class")
async def neuron_profile(served: ServedDep, k: int = PathParam(ge=1, description="1-based, as --track-neurons")):
    if not len(served.pictures):
        raise HTTPException(404, NO_NEURONS)
    if k > len(served.pictures):
        raise HTTPException(404, f"the first layer has neurons 1 to {len(served.pictures)}")
    try:
        return await anyio.to_thread.run_sync(served.profile, k)
    except DataError:  # its sentence names this machine's paths: not for clients
        raise HTTPException(404, "the test images are not on the server, so what this neuron responds to cannot "
                                 "be shown (its pictures can): put the Fashion-MNIST files where fmnist data "
                                 "finds them and restart the server.") from None


@open_router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html")


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fmnist API</title>
<link rel="stylesheet" href="docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script><script src="static/docs.js"></script></body></html>
"""


@open_router.get("/docs", include_in_schema=False)
async def docs():
    """Swagger UI 5 (it reads OpenAPI 3.1) from the swagger-ui-bundle-v2 package: FastAPI's own page loads it from
    a CDN and runs an inline script, which the Content-Security-Policy forbids."""
    return HTMLResponse(DOCS_PAGE)


def create_app(run_dir: str | Path, max_body: int = MAX_BODY, device: str = "cpu",
               policy: Policy | None = None, log_format: str = "text") -> FastAPI:
    """The app for one run directory (its best.pt, history.jsonl, neurons.npz and summary.json), read when the
    app starts; `policy` says what the network may do (default: loopback's); log_format "json": one JSON line per
    request on stderr (metrics.Observe)."""
    run_dir, policy = Path(run_dir), policy or Policy()
    keys, rate = Keys(policy.api_keys, policy.api_key_file), parse_rate(policy.rate_limit)
    app = FastAPI(title="fmnist", version=__version__, lifespan=lifespan, max_body_size=max_body,
                  docs_url=None, redoc_url=None,
                  description=f"Fashion-MNIST classifier from the run `{run_dir.name}` (GET /model says which). "
                              f"Request bodies over {max_body:,} bytes are refused with 413."
                              + (" Every route but /health needs the API key." if keys.required else ""))
    app.state.run_dir, app.state.device, app.state.max_body, app.state.policy = run_dir, device, max_body, policy
    app.state.keyed, app.state.metrics, app.state.ready = keys.required, metrics.Metrics(), False
    app.state.serving, app.state.workers = False, 1  # set by serve and app_from_env: threads and gc in the lifespan
    app.include_router(open_router)
    app.include_router(router)
    app.mount("/docs", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Added last, so outermost: Guard answers first (headers, rate, key), then the Host, then CORS.
    if policy.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(policy.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"], max_age=600)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*LOOPBACK_NAMES, *policy.allowed_hosts])
    app.add_middleware(Guard, rate=rate, keys=keys)
    app.add_middleware(metrics.Observe, metrics=app.state.metrics, log_json=log_format == "json")  # sees every answer
    return app


# ---------------------------------------------------------------- serving policy

def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening, bound here so that a port in use is one sentence and port 0
    can say which port it got; listening at once, so that a client that connects as soon as it is told the address
    waits in the backlog instead of being refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host} port {port}: {e.strerror or e}; "
                          "choose another --port or --host.") from None
    except UnicodeError:
        sock.close()
        raise ConfigError(f"--host {host} is not a host name or address.") from None
    return sock


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback ('', 0.0.0.0 and :: are every network)."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return all(ipaddress.ip_address(a[4][0].split("%")[0]).is_loopback
                   for a in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, UnicodeError, ValueError):
        return False  # listen() says what is wrong with the name


def host_names(host: str) -> tuple[str, ...]:
    """The Host names a client of (host) may send besides loopback's: the bound address, and for every network
    this machine's name and addresses."""
    names = {f"[{host}]" if ":" in host else host} if host not in ("", "0.0.0.0", "::") else set()
    if not names:
        with contextlib.suppress(OSError, UnicodeError):
            names |= {socket.gethostname(), socket.getfqdn()}
            names |= {f"[{a[4][0]}]" if ":" in a[4][0] else a[4][0]
                      for a in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)}
    return tuple(sorted(n.lower() for n in names if n))


def body_limit(mb: float) -> int:
    """--max-body-mb in bytes; one sentence unless it is a finite number above 0."""
    if not math.isfinite(mb) or mb <= 0 or mb * 2**20 >= 2**63:
        raise ConfigError(f"--max-body-mb {mb} is not a size: give a number of MiB above 0, such as 10.")
    return max(1, int(mb * 2**20))


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline on each request's head: a connection that has not sent a request's
    line and headers within `timeout` seconds of opening (or of starting that request) is closed. uvicorn's only
    timer, timeout_keep_alive, starts after an answer, so a client that never finishes its headers would otherwise
    hold its connection for ever. A class of the module, so that a worker process imports it by name; `serve` and
    `app_from_env` set its timeout in each process."""

    timeout = HEADER_TIMEOUT  # seconds
    deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self.deadline is None:
            self.deadline = self.loop.call_later(self.timeout, self._expire)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self) -> None:
        self.deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """uvicorn's server with the app's lifespan entered around it, before the port is bound: a run that cannot
    be loaded is one sentence (uvicorn's own lifespan handling logs it as a traceback), and the address is
    announced only once the server accepts connections."""

    def __init__(self, config: uvicorn.Config, host: str, port: int, ready: Callable[[str], None]):
        super().__init__(config)
        self.host, self.port, self.ready, self.url = host, port, ready, ""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        async with app.router.lifespan_context(app):
            sock = listen(self.host, self.port)
            host, port = sock.getsockname()[:2]
            self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
            await super().serve(sockets=[sock])

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # the server accepts: now the address may be told
            keyed = " needs the API key;" if self.config.app.state.keyed else ""
            self.ready(f"serving {self.config.app.state.run_dir} at {self.url} (API docs at {self.url}docs;"
                       f"{keyed} Ctrl-C stops)")


def serve(run_dir: str | Path, host: str, port: int, *, max_body: int = MAX_BODY, device: str = "cpu",
          policy: Policy | None = None, insecure_no_key: bool = False, quiet: bool = False,
          log_format: str = "text", workers: int = 1, ready: Callable[[str], None] = lambda line: None) -> None:
    """Serve a run until Ctrl-C. `ready` receives one line, with the address, once the model is loaded and the
    server accepts connections (port 0: any free port). Every problem the caller can cause is a ConfigError,
    RunError or PredictError, raised before anything is served. With `workers` > 1, that many processes share the
    port (uvicorn's process manager), each building its app with `app_from_env`; SIGTERM or Ctrl-C stops them
    after the requests in flight are answered."""
    policy = policy or Policy()
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port: choose 0 to 65535 (0: any free port).")
    if max_body <= 0:
        raise ConfigError("the body limit (--max-body-mb) must be more than 0.")
    if not (math.isfinite(policy.header_timeout) and policy.header_timeout > 0):
        raise ConfigError(f"--header-timeout {policy.header_timeout} is not a time: give seconds above 0, such as "
                          "10.")
    if policy.max_files < 1:
        raise ConfigError(f"--max-files {policy.max_files} lets no image through: give 1 or more.")
    if not (policy.api_keys or policy.api_key_file) and not insecure_no_key and not is_loopback(host):
        raise ConfigError(f"--host {host or repr(host)} reaches beyond this machine, so fmnist serve needs a key: "
                          "give --api-key KEY (or FMNIST_API_KEY, or --api-key-file FILE), or --insecure-no-key "
                          "if you mean to serve it to anyone who can reach it.")
    policy = dataclasses.replace(policy, allowed_hosts=(*host_names(host), *policy.allowed_hosts))
    if workers < 1:
        raise ConfigError(f"--workers {workers} starts no process: give 1 or more.")
    HeaderDeadline.timeout = policy.header_timeout
    if workers > 1:
        return _serve_workers(run_dir, host, port, workers, max_body=max_body, device=device, policy=policy,
                              quiet=quiet, log_format=log_format, ready=ready)
    app = create_app(run_dir, max_body=max_body, device=device, policy=policy, log_format=log_format)
    config = uvicorn.Config(app, lifespan="off",  # _Server enters the lifespan itself
                            http=HeaderDeadline, limit_concurrency=MAX_CONNECTIONS,
                            log_level="warning" if quiet else "info", access_log=not quiet and log_format == "text")
    app.state.serving = True
    _Server(config, host, port, ready).run()


SETTINGS_ENV = "FMNIST_SERVE_SETTINGS"  # what a worker process builds its app from: JSON that serve writes


def app_from_env() -> FastAPI:
    """The app of one worker process (uvicorn's factory, `fmnist.serve:app_from_env`), from the settings the
    parent process put in FMNIST_SERVE_SETTINGS: run, body limit, device, policy, log format, workers."""
    s = json.loads(os.environ[SETTINGS_ENV])
    p = s["policy"]
    policy = Policy(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items() if k != "api_key_file"},
                    api_key_file=Path(p["api_key_file"]) if p["api_key_file"] else None)
    HeaderDeadline.timeout = policy.header_timeout
    app = create_app(s["run"], max_body=s["max_body"], device=s["device"], policy=policy,
                     log_format=s["log_format"])
    app.state.serving, app.state.workers = True, s["workers"]
    return app


def _serve_workers(run_dir: str | Path, host: str, port: int, workers: int, *, max_body: int, device: str,
                   policy: Policy, quiet: bool, log_format: str, ready: Callable[[str], None]) -> None:
    """`workers` processes on one port, started by uvicorn's process manager. The run is loaded here once first,
    so that a run that cannot be served is one sentence, not a traceback from every worker; the metrics of all
    workers meet in a temporary folder (metrics.py)."""
    import tempfile

    from uvicorn.supervisors import Multiprocess

    load(run_dir, device)
    gc.collect()
    sock = listen(host, port)
    settings = {"run": str(run_dir), "max_body": max_body, "device": device, "log_format": log_format,
                "workers": workers,
                "policy": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(policy).items()}}
    with tempfile.TemporaryDirectory(prefix="fmnist-metrics-") as shared:
        os.environ[SETTINGS_ENV] = json.dumps(settings)  # the workers' environment: private to this user
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
        config = uvicorn.Config("fmnist.serve:app_from_env", factory=True, workers=workers, http=HeaderDeadline,
                                limit_concurrency=MAX_CONNECTIONS, log_level="warning" if quiet else "info",
                                access_log=not quiet and log_format == "text")
        h, p = sock.getsockname()[:2]
        url = f"http://{f'[{h}]' if ':' in h else h}:{p}/"
        keyed = " needs the API key;" if Keys(policy.api_keys, policy.api_key_file).required else ""
        # The socket listens already: a client that connects now waits in its backlog until a worker accepts.
        ready(f"serving {run_dir} at {url} with {workers} worker processes (API docs at {url}docs;{keyed} "
              "Ctrl-C stops)")
        try:
            Multiprocess(config, sockets=[sock]).run()
        finally:
            sock.close()
