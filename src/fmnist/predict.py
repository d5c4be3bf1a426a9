"""Classify the images people bring, and export a model for use without fmnist's training code.

    p = Predictor("runs/mlp-s0")              # a run directory, a .pt checkpoint, model.onnx or a TorchScript file
    p.predict(["shoe.jpg", pil_image, array])  # -> [{"file": ..., "label": "Sneaker", "probability": 0.93, ...}]

A Fashion-MNIST image is a 28x28 greyscale thumbnail of one product, light on
a black background. A phone photo is none of that, so a photo goes through the
pipeline the dataset's authors used to make the dataset from Zalando's product
photos (Xiao, Rasul, Vollgraf 2017, "Fashion-MNIST", section 2): trim the edges
close to the corner colour, resize the longest edge to 28 by subsampling,
sharpen, extend the shortest edge to 28 with the object centred, negate,
convert to 8-bit greyscale. An image that already looks like the dataset (dark
background) is only converted and resized.

This module imports neither torch nor fmnist's training code at start-up:
`fmnist predict model.onnx` needs numpy, Pillow and onnxruntime only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageOps

from .errors import ImageError, PredictError

SIZE = 28  # pixels, each side of a Fashion-MNIST image
FUZZ = 0.05  # trim: edges within 5 % of the largest distance in RGB space (255 * sqrt(3)) of the corner colour
MAX_PIXELS = 64_000_000  # a larger image is refused as a likely decompression bomb (a 48-megapixel photo passes)
MAX_BYTES = 64 * 2**20  # the most read from standard input
PREPROCESS = ("auto", "photo", "dataset")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # what a directory search takes
EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript"}
CHECK_IMAGES = 1000  # test images on which an export must agree with PyTorch
CHECK_TOLERANCE = 1e-4  # the largest difference in probability allowed by that check
OVERVIEW = 24  # images in --save-inputs' overview.png
PARALLEL_FROM = 64  # files: below this, starting worker processes costs more than it saves


# ---------------------------------------------------------------- one image -> 28x28

def open_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """An "RGB" or "L" image, fully decoded: first frame, EXIF orientation applied, transparency on white."""
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        im = source
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
                im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except FileNotFoundError:
            raise ImageError("no such file") from None
        except IsADirectoryError:
            raise ImageError("is a directory") from None
        except PermissionError:
            raise ImageError("permission denied") from None
        except Image.DecompressionBombError:
            raise ImageError(_BOMB) from None
        except Exception as e:  # Pillow raises many types for a file it cannot identify
            if "Decompressed data too large" in str(e):  # a PNG text chunk that inflates beyond Pillow's limit
                raise ImageError("holds a text chunk that inflates beyond Pillow's limit, refused as a possible "
                                 "decompression bomb") from None
            raise ImageError("not an image that can be read (PNG, JPEG, WebP, BMP, TIFF or GIF)"
                             + _why(e, "cannot identify image file")) from None
    width, height = im.size
    if width * height > MAX_PIXELS:  # checked on the header, before anything is decoded
        raise ImageError(f"{width}x{height} pixels is larger than {MAX_PIXELS // 1_000_000} megapixels, "
                         "refused as a possible decompression bomb")
    if width < 1 or height < 1:
        raise ImageError("has no pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings on odd metadata: the pixels are what matter
            im.seek(0)  # an animation's first frame
            if im.format == "JPEG" and max(width, height) > 8 * 64:
                im.draft("RGB", (max(width // 8, 64), max(height // 8, 64)))  # decode at 1/2..1/8 scale: faster
            im.load()
            im = ImageOps.exif_transpose(im)
            return _flatten(im)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(_BOMB) from None
    except MemoryError:
        raise ImageError("too large to decode in the memory available") from None
    except Exception as e:  # truncated, corrupt, or a text chunk that inflates too far
        raise ImageError("a damaged or truncated image" + _why(e, "")) from None


_BOMB = (f"too many pixels to decode, refused as a possible decompression bomb (fmnist reads images of up to "
         f"{MAX_PIXELS // 1_000_000} megapixels)")


def _why(e: BaseException, boring: str) -> str:
    text = " ".join(str(e).split())
    return "" if not text or boring in text else f" ({text[:120]})"


def _flatten(im: Image.Image) -> Image.Image:
    """Any mode -> "L" or "RGB"; transparency composited on white; 16-bit and float scaled to 8 bits."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        peak = a.max(initial=0)
        top = 65535.0 if im.mode.startswith("I;16") or peak > 255 else 1.0 if peak <= 1 else 255.0
        return Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in ("L", "RGB"):
        return im
    return im.convert("L" if im.mode == "1" else "RGB")


