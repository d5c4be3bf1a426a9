"""Classify the images people bring with a trained or exported model.

    p = Predictor("runs/mlp-s0")              # a run directory, a .pt checkpoint, model.onnx or a TorchScript file
    p.predict(["shoe.jpg", pil_image, array])  # -> [{"file": ..., "label": "Sneaker", "probability": 0.93,
                                               #      "unsure": False, "ood_score": -2.1, ...}]

The probabilities are calibrated (the run's temperature) and every record
says whether the image looks like a Fashion-MNIST product at all: "unsure"
is true when its out-of-distribution score ("ood_score", higher = less like
the dataset) is above the run's threshold (calibrate.py; both are in best.pt
and in an exported model, whose second output is the score).

Each image becomes the model's 28x28 input in preprocess.py; export.py writes
the ONNX and TorchScript files this module reads. This module imports neither
torch nor fmnist's training code at start-up: `fmnist predict model.onnx`
needs numpy, Pillow and onnxruntime only.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ImageError, PredictError
from .preprocess import (  # noqa: F401 (dataset_like, looks_like_dataset, photo: callers that know them here)
    MAX_PIXELS,
    PREPROCESS,
    SIZE,
    _why,
    dataset_like,
    looks_like_dataset,
    open_image,
    photo,
    prepare,
)

__all__ = ["ImageError", "PredictError", "Predictor", "find_images", "open_image", "overview", "prepare"]

MAX_BYTES = 64 * 2**20  # the most read from standard input
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # what a directory search takes
OVERVIEW = 24  # images in --save-inputs' overview.png
PARALLEL_FROM = 64  # files: below this, starting worker processes costs more than it saves


def _ignore_interrupts() -> None:
    """In a worker: Ctrl-C is the parent's to handle (it stops the pool), not a traceback per worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_quietly(job: tuple[Any, str, int]) -> tuple[bytes | None, str | None]:
    """prepare() in a worker process: (28x28 bytes, chosen) or (None, the error's sentence)."""
    source, preprocess, max_pixels = job
    try:
        pixels, chosen = prepare(source, preprocess, max_pixels)
        return pixels.tobytes(), chosen
    except ImageError as e:
        return None, str(e)


# ---------------------------------------------------------------- finding the inputs

def find_images(paths: Iterable[str | Path]) -> tuple[list[str], int]:
    """Named files as given (each is tried), directories searched recursively for image files, sorted.

    Returns the inputs and how many files in the directories were passed over (hidden, or not named as an image).
    The search is a loop, not a recursion: a folder thousands of levels deep is searched like any other.
    """
    found: list[str] = []
    skipped = 0
    for p in paths:
        p = os.fspath(p)
        if p != "-" and os.path.isdir(p):
            inside = []
            stack = [p]
            while stack:
                folder = stack.pop()
                try:
                    entries = list(os.scandir(folder))
                except OSError:  # unreadable or gone: os.walk passed over these too
                    continue
                for e in entries:
                    if e.name.startswith("."):
                        skipped += not _is_dir(e)
                    elif _is_dir(e):
                        if not e.is_symlink():  # as os.walk: a link to a folder is not followed
                            stack.append(e.path)
                    elif e.name.lower().endswith(IMAGE_SUFFIXES):
                        inside.append(e.path)  # a FIFO or device among them is refused as the file's own error
                    else:
                        skipped += 1
            found += sorted(inside)
        else:
            found.append(p)
    return found, skipped


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def display_name(name: str | bytes) -> str:
    """A file name as text that any output takes: bytes that are not UTF-8 (kept by Python as lone surrogates,
    which no encoder writes and no JSON reader takes) become backslash escapes such as \\xff."""
    if isinstance(name, bytes):
        return name.decode("utf-8", "backslashreplace")
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _has_surrogates(name) \
        else name


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- the model

