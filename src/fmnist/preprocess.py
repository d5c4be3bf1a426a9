"""Any image (a file, bytes, a PIL image, an array) -> the 28x28 input a Fashion-MNIST model takes.

    pixels, chosen = prepare("shoe.jpg")  # -> ((28, 28) uint8, "photo" or "dataset")

A Fashion-MNIST image is a 28x28 greyscale thumbnail of one product, light on
a black background. A phone photo is none of that, so a photo goes through the
pipeline the dataset's authors used to make the dataset from Zalando's product
photos (Xiao, Rasul, Vollgraf 2017, "Fashion-MNIST", section 2): trim the edges
close to the corner colour, resize the longest edge to 28 by subsampling,
sharpen, extend the shortest edge to 28 with the object centred, negate,
convert to 8-bit greyscale. An image that already looks like the dataset (dark
background) is only converted and resized.

Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageOps

from .errors import ImageError, PredictError

SIZE = 28  # pixels, each side of a Fashion-MNIST image
FUZZ = 0.05  # trim: edges within 5 % of the largest distance in RGB space (255 * sqrt(3)) of the corner colour
MAX_PIXELS = 64_000_000  # a larger image is refused as a likely decompression bomb (a 48-megapixel photo passes)
PREPROCESS = ("auto", "photo", "dataset")


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
