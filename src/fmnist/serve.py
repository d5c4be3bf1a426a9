"""The web service and its page: try a model in the browser, and watch what its neurons learned.

    app = create_app("runs/default")   # a FastAPI app; `fmnist serve RUN_DIR` runs it with uvicorn

Endpoints: POST /predict (multipart, field `file`, one or several images),
POST /predict/pixels (a 28x28 JSON array, what the page's drawing canvas sends),
GET /health, GET /model, GET /history, GET /neurons, GET /neurons/{k}, the
OpenAPI docs at /docs, and the page at / (plain HTML, CSS and JavaScript in
static/, nothing fetched from elsewhere).

The model is loaded once. Requests that arrive together are classified as one
batch: a single task feeds the model, and every request waiting when it is
free joins the next call. Decoding runs in worker threads, so a large upload
never holds up /health. A body over the limit is refused with 413 as soon as
its declared length, or the bytes received, pass the limit (FastAPI's own
max_body_size). Nothing a client sends names a file on the server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from . import __version__, predict

MAX_BODY = 10 * 2**20  # bytes: the default limit on a request body (10 MiB)
INLINE_BYTES = 32 * 2**10  # uploads up to this size are decoded on the event loop (about 0.2 ms for a 28x28 PNG)
STATIC = Path(__file__).parent / "static"


class Batcher:
    """One task feeds the model; the requests waiting when it is free go in together as one batch."""

    def __init__(self, predictor: predict.Predictor, max_batch: int = 1024):
        self.predictor, self.max_batch = predictor, max_batch
        self.queue: asyncio.Queue | None = None
        self.calls = self.images = 0  # model calls and images so far: images / calls is the mean batch

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        while True:
            waiting = [await self.queue.get()]
            size = len(waiting[0][0])
            while not self.queue.empty() and size < self.max_batch:
                waiting.append(self.queue.get_nowait())
                size += len(waiting[-1][0])
            x = np.concatenate([pixels for pixels, _ in waiting])
            try:
                probs = await asyncio.to_thread(self.predictor.probabilities, x)
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
                    future.set_result(probs[start:start + len(pixels)])
                start += len(pixels)

    async def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((pixels, future))
        return await future


class Pixels(BaseModel):
    pixels: list[list[float]] = Field(description="28 rows of 28 values from 0 to 255: a light drawing on black, "
                                                  "as a Fashion-MNIST image")


def _data_url(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _prepare_uploads(uploads: list[tuple[str, bytes]]) -> list[tuple[np.ndarray, str]]:
    """Decode and preprocess (in a worker thread); HTTPException 400 names the first file that is not an image."""
    out = []
    for name, raw in uploads:
        try:
            out.append(predict.prepare(raw))
        except predict.ImageError as e:
            raise HTTPException(400, f"{name or 'the upload'}: {e}") from None
    return out


def create_app(run_dir: str | Path, max_body: int = MAX_BODY, device: str = "cpu") -> FastAPI:
    """The app for one run directory (its best.pt, history.jsonl, neurons.npz and summary.json)."""
    from . import models, runs

    run_dir = Path(run_dir)
    predictor = predict.Predictor(run_dir, device=device, batch_size=1024)
    model, epoch = predictor.model, predictor.info["epoch"]  # best.pt, read once
    final = models.first_layer_pictures(model).numpy()  # (units, h, w): every first-layer neuron at best.pt
    summary = predictor.info.get("summary", {})
    batcher = Batcher(predictor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="fmnist", version=__version__, lifespan=lifespan, max_body_size=max_body,
                  description=f"Fashion-MNIST classifier from the run `{run_dir.name}` "
                              f"({predictor.info['model']}). Request "
                              f"bodies over {max_body:,} bytes are refused with 413.")

    async def classify(prepared: list[tuple[np.ndarray, str]], names: list[str | None], top_k: int,
                       with_input: bool) -> list[dict[str, Any]]:
        probs = await batcher.probabilities(np.stack([p for p, _ in prepared]))
        records = []
        for name, (pixels, chosen), p in zip(names, prepared, probs):
            rec = {"file": name, **predictor.record(p, top_k), "preprocess": chosen}
            if with_input:
                rec["input"] = _data_url(pixels)
            records.append(rec)
        return records

    @app.post("/predict", summary="Classify one or several uploaded images")
    async def predict_files(file: list[UploadFile] = File(description="image files: PNG, JPEG, WebP, BMP, TIFF, GIF"),
                            top_k: int = Query(3, ge=1, le=10, description="classes per image"),
                            input: bool = Query(False, description="add the 28x28 input the model saw, as a PNG "
                                                                   "data URL")):
        uploads = [(f.filename, await f.read()) for f in file]
        if sum(len(raw) for _, raw in uploads) <= INLINE_BYTES:
            prepared = _prepare_uploads(uploads)  # small: decoding takes less than handing it to a thread
        else:  # large: in a worker thread, so that the server goes on answering meanwhile
            prepared = await run_in_threadpool(_prepare_uploads, uploads)
        records = await classify(prepared, [f.filename for f in file], top_k, input)
        return records[0] if len(records) == 1 else records

    @app.post("/predict/pixels", summary="Classify a 28x28 drawing")
    async def predict_pixels(body: Pixels, top_k: int = Query(3, ge=1, le=10), input: bool = Query(False)):
        a = np.asarray(body.pixels, dtype=np.float64) if all(len(r) == 28 for r in body.pixels) else None
        if a is None or a.shape != (28, 28):
            raise HTTPException(422, "pixels must be 28 rows of 28 values")
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
            raise HTTPException(422, "pixels must be numbers from 0 to 255")
        pixels = a.round().astype(np.uint8)
        return (await classify([(pixels, "dataset")], [None], top_k, input))[0]

    @app.get("/health", summary="Whether the service answers, and with which model")
    async def health():
        return {"status": "ok", "model": run_dir.name, "backend": predictor.backend,
                "model_calls": batcher.calls, "images": batcher.images}

    @app.get("/model", summary="The run's configuration, size and accuracy")
    async def model_info():
        return {"name": run_dir.name, "model": predictor.info["model"], "config": predictor.info["config"],
                "parameters": models.count_parameters(model), "epoch": epoch,
                "validation_accuracy": summary.get("best_val_accuracy"),
                "test_accuracy": summary.get("test_accuracy"), "classes": list(predictor.classes)}

    @app.get("/history", summary="One row per epoch: loss, accuracy, learning rate")
    async def history():
        try:
            return runs.read_history(run_dir)
        except runs.RunError as e:
            raise HTTPException(404, str(e)) from None

    try:
        tracked = runs.read_neurons(run_dir)
    except runs.RunError:
        tracked = {}

    @app.get("/neurons", summary="The first layer's neurons: how many, which were tracked every epoch")
    async def neurons():
        frames = max((len(a) for a in tracked.values()), default=1)
        return {"count": len(final), "shape": list(final.shape[1:]), "tracked": sorted(tracked),
                "epochs": frames - 1, "conv": models.is_conv(model),
                "default": 50 if 50 in tracked else min(tracked) if tracked else 50 if len(final) >= 50 else 1}

    @app.get("/neurons/{k}", summary="A first-layer neuron's incoming weights: every epoch if tracked, else final")
    async def neuron(k: int = PathParam(ge=1, description="1-based, as --track-neurons")):
        if k > len(final):
            raise HTTPException(404, f"the first layer has neurons 1..{len(final)}")
        if k in tracked:
            frames = tracked[k]
            labels = [f"epoch {e}" for e in range(len(frames))]
        else:
            frames = final[k - 1][None]
            labels = [f"best.pt (epoch {epoch}); train with --track-neurons {k} to follow it"]
        scale = float(np.abs(frames).max()) or 1.0  # one colour scale across the epochs, as neuron_<k>.png
        return {"neuron": k, "labels": labels, "scale": scale,
                "frames": np.round(frames, 6).tolist()}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    return app