class Predictor:
    """A model that classifies images: PyTorch (a run or a checkpoint), onnxruntime (.onnx) or TorchScript.

    Every backend takes (N, 28, 28) float32 pixels from 0 to 255 (light object on black) and gives
    (N, 10) calibrated probabilities and (N,) out-of-distribution scores (models.PixelClassifier): the
    normalisation, temperature and score are part of the model. `threshold`: scores above it are unsure (None:
    a run trained before fmnist calibrated, or an export made then: never unsure).
    """

    def __init__(self, model: Any, device: str = "cpu", batch_size: int = 256, kind: str | None = None):
        """`model`: a run directory, a .pt checkpoint, a .onnx or .torchscript file, or an nn.Module.
        `kind` ("checkpoint", "onnx", "torchscript") overrides what the file name says."""
        if not 1 <= batch_size <= 65536:
            raise PredictError(f"--batch-size {batch_size} is out of range: choose 1 to 65,536.")
        self.batch_size = batch_size
        self.info: dict[str, Any] = {}  # what the model says of itself: its run's config and figures
        self.threshold: float | None = None  # OOD scores above it are unsure; None: no decision
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.exists():
                raise PredictError(f"{path} does not exist: give a run directory, a .pt checkpoint, "
                                   "a model.onnx or a TorchScript file.")
            self.source = str(path)
            kind = kind or {".onnx": "onnx", ".torchscript": "torchscript"}.get(path.suffix, "checkpoint")
            if kind == "onnx":
                self._load_onnx(path)
            elif kind == "torchscript":
                self._load_torchscript(path)
            else:
                self._load_checkpoint(path, device)
        else:  # an nn.Module taking normalised (N, 1, 28, 28) images, as fmnist's models do
            from . import data

            self.source = type(model).__name__
            self._use_module(model, data.CLASSES, device)
            self.backend = "pytorch"

    # -- loading

    def _load_checkpoint(self, path: Path, device: str) -> None:
        from . import data, devices, runs

        model, cfg, ckpt = runs.load_model(path)
        cal = runs.load_calibration(ckpt, path)
        self._use_module(model, data.CLASSES, devices.pick_device(device), cal.inference_views(cfg), cal)
        try:  # the statistics must fit the network's features (a best.pt put together by hand might not)
            self._run_torch(np.zeros((1, SIZE, SIZE), np.float32))
        except RuntimeError:
            raise PredictError(f"{path}: its calibration does not fit its model; train the run again.") from None
        self.threshold = cal.threshold
        if cfg.channels_last:  # as it was trained: cnn-fast with TTA, batch 1024, 775 -> 2,242 images/s on 2 cores
            self._module = self._module.to(memory_format=self._torch.channels_last)
            if self._photo is not None:
                self._photo = self._photo.to(memory_format=self._torch.channels_last)
        self.backend = "pytorch"
        self.info = {"model": cfg.model, "config": dataclasses.asdict(cfg), "epoch": ckpt["epoch"],
                     "calibration": cal.summary()}
        self.model = model  # the bare network (normalised images in, logits out), for who needs its layers
        summary = run_summary(path if path.is_dir() else path.parent)
        if summary is not None:
            self.info["summary"] = summary

    def _use_module(self, model, classes, device, tta: str = "", calibration=None) -> None:
        import torch

        from . import models

        device = torch.device(device)
        self.classes = tuple(classes)
        self._torch = torch
        self._device = device
        self._module = models.PixelClassifier(model, tta, calibration).to(device).eval()
        # inputs made from photos: their own views and temperature where the calibration has them
        self._photo = (models.PixelClassifier(model, tta, calibration, photo=True).to(device).eval()
                       if calibration is not None and calibration.photo_views else None)
        self._run = self._run_torch

    def _load_onnx(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise PredictError(f"reading {path} needs onnxruntime: pip install 'fmnist[onnx]'.") from None
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise PredictError(f"{path} is not an ONNX model onnxruntime can load"
                               f"{_why(e, '')}.") from None
        meta = session.get_modelmeta().custom_metadata_map
        ins, outs = session.get_inputs(), session.get_outputs()
        if (len(ins) != 1 or list(ins[0].shape[1:]) != [SIZE, SIZE] or len(outs) not in (1, 2)
                or "classes" not in meta):
            raise PredictError(f"{path} was not exported by fmnist (it must take (N, 28, 28) pixels, give "
                               "(N, classes) probabilities and name its classes): export one with fmnist export.")
        self.classes = self._classes(meta["classes"], path)
        self.info = self._info(meta.get("fmnist", "{}"), path)
        self._session, self._input = session, ins[0].name
        self.backend = "onnxruntime"
        # fmnist's exports since calibration give (probabilities, ood_score); earlier ones probabilities only
        self._run = lambda x: (*self._session.run(None, {self._input: x}), None)[:2]
        self._check_outputs(path, ins[0].type)

    def _check_outputs(self, path: Path, input_type: str) -> None:
        """One image through a loaded export, at load: a file that takes other numbers or gives other shapes
        than fmnist's is refused here in one sentence, not at the first image with a traceback."""
        if input_type != "tensor(float)":
            raise PredictError(f"{path} takes {input_type.removeprefix('tensor(').rstrip(')')} pixels, not float32 "
                               "as fmnist's exports do: export it again with fmnist export.")
        try:
            probs, scores = self._run(np.zeros((2, SIZE, SIZE), np.float32))
        except Exception as e:
            raise PredictError(f"{path} fails on a blank image{_why(e, '')}: export it again with fmnist "
                               "export.") from None
        probs = np.asarray(probs)
        if probs.shape != (2, len(self.classes)):
            raise PredictError(f"{path} gives outputs of shape {tuple(probs.shape)} for 2 images where its "
                               f"{len(self.classes)} classes need (2, {len(self.classes)}): export it again "
                               "with fmnist export.")
        if scores is not None and np.asarray(scores).size != 2:
            raise PredictError(f"{path} gives out-of-distribution scores of shape {tuple(np.asarray(scores).shape)} "
                               "for 2 images: export it again with fmnist export.")

    def _load_torchscript(self, path: Path) -> None:
        import torch

        extra = {"classes.json": "", "fmnist.json": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as e:
            raise PredictError(f"{path} is not a TorchScript model torch can load{_why(e, '')}.") from None
        if not extra["classes.json"]:
            raise PredictError(f"{path} was not exported by fmnist (it names no classes): export one with "
                               "fmnist export --format torchscript.")
        self.classes = self._classes(extra["classes.json"], path)
        self.info = self._info(extra["fmnist.json"] or "{}", path)
        self._torch, self._device, self._module = torch, torch.device("cpu"), module.eval()
        self.backend = "torchscript"
        self._run = self._run_torch

    @staticmethod
    def _classes(text: str | bytes, path: Path) -> tuple[str, ...]:
        try:
            classes = json.loads(text)
        except ValueError:
            classes = None
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise PredictError(f"{path} names its classes in a form fmnist cannot read: export it again.")
        return tuple(classes)

    def _info(self, text: str | bytes, path: Path) -> dict[str, Any]:
        """An export's own description (its run's config, figures and calibration); sets the threshold from it."""
        try:
            info = json.loads(text)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise PredictError(f"{path} describes itself in a form fmnist cannot read: export it again.")
        threshold = (info.get("calibration") or {}).get("ood_threshold")
        if threshold is not None and not (isinstance(threshold, (int, float)) and np.isfinite(threshold)):
            raise PredictError(f"{path} holds an out-of-distribution threshold that is not a number: export it "
                               "again.")
        self.threshold = None if threshold is None else float(threshold)
        return info

    def _run_torch(self, x: np.ndarray, of_photos: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self._torch
        module = self._photo if of_photos and self._photo is not None else self._module
        with torch.inference_mode():
            out = module(torch.from_numpy(x).to(self._device))
        probs, scores = out if isinstance(out, (tuple, list)) else (out, None)  # a TorchScript file from before
        return probs.float().cpu().numpy(), None if scores is None else scores.float().cpu().numpy()

    @property
    def pixel_classifier(self) -> Any:
        """The models.PixelClassifier this predictor runs (pixels 0-255 in; its `logits` are what explain.py
        attributes), or None for an exported model (ONNX, TorchScript), which keeps no logits to differentiate."""
        return self._module if self.backend == "pytorch" else None

    # -- classifying

    @property
    def photo_classifier(self) -> Any:
        """The models.PixelClassifier of inputs made from photos (their own views and temperature), or None where
        they are answered as any other input: a run without photo views, an exported model."""
        return self._photo if self.backend == "pytorch" else None

    def outputs(self, pixels: np.ndarray, photos: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 28, 28) values 0-255 -> ((N, classes) calibrated probabilities, (N,) OOD scores), in batches of
        self.batch_size. The scores are None for a model exported before fmnist calibrated. `photos`: (N,) bool,
        the inputs preprocess made from photos (answered by photo_classifier where there is one)."""
        x = np.asarray(pixels, dtype=np.float32).reshape(-1, SIZE, SIZE)
        if photos is None or self.photo_classifier is None or not np.any(photos):
            return self._outputs(x, False)
        order = np.argsort(np.asarray(photos, bool).reshape(-1), kind="stable")  # the other inputs, then the photos
        others = len(x) - int(np.count_nonzero(photos))
        (probs, scores), (p_probs, p_scores) = (self._outputs(x[order[:others]], False),
                                                self._outputs(x[order[others:]], True))
        back = np.argsort(order)  # each input's row in the two parts, in the order it came
        return np.concatenate([probs, p_probs])[back], np.concatenate([scores, p_scores])[back]

    def _outputs(self, x: np.ndarray, of_photos: bool) -> tuple[np.ndarray, np.ndarray | None]:
        run = (lambda b: self._run_torch(b, True)) if of_photos else self._run
        parts = [run(np.ascontiguousarray(x[i:i + self.batch_size])) for i in range(0, len(x), self.batch_size)]
        if not parts:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros(0, np.float32)
        probs = np.concatenate([p for p, _ in parts])
        scores = None if parts[0][1] is None else np.concatenate([s for _, s in parts]).reshape(-1)
        return probs, scores

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 28, 28) values 0-255 -> (N, classes) calibrated probabilities (outputs() without the scores)."""
        return self.outputs(pixels)[0]

    def record(self, probs: np.ndarray, top_k: int = 3, ood_score: float | None = None) -> dict[str, Any]:
        """One image's probabilities and OOD score -> {"label", "index", "probability", "top": [...] (top_k
        classes), "unsure", "ood_score"}.

        "unsure": the score is above the run's threshold (the image does not look like a Fashion-MNIST product);
        False where the model has no threshold (a run from before calibration), None where the caller gave no
        score to a model that has one.
        """
        shown = np.round(probs.astype(np.float64), 6)  # ordered as shown: ties (0.0) by class, whatever the batch
        order = np.argsort(-shown, kind="stable")[:top_k]
        best = int(order[0])
        score = None if ood_score is None or not np.isfinite(ood_score) else float(ood_score)
        if self.threshold is None:
            unsure: bool | None = False
        else:
            unsure = None if score is None else score > self.threshold
        return {"label": self.classes[best], "index": best, "probability": float(shown[best]),
                "top": [{"label": self.classes[i], "probability": float(shown[i])} for i in order],
                "unsure": unsure, "ood_score": None if score is None else round(score, 4)}

    def predict(self, items: Iterable[Any], top_k: int = 3, preprocess: str = "auto",
                save_inputs: str | Path | None = None, workers: int | None = None,
                max_pixels: int = MAX_PIXELS) -> list[dict[str, Any]]:
        """Classify paths, bytes, PIL images and arrays; one record per item, in order. An image of more than
        max_pixels is refused from its header (preprocess.open_image).

        A record is {"file", "label", "index", "probability", "top", "preprocess"} (plus "input", the
        28x28 PNG written, with save_inputs), or {"file", "error"} for an item that is not a usable image.
        """
        return list(self.iter_predict(items, top_k, preprocess, save_inputs, workers, max_pixels))

    def iter_predict(self, items: Iterable[Any], top_k: int = 3, preprocess: str = "auto",
                     save_inputs: str | Path | None = None, workers: int | None = None,
                     max_pixels: int = MAX_PIXELS) -> Iterator[dict[str, Any]]:
        """predict(), one record at a time, as each batch is classified. Paths are decoded on all cores."""
        if not 1 <= top_k <= len(self.classes):
            raise PredictError(f"--top-k {top_k} is out of range: choose 1 to {len(self.classes)}.")
        if preprocess not in PREPROCESS:
            raise PredictError(f"unknown preprocessing '{preprocess}'; choose one of {', '.join(PREPROCESS)}.")
        items = list(items)
        out_dir = _inputs_dir(save_inputs) if save_inputs is not None else None
        prepared = _prepare_all(items, preprocess, workers, max_pixels)
        batch: list[tuple[int, Any, np.ndarray, str]] = []
        shown: list[tuple[Any, np.ndarray, dict]] = []  # the first OVERVIEW classified, for overview.png
        for i, (item, (pixels, chosen)) in enumerate(zip(items, prepared)):
            if pixels is None:
                yield from self._flush(batch, top_k, out_dir, len(items), shown)
                batch = []
                yield {"file": _name(item), "error": chosen}
                continue
            batch.append((i, item, pixels, chosen))
            if len(batch) == self.batch_size:
                yield from self._flush(batch, top_k, out_dir, len(items), shown)
                batch = []
        yield from self._flush(batch, top_k, out_dir, len(items), shown)
        if out_dir is not None and shown:
            overview(shown, out_dir / "overview.png")

    def _flush(self, batch, top_k, out_dir, total, shown) -> Iterator[dict[str, Any]]:
        if not batch:
            return
        probs, scores = self.outputs(np.stack([b[2] for b in batch]), np.array([b[3] == "photo" for b in batch]))
        scores = [None] * len(batch) if scores is None else scores
        for (i, item, pixels, chosen), p, score in zip(batch, probs, scores):
            rec = {"file": _name(item), **self.record(p, top_k, score), "preprocess": chosen}
            if out_dir is not None:
                rec["input"] = str(_save_input(out_dir, i, item, pixels, total))
                if len(shown) < OVERVIEW:
                    shown.append((item, pixels, rec))
            yield rec


def overview(shown: list[tuple[Any, np.ndarray, dict]], path: Path, cell: int = 112, cols: int = 4) -> Path:
    """A PNG of each image beside the 28x28 input it became (shown 4x, pixel for pixel), with its class (or "not a
    product?" where the record is unsure)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    gap, text = 10, 34
    rows = -(-len(shown) // cols)
    sheet = Image.new("RGB", (cols * (2 * cell + 3 * gap), rows * (cell + text + gap) + gap), (236, 236, 236))
    draw = ImageDraw.Draw(sheet)
    for k, (item, pixels, rec) in enumerate(shown):
        r, c = divmod(k, cols)
        x, y = c * (2 * cell + 3 * gap) + gap, r * (cell + text + gap) + gap
        try:
            original = open_image(_read_stdin() if isinstance(item, str) and item == "-" else item)
        except ImageError:  # changed since it was classified: leave its place empty
            original = Image.new("RGB", (1, 1), (236, 236, 236))
        original = original.convert("RGB")
        original.thumbnail((cell, cell))
        sheet.paste(original, (x + (cell - original.width) // 2, y + (cell - original.height) // 2))
        sheet.paste(Image.fromarray(pixels, "L").resize((cell, cell), Image.Resampling.NEAREST), (x + cell + gap, y))
        name = Path(rec["file"]).name if rec["file"] else "image"
        draw.text((x, y + cell + 3), name[:34], fill=(90, 90, 90), font=font)
        said = f"not a product? ({rec['label']} {rec['probability']:.2f})" if rec.get("unsure") else \
            f"{rec['label']} {rec['probability']:.2f}"
        draw.text((x, y + cell + 18), said, fill=(0, 0, 0), font=font)
    from . import files

    files.atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path


def run_summary(run_dir: Path) -> dict | None:
    """The run's summary.json, or None where it is missing or damaged (it takes nothing from classifying)."""
    from . import runs

    if not (run_dir / "summary.json").is_file():
        return None
    try:
        return runs.read_summary(run_dir, need=())
    except runs.RunError:
        return None


def _name(item: Any) -> str | None:
    if isinstance(item, (str, Path)):
        return display_name(os.fspath(item))
    name = getattr(item, "filename", None) or None  # a PIL image opened from a file knows its name
    return display_name(name) if isinstance(name, (str, bytes)) else None


def _prepare_all(items: list[Any], preprocess: str, workers: int | None,
                 max_pixels: int = MAX_PIXELS) -> Iterator[tuple[Any, str]]:
    """(28x28 uint8 or None, chosen preprocessing or the error) per item, in order."""
    jobs = [(_read_stdin() if isinstance(it, str) and it == "-" else it, preprocess, max_pixels) for it in items]
    paths = sum(isinstance(j[0], (str, Path)) for j in jobs)
    workers = min(_cpu_count(), 8) if workers is None else workers
    if workers > 1 and paths >= PARALLEL_FROM and sys.platform == "linux":
        # Processes, not threads: for small images Python's own work dominates and the GIL would serialise it.
        # fork, not forkserver or spawn: those run the caller's main script again in every worker, which a
        # script without an `if __name__ == "__main__"` guard does not survive. The workers use numpy and
        # Pillow only, never the torch threads they inherit.
        import multiprocessing as mp

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_ignore_interrupts)
        try:
            for raw, chosen in pool.map(_prepare_quietly, jobs, chunksize=32):
                yield (None if raw is None else np.frombuffer(raw, np.uint8).reshape(SIZE, SIZE)), chosen
        finally:  # also when the reader stops early (`fmnist predict DIR | head`, Ctrl-C): drop what is queued
            pool.shutdown(wait=True, cancel_futures=True)
        return
    for job in jobs:
        raw, chosen = _prepare_quietly(job)
        yield (None if raw is None else np.frombuffer(raw, np.uint8).reshape(SIZE, SIZE)), chosen


_stdin_cache: list[bytes] = []


def _read_stdin() -> bytes:
    if not _stdin_cache:
        data = sys.stdin.buffer.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise PredictError(f"standard input holds more than {MAX_BYTES // 2**20} MiB: that is not one image.")
        _stdin_cache.append(data)
    return _stdin_cache[0]


def _inputs_dir(path: str | Path) -> Path:
    from . import files

    return files.claim_output_dir(path, "predict --save-inputs")


def output_path(out_dir: Path, index: int, item: Any, total: int) -> Path:
    """Where the file written for the index-th of `total` inputs goes: out_dir/<number>-<its stem>.png (numbered, so
    that two inputs of one name do not collide; --save-inputs' and fmnist explain's figures)."""
    stem = Path(item).stem if isinstance(item, (str, Path)) and str(item) != "-" else "stdin" if item == "-" \
        else "image"
    # at most 100 bytes of the name (a file system takes 255 bytes, and 100 characters can be 400 of them),
    # as text every output can print
    stem = display_name(stem).encode("utf-8")[:100].decode("utf-8", "ignore")
    return out_dir / f"{index + 1:0{len(str(total))}d}-{stem}.png"


def _save_input(out_dir: Path, index: int, item: Any, pixels: np.ndarray, total: int) -> Path:
    from . import files

    path = output_path(out_dir, index, item, total)
    files.atomic_write(path, lambda tmp: Image.fromarray(pixels, "L").save(tmp, format="PNG"))
    return path


def __getattr__(name: str) -> Any:
    """predict.export and its helpers, where older callers look for them: export.py sits above this module
    (it checks an export with a Predictor), so it is imported only when asked for."""
    if name in ("export", "EXPORT_FORMATS", "CHECK_IMAGES", "CHECK_TOLERANCE", "_write_onnx", "_write_torchscript"):
        return getattr(importlib.import_module(".export", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