def _from_array(a: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 3) or (H, W, 4) of 0-255 values -> an image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise ImageError(f"an array of shape {tuple(a.shape)} is not an image: expected (H, W), (H, W, 3) "
                         "or (H, W, 4)")
    if a.size > MAX_PIXELS * 4:
        raise ImageError(f"an array of {a.size:,} values is larger than {MAX_PIXELS // 1_000_000} megapixels")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageError(f"an array of {a.dtype} is not an image: expected numbers from 0 to 255")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ImageError("the array holds values that are not finite numbers")
    if a.min() < 0 or a.max() > 255:
        raise ImageError(f"the array's values run from {a.min()} to {a.max()}: expected 0 to 255")
    im = Image.fromarray(np.asarray(a).round().astype(np.uint8) if a.dtype != np.uint8 else np.ascontiguousarray(a))
    return _flatten(im)


def looks_like_dataset(im: Image.Image) -> bool:
    """Dark background, as in Fashion-MNIST: the median of the outermost pixels is below mid-grey."""
    g = np.asarray(im.convert("L"))
    ring = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    return float(np.median(ring)) < 128


def photo(im: Image.Image) -> np.ndarray:
    """The Fashion-MNIST paper's pipeline (section 2), on an "RGB" or "L" image -> (28, 28) uint8."""
    im = im.convert("RGB")
    rgb = np.asarray(im)  # (H, W, 3) uint8
    # 1. trim the edges that are close to the corner colour (the median of the four corners)
    ref = np.median(np.stack([rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]]), axis=0).round().astype(np.uint8)
    diff = np.asarray(ImageChops.difference(im, Image.new("RGB", im.size, tuple(int(v) for v in ref))))
    sq = _SQUARES[diff]  # |d|^2 per channel, capped: in C via Pillow and a table, 5x faster than in int32
    far = (sq[:, :, 0] + sq[:, :, 1] + sq[:, :, 2]) > _FUZZ_SQUARED
    rows, cols = np.flatnonzero(far.any(axis=1)), np.flatnonzero(far.any(axis=0))
    if rows.size:  # else the image is one colour: nothing to trim to
        rgb = rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    # 2. resize the longest edge to 28 by subsampling: every k-th row and column, from pixel centres
    h, w = rgb.shape[:2]
    scale = SIZE / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    ys = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(int), h - 1)
    xs = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(int), w - 1)
    small = rgb[ys][:, xs].astype(np.float64)
    # 3. sharpen (Gaussian, radius 1 and sigma 1, as ImageMagick's -sharpen 1x1)
    small = np.clip(_sharpen(small), 0, 255)
    # 4. extend the shortest edge to 28, the object centred, on white
    canvas = np.full((SIZE, SIZE, 3), 255.0)
    top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
    canvas[top:top + nh, left:left + nw] = small
    # 5. negate, 6. 8-bit greyscale (ITU-R 601-2 luma, as Pillow's "L")
    grey = 255.0 - (0.299 * canvas[:, :, 0] + 0.587 * canvas[:, :, 1] + 0.114 * canvas[:, :, 2])
    return np.clip(grey.round(), 0, 255).astype(np.uint8)


_FUZZ_SQUARED = (FUZZ * 255) ** 2 * 3  # the trim's distance, squared: (5 % of 255 * sqrt(3))^2
_SQUARES = np.minimum(np.arange(256) ** 2, int(_FUZZ_SQUARED) + 1).astype(np.uint16)  # the sum cannot overflow
_G = np.exp(-np.add.outer(np.arange(-1, 2) ** 2, np.arange(-1, 2) ** 2) / 2.0)  # 3x3 Gaussian, sigma 1
_SHARPEN = -_G.copy()
_SHARPEN[1, 1] = 2 * _G.sum()
_SHARPEN /= _SHARPEN.sum()  # ImageMagick's SharpenImage kernel: about x + 0.83 (x - blur(x))


