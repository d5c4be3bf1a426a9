"""The web service and its page: try a model in the browser, and watch what its neurons learned.

    app = create_app("runs/default")   # a FastAPI app, for any ASGI server (tests start it on any port)
    serve("runs/default", "127.0.0.1", 8000, ready=print)   # what `fmnist serve RUN_DIR` runs

Endpoints: POST /predict (multipart, field `file`, one or several images),
POST /predict/pixels (a 28x28 JSON array, what the page's drawing canvas sends),
GET /health, GET /limits, GET /model, GET /history, GET /neurons,
GET /neurons/{k}, GET /examples (the product photos shipped in static/examples/,
which the page offers to click), the OpenAPI docs at /docs, and the page at /
(plain HTML, CSS and JavaScript in static/, nothing fetched from elsewhere,
every URL relative).

In FastAPI's own shape: the app's lifespan loads the run once (`load`: the
Predictor over best.pt, the first layer's pictures, the tracked neurons, the
summary) and starts the batcher; the routes live on `router` and receive what
they share through dependencies (`get_served`, `get_batcher`), which tests may
replace with `app.dependency_overrides`. `serve` holds the serving policy.

Requests that arrive together are classified as one batch: a single task feeds
the model, and every request waiting when it is free joins the next call.
Decoding runs in worker threads, so a large upload never holds up /health. A
body over the limit is refused with 413 as soon as its declared length, or the
bytes received, pass the limit (FastAPI's own max_body_size). Nothing a client
sends names a file on the server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import io
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from . import __version__, predict, preprocess
from .errors import ConfigError, ImageError, RunError

MAX_BODY = 10 * 2**20  # bytes: the default limit on a request body (10 MiB)
INLINE_BYTES = 32 * 2**10  # uploads up to this size are decoded on the event loop (about 0.2 ms for a 28x28 PNG)
TOP_K = 3  # classes in an answer unless the request asks for another number
TOP_K_MAX = 10  # every class of Fashion-MNIST
STATIC = Path(__file__).parent / "static"
EXAMPLES = STATIC / "examples"  # product photos to try, one per class: served as static/examples/<file>


class Batcher:
    """One task feeds the model; the requests waiting when it is free go in together as one batch."""

    def __init__(self, predictor: predict.Predictor, max_batch: int = 1024):
        self.predictor, self.max_batch = predictor, max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.calls = self.images = 0  # model calls and images so far: images / calls is the mean batch

    async def run(self) -> None:
        while True:
            waiting = [await self.queue.get()]
            size = len(waiting[0][0])
            while not self.queue.empty() and size < self.max_batch:
                waiting.append(self.queue.get_nowait())
                size += len(waiting[-1][0])
            x = np.concatenate([pixels for pixels, _ in waiting])
            try:
                probs, scores = await asyncio.to_thread(self.predictor.outputs, x)
            except Exception as e:  # a bug: every waiting request gets it as a 500
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.calls += 1
            self.images += len(x)
            start = 0
            for pixels, future in waiting:
                if not future.done():  # its client may have gone
                    part = slice(start, start + len(pixels))
                    future.set_result((probs[part], None if scores is None else scores[part]))
                start += len(pixels)

    async def outputs(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated probabilities, out-of-distribution scores or None) of these images, as Predictor.outputs."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((pixels, future))
        return await future


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

    @property
    def default_neuron(self) -> int:
        """The neuron the page opens at: 50 (the course project's) when tracked, else the first tracked."""
        if self.tracked:
            return 50 if 50 in self.tracked else min(self.tracked)
        return 50 if len(self.pictures) >= 50 else 1


def load(run_dir: str | Path, device: str = "cpu") -> Served:
    """Read a run directory for serving: best.pt once, through its Predictor. One sentence if it cannot be."""
    from . import models, runs

    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise RunError(f"{run_dir} is a file: fmnist serve takes a run directory (its best.pt, history and "
                       "neurons).")
    predictor = predict.Predictor(run_dir, device=device, batch_size=1024)
    try:
        tracked = runs.read_neurons(run_dir)
    except RunError:  # trained without --track-neurons: the final weights are still there
        tracked = {}
    return Served(run_dir=run_dir, predictor=predictor, epoch=predictor.info["epoch"],
                  summary=predictor.info.get("summary", {}),
                  pictures=models.first_layer_pictures(predictor.model).numpy(), tracked=tracked,
                  parameters=models.count_parameters(predictor.model), conv=models.is_conv(predictor.model))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the run and start the batcher when the app starts; stop the batcher when it stops."""
    served = load(app.state.run_dir, app.state.device)
    batcher = Batcher(served.predictor)
    task = asyncio.create_task(batcher.run())
    app.state.served, app.state.batcher = served, batcher
    try:
        yield
    finally:
        task.cancel()


def get_served(request: Request) -> Served:
    return request.app.state.served


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


ServedDep = Annotated[Served, Depends(get_served)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]


# ---------------------------------------------------------------- the routes

router = APIRouter()


class Pixels(BaseModel):
    pixels: list[list[float]] = Field(description="28 rows of 28 values from 0 to 255: a light drawing on black, "
                                                  "as a Fashion-MNIST image")


TopK = Annotated[int, Query(ge=1, le=TOP_K_MAX, description="classes per image")]
WithInput = Annotated[bool, Query(description="add the 28x28 input the model saw, as a PNG data URL")]


def _data_url(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _prepare_uploads(uploads: list[tuple[str, bytes]]) -> list[tuple[np.ndarray, str]]:
    """Decode and preprocess (in a worker thread); HTTPException 400 names the first file that is not an image."""
    out = []
    for name, raw in uploads:
        try:
            out.append(preprocess.prepare(raw))
        except ImageError as e:
            raise HTTPException(400, f"{name or 'the upload'}: {e}") from None
    return out


async def _classify(served: Served, batcher: Batcher, prepared: list[tuple[np.ndarray, str]],
                    names: list[str | None], top_k: int, with_input: bool) -> list[dict[str, Any]]:
    probs, scores = await batcher.outputs(np.stack([p for p, _ in prepared]))
    records = []
    for i, (name, (pixels, chosen)) in enumerate(zip(names, prepared)):
        score = None if scores is None else scores[i]
        rec = {"file": name, **served.predictor.record(probs[i], top_k, score), "preprocess": chosen}
        if with_input:
            rec["input"] = _data_url(pixels)
        records.append(rec)
    return records


@router.post("/predict", summary="Classify one or several uploaded images")
async def predict_files(served: ServedDep, batcher: BatcherDep,
                        file: list[UploadFile] = File(description="image files: PNG, JPEG, WebP, BMP, TIFF, GIF"),
                        top_k: TopK = TOP_K, input: WithInput = False):
    uploads = [(f.filename, await f.read()) for f in file]
    if sum(len(raw) for _, raw in uploads) <= INLINE_BYTES:
        prepared = _prepare_uploads(uploads)  # small: decoding takes less than handing it to a thread
    else:  # large: in a worker thread, so that the server goes on answering meanwhile
        prepared = await run_in_threadpool(_prepare_uploads, uploads)
    records = await _classify(served, batcher, prepared, [f.filename for f in file], top_k, input)
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


@router.get("/health", summary="Whether the service answers, and with which model")
async def health(served: ServedDep, batcher: BatcherDep):
    return {"status": "ok", "model": served.run_dir.name, "backend": served.predictor.backend,
            "model_calls": batcher.calls, "images": batcher.images}


@router.get("/limits", summary="What the API accepts: the largest request body, and classes per answer")
async def limits(request: Request):
    return {"max_body_bytes": request.app.state.max_body, "top_k": {"min": 1, "max": TOP_K_MAX, "default": TOP_K}}


@router.get("/model", summary="The run's configuration, size and accuracy")
async def model_info(served: ServedDep):
    info = served.predictor.info
    return {"name": served.run_dir.name, "model": info["model"], "config": info["config"],
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
    from . import runs

    try:
        return runs.read_history(served.run_dir)
    except RunError as e:
        raise HTTPException(404, str(e)) from None


@router.get("/neurons", summary="The first layer's neurons: how many, which were tracked every epoch, "
                                "which the page opens at")
async def neurons(served: ServedDep):
    frames = max((len(a) for a in served.tracked.values()), default=1)
    return {"count": len(served.pictures), "shape": list(served.pictures.shape[1:]), "tracked": sorted(served.tracked),
            "epochs": frames - 1, "conv": served.conv, "default": served.default_neuron}


@router.get("/neurons/{k}", summary="A first-layer neuron's incoming weights: every epoch if tracked, else final")
async def neuron(served: ServedDep, k: int = PathParam(ge=1, description="1-based, as --track-neurons")):
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


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html")


def create_app(run_dir: str | Path, max_body: int = MAX_BODY, device: str = "cpu") -> FastAPI:
    """The app for one run directory (its best.pt, history.jsonl, neurons.npz and summary.json), read when the
    app starts."""
    run_dir = Path(run_dir)
    app = FastAPI(title="fmnist", version=__version__, lifespan=lifespan, max_body_size=max_body,
                  description=f"Fashion-MNIST classifier from the run `{run_dir.name}` (GET /model says which). "
                              f"Request bodies over {max_body:,} bytes are refused with 413.")
    app.state.run_dir, app.state.device, app.state.max_body = run_dir, device, max_body
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---------------------------------------------------------------- serving policy

def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), bound here so that a port in use is one sentence and port 0 can say
    which port it got."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host} port {port}: {e.strerror or e}; "
                          "choose another --port or --host.") from None
    except UnicodeError:
        sock.close()
        raise ConfigError(f"--host {host} is not a host name or address.") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with the app's lifespan entered around it, before the port is bound: a run that cannot
    be loaded is one sentence (uvicorn's own lifespan handling logs it as a traceback), and the address is
    announced only once the model answers."""

    def __init__(self, config: uvicorn.Config, host: str, port: int, ready: Callable[[str], None]):
        super().__init__(config)
        self.host, self.port, self.ready = host, port, ready

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        import torch

        app = self.config.app
        async with app.router.lifespan_context(app):
            sock = listen(self.host, self.port)
            # One thread for the model: the batches are small, and a second thread only fights the event loop for
            # the other core (on the 2-core VM: 750 requests/s against 620, p99 130 ms against 160, with wrk at
            # 32 clients).
            torch.set_num_threads(1)
            gc.collect()
            # The model, torch and FastAPI are loaded for good: later collections need not walk them again
            # (with wrk at 32 clients on the 2-core VM, p99 latency 62 ms against 174 ms without).
            gc.freeze()
            host, port = sock.getsockname()[:2]
            url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
            self.ready(f"serving {app.state.run_dir} at {url} (API docs at {url}docs; Ctrl-C stops)")
            await super().serve(sockets=[sock])


def serve(run_dir: str | Path, host: str, port: int, *, max_body: int = MAX_BODY, device: str = "cpu",
          quiet: bool = False, ready: Callable[[str], None] = lambda line: None) -> None:
    """Serve a run until Ctrl-C. `ready` receives one line, with the address, once the model is loaded and the
    port bound (port 0: any free port). Every problem the caller can cause is a ConfigError, RunError or
    PredictError, raised before anything is served."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port: choose 0 to 65535 (0: any free port).")
    if max_body <= 0:
        raise ConfigError("the body limit (--max-body-mb) must be more than 0.")
    app = create_app(run_dir, max_body=max_body, device=device)
    config = uvicorn.Config(app, lifespan="off",  # _Server enters the lifespan itself
                            log_level="warning" if quiet else "info", access_log=not quiet)
    _Server(config, host, port, ready).run()