def _sharpen(a: np.ndarray) -> np.ndarray:
    """3x3 convolution with _SHARPEN over (H, W, C), edges repeated."""
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    return sum(_SHARPEN[i, j] * p[i:i + h, j:j + w] for i in range(3) for j in range(3))


def dataset_like(im: Image.Image) -> np.ndarray:
    """An image that already looks like Fashion-MNIST -> greyscale, longest edge 28, centred on black."""
    g = im.convert("L")
    if g.size != (SIZE, SIZE):
        w, h = g.size
        scale = SIZE / max(w, h)
        g = g.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX
                     if scale < 1 else Image.Resampling.BILINEAR)
        canvas = Image.new("L", (SIZE, SIZE), 0)
        canvas.paste(g, ((SIZE - g.size[0]) // 2, (SIZE - g.size[1]) // 2))
        g = canvas
    return np.asarray(g, dtype=np.uint8).copy()


def prepare(source: Any, preprocess: str = "auto") -> tuple[np.ndarray, str]:
    """Any image -> ((28, 28) uint8, the preprocessing applied: "photo" or "dataset")."""
    if preprocess not in PREPROCESS:
        raise PredictError(f"unknown preprocessing '{preprocess}'; choose one of {', '.join(PREPROCESS)}.")
    im = open_image(source)
    chosen = preprocess if preprocess != "auto" else "dataset" if looks_like_dataset(im) else "photo"
    return (photo(im) if chosen == "photo" else dataset_like(im)), chosen


def _ignore_interrupts() -> None:
    """In a worker: Ctrl-C is the parent's to handle (it stops the pool), not a traceback per worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_quietly(job: tuple[Any, str]) -> tuple[bytes | None, str | None]:
    """prepare() in a worker process: (28x28 bytes, chosen) or (None, the error's sentence)."""
    source, preprocess = job
    try:
        pixels, chosen = prepare(source, preprocess)
        return pixels.tobytes(), chosen
    except ImageError as e:
        return None, str(e)


# ---------------------------------------------------------------- finding the inputs

def find_images(paths: Iterable[str | Path]) -> tuple[list[str], int]:
    """Named files as given (each is tried), directories searched recursively for image files, sorted.

    Returns the inputs and how many files in the directories were passed over (hidden, or not named as an image).
    """
    found: list[str] = []
    skipped = 0
    for p in paths:
        p = str(p)
        if p != "-" and os.path.isdir(p):
            inside = []
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for f in files:
                    if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                        inside.append(os.path.join(root, f))
                    else:
                        skipped += 1
            found += sorted(inside)
        else:
            found.append(p)
    return found, skipped


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- the model

class Predictor:
    """A model that classifies images: PyTorch (a run or a checkpoint), onnxruntime (.onnx) or TorchScript.

    Every backend takes (N, 28, 28) float32 pixels from 0 to 255 (light object on black) and gives
    (N, 10) probabilities: the normalisation is part of the model.
    """

    def __init__(self, model: Any, device: str = "cpu", batch_size: int = 256, kind: str | None = None):
        """`model`: a run directory, a .pt checkpoint, a .onnx or .torchscript file, or an nn.Module.
        `kind` ("checkpoint", "onnx", "torchscript") overrides what the file name says."""
        if not 1 <= batch_size <= 65536:
            raise PredictError(f"--batch-size {batch_size} is out of range: choose 1 to 65,536.")
        self.batch_size = batch_size
        self.info: dict[str, Any] = {}  # what the model says of itself: its run's config and figures
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
        self._use_module(model, data.CLASSES, devices.pick_device(device), tta=cfg.tta)
        if cfg.channels_last:  # as it was trained: cnn-fast with TTA, batch 1024, 775 -> 2,242 images/s on 2 cores
            self._module = self._module.to(memory_format=self._torch.channels_last)
        self.backend = "pytorch"
        self.info = {"model": cfg.model, "config": dataclasses.asdict(cfg), "epoch": ckpt["epoch"]}
        self.model = model  # the bare network (normalised images in, logits out), for who needs its layers
        summary = _run_summary(path if path.is_dir() else path.parent)
        if summary is not None:
            self.info["summary"] = summary

    def _use_module(self, model, classes, device, tta: bool = False) -> None:
        import torch

        from . import models

        device = torch.device(device)
        self.classes = tuple(classes)
        self._torch = torch
        self._device = device
        self._module = models.PixelClassifier(model, tta).to(device).eval()
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
        if (len(ins) != 1 or list(ins[0].shape[1:]) != [SIZE, SIZE] or len(outs) != 1
                or "classes" not in meta):
            raise PredictError(f"{path} was not exported by fmnist (it must take (N, 28, 28) pixels, give "
                               "(N, classes) probabilities and name its classes): export one with fmnist export.")
        self.classes = self._classes(meta["classes"], path)
        self.info = json.loads(meta.get("fmnist", "{}"))
        self._session, self._input = session, ins[0].name
        self.backend = "onnxruntime"
        self._run = lambda x: self._session.run(None, {self._input: x})[0]

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
        self.info = json.loads(extra["fmnist.json"] or "{}")
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

    def _run_torch(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            return self._module(torch.from_numpy(x).to(self._device)).float().cpu().numpy()

    # -- classifying

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 28, 28) values 0-255 -> (N, classes) probabilities, in batches of self.batch_size."""
        x = np.asarray(pixels, dtype=np.float32).reshape(-1, SIZE, SIZE)
        parts = [self._run(np.ascontiguousarray(x[i:i + self.batch_size]))
                 for i in range(0, len(x), self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), np.float32)

    def record(self, probs: np.ndarray, top_k: int = 3) -> dict[str, Any]:
        """One image's probabilities -> {"label", "index", "probability", "top": [...]} (top_k classes)."""
        order = np.argsort(-probs, kind="stable")[:top_k]
        best = int(order[0])
        return {"label": self.classes[best], "index": best, "probability": round(float(probs[best]), 6),
                "top": [{"label": self.classes[i], "probability": round(float(probs[i]), 6)} for i in order]}

    def predict(self, items: Iterable[Any], top_k: int = 3, preprocess: str = "auto",
                save_inputs: str | Path | None = None, workers: int | None = None) -> list[dict[str, Any]]:
        """Classify paths, bytes, PIL images and arrays; one record per item, in order.

        A record is {"file", "label", "index", "probability", "top", "preprocess"} (plus "input", the
        28x28 PNG written, with save_inputs), or {"file", "error"} for an item that is not a usable image.
        """
        return list(self.iter_predict(items, top_k, preprocess, save_inputs, workers))

    def iter_predict(self, items: Iterable[Any], top_k: int = 3, preprocess: str = "auto",
                     save_inputs: str | Path | None = None, workers: int | None = None) -> Iterator[dict[str, Any]]:
        """predict(), one record at a time, as each batch is classified. Paths are decoded on all cores."""
        if not 1 <= top_k <= len(self.classes):
            raise PredictError(f"--top-k {top_k} is out of range: choose 1 to {len(self.classes)}.")
        if preprocess not in PREPROCESS:
            raise PredictError(f"unknown preprocessing '{preprocess}'; choose one of {', '.join(PREPROCESS)}.")
        items = list(items)
        out_dir = _inputs_dir(save_inputs) if save_inputs is not None else None
        prepared = _prepare_all(items, preprocess, workers)
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
        probs = self.probabilities(np.stack([b[2] for b in batch]))
        for (i, item, pixels, chosen), p in zip(batch, probs):
            rec = {"file": _name(item), **self.record(p, top_k), "preprocess": chosen}
            if out_dir is not None:
                rec["input"] = str(_save_input(out_dir, i, item, pixels, total))
                if len(shown) < OVERVIEW:
                    shown.append((item, pixels, rec))
            yield rec


def overview(shown: list[tuple[Any, np.ndarray, dict]], path: Path, cell: int = 112, cols: int = 4) -> Path:
    """A PNG of each image beside the 28x28 input it became (shown 4x, pixel for pixel), with its class."""
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
        draw.text((x, y + cell + 18), f"{rec['label']} {rec['probability']:.2f}", fill=(0, 0, 0), font=font)
    from . import files

    files.atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path


def _run_summary(run_dir: Path) -> dict | None:
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
        return str(item)
    return getattr(item, "filename", None) or None  # a PIL image opened from a file knows its name


def _prepare_all(items: list[Any], preprocess: str, workers: int | None) -> Iterator[tuple[Any, str]]:
    """(28x28 uint8 or None, chosen preprocessing or the error) per item, in order."""
    jobs = [(_read_stdin() if isinstance(it, str) and it == "-" else it, preprocess) for it in items]
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


def _save_input(out_dir: Path, index: int, item: Any, pixels: np.ndarray, total: int) -> Path:
    from . import files

    stem = Path(item).stem if isinstance(item, (str, Path)) and str(item) != "-" else "stdin" if item == "-" \
        else "image"
    path = out_dir / f"{index + 1:0{len(str(total))}d}-{stem[:100]}.png"
    files.atomic_write(path, lambda tmp: Image.fromarray(pixels, "L").save(tmp, format="PNG"))
    return path


# ---------------------------------------------------------------- export

def export(run: str | Path, fmt: str = "onnx", data_dir: str | None = None) -> dict[str, Any]:
    """Write RUN/model.onnx (or RUN/model.torchscript) from RUN/best.pt, checked before it is kept.

    The exported model takes (N, 28, 28) float32 pixels from 0 to 255 (any N) and gives (N, classes)
    probabilities; its metadata names the classes and carries the run's configuration. It is kept only
    if its probabilities on the run's first CHECK_IMAGES test images match PyTorch's within
    CHECK_TOLERANCE and every top class agrees.
    """
    import torch

    from . import data, files, models, runs

    if fmt not in EXPORT_FORMATS:
        raise PredictError(f"unknown export format '{fmt}'; choose one of {', '.join(EXPORT_FORMATS)}.")
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise PredictError(f"{run_dir} is not a run directory: give the folder that holds best.pt.")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401 (torch.onnx's exporter)
        except ImportError:
            raise PredictError("exporting to ONNX needs onnx, onnxscript and onnxruntime: "
                               "pip install 'fmnist[onnx]'.") from None
    model, cfg, ckpt = runs.load_model(run_dir)
    wrapped = models.PixelClassifier(model, cfg.tta).eval()
    directory = data.locate(runs.data_dir_for(cfg.data_dir, data_dir))
    images = data.load_split(directory, "test")[0][:CHECK_IMAGES]
    pixels = images.astype(np.float32)
    with torch.inference_mode():
        expected = wrapped(torch.from_numpy(pixels)).numpy()
    meta = {"model": cfg.model, "config": dataclasses.asdict(cfg), "epoch": ckpt["epoch"],
            "input": "pixels: (N, 28, 28) float32, 0-255, a light object on black",
            "output": "probabilities: (N, classes) float32"}
    summary = _run_summary(run_dir)
    if summary is not None:
        meta["summary"] = summary
    path = run_dir / EXPORT_FORMATS[fmt]
    check: dict[str, Any] = {}

    def write(tmp: str) -> None:
        (_write_onnx if fmt == "onnx" else _write_torchscript)(wrapped, tmp, list(data.CLASSES), meta)
        got = Predictor(tmp, kind=fmt, batch_size=1024).probabilities(pixels)
        diff = float(np.abs(got - expected).max()) if len(pixels) else 0.0
        agree = int((got.argmax(1) == expected.argmax(1)).sum())
        check.update(images=len(pixels), max_difference=diff, argmax_agree=agree)
        if not diff <= CHECK_TOLERANCE or agree != len(pixels):
            raise PredictError(f"the exported model disagrees with PyTorch on {directory}'s test images "
                               f"(largest difference {diff:.2e}, {agree} of {len(pixels)} top classes agree); "
                               f"{path} was not written.")

    files.atomic_write(path, write)
    return {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "check": check,
            "classes": list(data.CLASSES)}


def _write_onnx(wrapped, path: str, classes: list[str], meta: dict[str, Any]) -> None:
    import contextlib
    import logging

    import onnx
    import torch

    example = torch.zeros(2, SIZE, SIZE)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on torchvision's operators, which no fmnist model uses
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), path, input_names=["pixels"], output_names=["probabilities"],
                              dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                              external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    proto = onnx.load(path)
    for key, value in (("classes", json.dumps(classes)), ("fmnist", json.dumps(meta))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "Fashion-MNIST classifier exported by fmnist: " + meta["input"] + " -> " + meta["output"]
    onnx.save(proto, path)


def _write_torchscript(wrapped, path: str, classes: list[str], meta: dict[str, Any]) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is in maintenance: onnx is the format to prefer
        traced = torch.jit.trace(wrapped, torch.zeros(2, SIZE, SIZE))
        extra = {"classes.json": json.dumps(classes), "fmnist.json": json.dumps(meta)}
        torch.jit.save(traced, path, _extra_files=extra)
