"""Any image (a file, bytes, a PIL image, an array) -> the 28x28 input a Fashion-MNIST model takes.

    pixels, chosen = prepare("shoe.jpg")  # -> ((28, 28) uint8, "photo" or "dataset")

A Fashion-MNIST image is a 28x28 greyscale thumbnail of one product, light on
a black background, made from Zalando's studio photos by the pipeline of the
dataset's paper (Xiao, Rasul, Vollgraf 2017, "Fashion-MNIST", section 2): trim
the edges close to the corner colour, resize the longest edge to 28, sharpen,
extend the shortest edge to 28 with the object centred, negate, convert to
8-bit greyscale. That trim assumes a flat, pure-white studio background. A
photo as people take it has grey paper, a lamp's fall-off, a drop shadow,
sensor noise, a tilt or a dark table instead, so `photo` first finds the
product: it measures the background from the image's border and flattens it to
white, segments the product and composites it on white, straightens it, and
only then takes the paper's steps (see `photo` for each step and why). An
image that already looks like the dataset (small, dark background) is only
converted and resized (`dataset_like`); `prepare` decides which per image.

Torch-free: NumPy, Pillow and OpenCV (opencv-python-headless) only.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import threading
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError, PredictError

SIZE = 28  # pixels, each side of a Fashion-MNIST image
MAX_PIXELS = 64_000_000  # a larger image is refused as a likely decompression bomb (a 48-megapixel photo passes)
PREPROCESS = ("auto", "photo", "dataset")
DATASET_SIDE = 4 * SIZE  # px: a dark image at most this big each way is taken as a Fashion-MNIST image
PRODUCT_LEVELS = 32  # ... if its brightest pixel is this much above its border (the dataset's: 255 nearly always)
WORK = 256  # px: the longest side of the copy on which the background is measured and the product found
CROP = 8 * SIZE  # px: the product is cropped from the decoded image, area-averaged while it stays this long
DRAFT = 768  # px: a JPEG this long or longer is decoded at a reduced scale (1/2 to 1/8), the smallest ...
DECODE = 384  # px: ... from which it is still this long (a product half as long keeps 7 px per output px)
RING = 0.04  # of the shorter side: the outer band from which the background is measured
CONTRAST = 16.0  # levels of 255: the least a product pixel differs from the flattened background
PART = 0.1  # of the largest part's area: a separate part kept as the product's (a sandal's straps)
TILT = 15  # degrees: the most a product is turned to straighten it
SYM = 32  # px: the side of the copy of the mask on which symmetry is measured
SYM_TIE = 0.01  # of intersection over union: turns this close to the most symmetric count as ties
SYMMETRIC = 0.85  # intersection over union with its mirror: a product straightened by its symmetry
TILT_GAIN = 0.01  # the least share by which turning must shrink the box (1 %: fewer upright products turned)
STRAIGHTEN = True  # turn a tilted product upright (measured by benchmarks/photo_accuracy.py: see RESULTS.md)
SEGMENTER = Path(__file__).with_name("shadow.onnx")  # a small network: the product within what is dark (its
# shadow not), trained by benchmarks/shadow_segmenter.py; run by OpenCV's dnn module (no torch here)
SEG_SIDE = 48  # px: the segmenter's input, the dark region's box (aspect kept) ...
SEG_MARGIN = 0.08  # ... grown by this share of its longer side each way

cv2.setNumThreads(1)  # one image per core: fmnist spreads many images over worker processes, and OpenCV's own
# thread pool costs more than it saves on images this small (and does not survive the workers' fork)


def open_image(source: str | Path | bytes | Image.Image | np.ndarray, max_pixels: int = MAX_PIXELS,
               grey: bool = False) -> Image.Image:
    """An "RGB" or "L" image, fully decoded: first frame, EXIF orientation applied, transparency on white.

    max_pixels: a larger image is refused from its header, before its pixels are decoded or allocated (a JPEG
    is decoded at a reduced scale, so that even one of many megapixels stays cheap; see _decode_scale).
    grey: a colour JPEG is decoded to its luma channel alone ("L"), which is all that `prepare` uses: its
    colour is neither transformed nor converted (a third less decoding time)."""
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        im = source
    else:
        if isinstance(source, (str, Path)):
            _check_regular(source)
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
    if im.format in UNSUPPORTED:  # EPS would run Ghostscript on the file: never on an upload
        raise ImageError(f"{_format(im)}, a format fmnist does not support: convert it to PNG or JPEG")
    width, height = im.size
    if width * height > max_pixels:  # checked on the header, before anything is decoded
        raise ImageError(f"{width}x{height} pixels is larger than {_megapixels(max_pixels)} megapixels, "
                         "refused as a possible decompression bomb")
    if width < 1 or height < 1:
        raise ImageError("has no pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings on odd metadata: the pixels are what matter
            im.seek(0)  # an animation's first frame
            if im.format == "JPEG":  # decoded at 1/2..1/8 scale (the inverse DCT of fewer coefficients): faster
                scale = _decode_scale(width, height)
                im.draft("L" if grey else "RGB", (max(1, width // scale), max(1, height // scale)))
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
        if im.format not in READ:  # Pillow knows the header, not how to decode what follows (PSD's layers, ...)
            raise ImageError(f"{_format(im)}, a format fmnist does not support: convert it to PNG or JPEG") from None
        raise ImageError("a damaged or truncated image" + _why(e, "")) from None


def _decode_scale(width: int, height: int) -> int:
    """The JPEG scale (1, 2, 4 or 8: decoded at 1/scale) for `photo`: a JPEG at least DRAFT pixels long is
    decoded at the smallest scale from which it is still DECODE pixels long (and its shorter side 8). A
    1600x1200 photo is decoded at 1/4 (400x300: the working copy 200x150, the product cropped from twice as
    many pixels), a 1024x768 one at 1/2, a camera's 4032x3024 at 1/8 (504x378); a smaller JPEG in full (as
    luma, about a millisecond: its product needs every pixel)."""
    if max(width, height) < DRAFT:
        return 1
    for scale in (8, 4, 2):
        if max(width, height) // scale >= DECODE and min(width, height) // scale >= 8:
            return scale
    return 1


READ = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "GIF")  # the formats fmnist reads and tests
UNSUPPORTED = ("EPS", "PS")  # formats Pillow decodes only with an outside program


def _format(im: Image.Image) -> str:
    return f"a{'n' if (im.format or 'x')[0] in 'AEFHILMNORSX' else ''} {im.format or 'unknown'} image"


def _check_regular(path: str | Path) -> None:
    """Refuses what is not a regular file before it is opened: a FIFO or a device would block or never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except ValueError:  # a NUL in the name
        raise ImageError("not a file name (it holds a NUL character)") from None
    except OSError as e:
        raise ImageError(f"cannot be read ({os.strerror(e.errno) if e.errno else e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a directory")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise ImageError(f"{kind}, not a regular file: fmnist reads image files only")


_BOMB = (f"too many pixels to decode, refused as a possible decompression bomb (fmnist reads images of up to "
         f"{MAX_PIXELS // 1_000_000} megapixels)")


def _why(e: BaseException, boring: str) -> str:
    text = " ".join(str(e).split())
    return "" if not text or boring in text else f" ({text[:120]})"


def _flatten(im: Image.Image) -> Image.Image:
    """Any mode -> "L" or "RGB"; transparency composited on white; 16-bit and float scaled to 8 bits."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():  # a float TIFF of NaN or infinity has no brightness to scale
            raise ImageError("its pixels hold values that are not finite numbers (NaN or infinity)")
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


def _megapixels(n: int) -> str:
    return f"{n / 1_000_000:.6g}"


def _from_array(a: np.ndarray, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """(H, W), (H, W, 3) or (H, W, 4) of 0-255 values -> an image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise ImageError(f"an array of shape {tuple(a.shape)} is not an image: expected (H, W), (H, W, 3) "
                         "or (H, W, 4)")
    if a.shape[0] * a.shape[1] > max_pixels:
        raise ImageError(f"an array of {a.shape[0]}x{a.shape[1]} pixels is larger than {_megapixels(max_pixels)} "
                         "megapixels")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageError(f"an array of {a.dtype} is not an image: expected numbers from 0 to 255")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ImageError("the array holds values that are not finite numbers")
    if a.min() < 0 or a.max() > 255:
        raise ImageError(f"the array's values run from {a.min()} to {a.max()}: expected 0 to 255")
    im = Image.fromarray(np.asarray(a).round().astype(np.uint8) if a.dtype != np.uint8 else np.ascontiguousarray(a))
    return _flatten(im)


def looks_like_dataset(im: Image.Image) -> bool:
    """A genuine Fashion-MNIST-like image: dark border (the median of the outermost pixels below mid-grey), a
    product on it (its brightest pixels PRODUCT_LEVELS above that border), and small (at most DATASET_SIDE
    pixels each way). A larger dark photo is a light product on a dark table; a flat or nearly flat image is
    no dataset image (the photo path finds nothing on it, and the model is not asked to name a grey sheet)."""
    if max(im.size) > DATASET_SIDE:
        return False
    g = np.asarray(im.convert("L"))
    border = float(np.median(np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])))
    return border < 128 and float(g.max()) - border > PRODUCT_LEVELS


def photo(im: Image.Image) -> np.ndarray:
    """A photo of one product -> (28, 28) uint8: the product found on its background, then the paper's steps.

    1. greyscale (ITU-R 601-2 luma), and a working copy at most WORK pixels each way (area-averaged by a
       whole factor), denoised (median, 5x5) before anything is decided from it;
    2. the background: a smooth surface (quadratic in x and y) fitted robustly to the outer RING of the
       working copy, so that grey paper, a lamp's fall-off and a dark table are all measured, not assumed;
    3. polarity: a product mostly lighter than that surface (a light product on a dark table) is inverted,
       so that from here on the product is darker than its background;
    4. the image divided by the surface: the background becomes white whatever its level and slope;
    5. the product: what is darker than white by more than CONTRAST levels and 4 standard deviations of the
       border's noise, less the shadow it casts: a small network (`_segmented`, trained on photos with and
       without a drop shadow) keeps the product within that region; then its largest connected part and the
       parts of at least PART of its size; everything else becomes pure white;
    6. straightened: turned by up to TILT degrees to the angle at which its box is smallest (garments and
       shoes are photographed square to the frame in the dataset);
    7. the paper's steps (section 2): trim to the product, resize the longest edge to 28 (area-averaged, not
       subsampled: it also averages the sensor noise away), sharpen, centre on 28x28, negate.
    """
    g = np.asarray(im.convert("L"))  # (H, W) uint8
    if min(g.shape) < 8:  # a sliver: no border to measure, nothing to find; only the paper's steps
        return _paper_steps(g.astype(np.float32))
    found = _flattened(g)
    if found is None:  # a black sheet with nothing lighter on it: nothing to find
        return np.zeros((SIZE, SIZE), np.uint8)
    g, f, coef, flat, dark = found
    wh, ww = flat.shape
    mask = _product(_segmented(flat, dark)) if dark.any() else dark
    if not mask.any():  # nothing darker than the background: a blank sheet
        return np.zeros((SIZE, SIZE), np.uint8)
    # the product's box (widened by the median's reach, which rounds corners) in the decoded image, area-
    # averaged by the largest factor of f that leaves it CROP pixels long (a large product then costs no more
    # than a small one; 4 pixels per output pixel left the part-covered edge pixels as a rim, darkened by the
    # sharpening, and measured up to 0.3 points lower on validation photos), divided by the surface there;
    # everything outside the product white
    near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    fc = max([d for d in range(1, f + 1) if f % d == 0 and max(r1 - r0, c1 - c0) * f // d >= CROP] or [1])
    crop = g[r0 * f:r1 * f, c0 * f:c1 * f]
    if fc > 1:
        crop = cv2.resize(crop, (crop.shape[1] // fc, crop.shape[0] // fc), interpolation=cv2.INTER_AREA)
    crop = crop * (255.0 / _surface(coef, wh, ww, (r0, c0, crop.shape[0], crop.shape[1], fc / f)))  # float32
    keep = near[r0:r1, c0:c1]
    if f > fc:
        keep = np.repeat(np.repeat(keep, f // fc, axis=0), f // fc, axis=1)
    crop = np.where(keep & (crop < 255 - CONTRAST / 2), crop, np.float32(255))
    ink = crop < 255 - CONTRAST  # the paper's trim, now that the background is white
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size:
        crop = crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return _paper_steps(_straighten(crop, mask) if STRAIGHTEN else crop)


def _flattened(g: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray] | None:
    """`photo`'s steps 1-4 on an (H, W) uint8 image at least 8 px each way: (the image, inverted where the
    product is lighter than its background and cut to whole working pixels; full pixels per working pixel; the
    background surface's coefficients; the working copy divided by it, the background near 255; what is darker
    than that background), or None for a black sheet with nothing lighter on it."""
    # full pixels per working pixel, a whole number (area-averaging is fast then), leaving 8 pixels at least
    f = min(-(-max(g.shape) // WORK), min(g.shape) // 8)
    h, w = g.shape[0] // f * f, g.shape[1] // f * f
    g = g[:h, :w]
    den = cv2.medianBlur(g if f == 1 else cv2.resize(g, (w // f, h // f), interpolation=cv2.INTER_AREA), 5)
    wh, ww = den.shape
    ring, (u, v) = _ring(den)
    coef, sigma = _fit_surface(ring.astype(np.float64), u, v)
    surface = _surface(coef, wh, ww)
    dev = den - surface
    beyond = max(CONTRAST, 4 * sigma)
    if dev[dev > beyond].sum() > -dev[dev < -beyond].sum():  # mostly lighter than its background: invert
        g, den, coef, surface = 255 - g, 255 - den, -coef, np.maximum(255 - surface, np.float32(1))
        coef[0] += 255
    if float(surface.max()) < CONTRAST:
        return None
    flat = den * (255.0 / surface)  # (wh, ww) float32: the background near 255
    dark = flat < 255.0 - max(CONTRAST, 4 * sigma * 255.0 / max(float(surface.mean()), 1.0))
    return g, f, coef, flat, dark


def _ring(a: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Every other row and third column of the outer RING of an (H, W) image (plenty for six coefficients):
    the values and their places (u, v from -1 to 1 across the image)."""
    ys, xs, u, v = _ring_places(*a.shape)
    return a[ys, xs], (u, v)


@functools.lru_cache(maxsize=64)
def _ring_places(h: int, w: int) -> tuple[np.ndarray, ...]:
    """The ring's rows and columns and their (u, v), for an (h, w) image (photos come in a few sizes)."""
    k = max(1, round(RING * min(h, w)))
    ys, xs = [], []
    for rows, cols in ((np.arange(0, k), np.arange(0, w)), (np.arange(h - k, h), np.arange(0, w)),
                       (np.arange(k, h - k), np.arange(0, k)), (np.arange(k, h - k), np.arange(w - k, w))):
        yy, xx = np.meshgrid(rows[::2], cols[::3], indexing="ij")
        ys.append(yy.ravel())
        xs.append(xx.ravel())
    ys, xs = np.concatenate(ys), np.concatenate(xs)
    places = (ys, xs, (xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1)
    for p in places:
        p.flags.writeable = False
    return places


def _fit_surface(z: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, float]:
    """A quadratic surface through the border's values, each fit without the points far from the last (the
    product where it reaches the border): its six coefficients and the noise about it (a standard deviation)."""
    a = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1)
    coef = np.array([_median(z), 0, 0, 0, 0, 0])  # start from a flat sheet at the border's median
    r = z - coef[0]
    sigma = 1.4826 * _median(np.abs(r))
    for _ in range(3):
        keep = np.abs(r) <= 3 * sigma + 2
        if keep.sum() < 12:
            break
        try:  # least squares by the normal equations: a 6x6 system
            ak = a[keep]
            coef = np.linalg.solve(ak.T @ ak, ak.T @ z[keep])
        except np.linalg.LinAlgError:  # the points on one line: keep the last surface
            break
        r = z - a @ coef
        sigma = 1.4826 * _median(np.abs(r[keep]))
    return coef, sigma


def _median(a: np.ndarray) -> float:
    """The (upper) median, without np.median's checks: a tenth of its time on a thousand values."""
    return float(np.partition(a, len(a) // 2)[len(a) // 2])


def _surface(coef: np.ndarray, h: int, w: int, window: tuple | None = None) -> np.ndarray:
    """The background surface over the (h, w) working image, or over a window of a larger copy: (top, left)
    in working pixels, (height, width) in its pixels, and working pixels per pixel. float32, at least 1."""
    if window is None:
        ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    else:
        top, left, ch, cw, step = window
        ys, xs = top + (np.arange(ch) + 0.5) * step, left + (np.arange(cw) + 0.5) * step
    u, v = (xs / w * 2 - 1).astype(np.float32)[None, :], (ys / h * 2 - 1).astype(np.float32)[:, None]
    c = coef.astype(np.float32)
    return np.maximum(c[0] + c[1] * u + c[3] * u * u + (c[2] + c[4] * u) * v + c[5] * v * v, np.float32(1))


def _segment_input(flat: np.ndarray, dark: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int],
                                                                  tuple[int, int]]:
    """The segmenter's input for a working copy and its non-empty dark mask: (1, 2, SEG_SIDE, SEG_SIDE) float32
    (how dark each pixel is, 0 for the background to 1 for black; the share of it that is dark), the dark
    region's box grown by SEG_MARGIN resized by area with its aspect kept, at the top left; with that box (rows,
    then columns, in working pixels) and the size it fills (rows, columns)."""
    rows, cols = np.flatnonzero(dark.any(axis=1)), np.flatnonzero(dark.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    grow = max(2, round(SEG_MARGIN * max(r1 - r0, c1 - c0)))
    r0, r1, c0, c1 = max(0, r0 - grow), min(dark.shape[0], r1 + grow), max(0, c0 - grow), min(dark.shape[1],
                                                                                              c1 + grow)
    scale = SEG_SIDE / max(r1 - r0, c1 - c0)
    nh, nw = max(1, round((r1 - r0) * scale)), max(1, round((c1 - c0) * scale))
    x = np.zeros((1, 2, SEG_SIDE, SEG_SIDE), np.float32)
    x[0, 0, :nh, :nw] = cv2.resize(1 - np.clip(flat[r0:r1, c0:c1], 0, 255) / np.float32(255), (nw, nh),
                                   interpolation=cv2.INTER_AREA)
    x[0, 1, :nh, :nw] = cv2.resize(dark[r0:r1, c0:c1].astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
    return x, (r0, r1, c0, c1), (nh, nw)


@functools.lru_cache(maxsize=1)
def _segmenter() -> tuple[Any, threading.Lock]:
    """The segmenter (an OpenCV dnn network, read once per process) and a lock: a network is not shared by
    threads at once (the service answers several requests together)."""
    try:
        return cv2.dnn.readNetFromONNX(str(SEGMENTER)), threading.Lock()
    except cv2.error:
        raise PredictError(f"fmnist's shadow segmenter {SEGMENTER} is missing or unreadable; reinstall fmnist "
                           f"(or retrain it: python benchmarks/shadow_segmenter.py).") from None


def _segmented(flat: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """The product within `dark` (not empty), its drop shadow not: the segmenter's answer, resized back.

    In greyscale a shadow's light band and a light product's soft edge have the same darkness and the same
    softness, so rules on either (a flood through soft pixels, then a search for the product's outline moved and
    blurred, before this) left a band of shadow where it meets the product. The segmenter learnt the difference
    from 32,000 photo pairs of training images, each with and without its shadow, rendered apart from the
    benchmark's photos and the tests' (benchmarks/shadow_segmenter.py); about 17,500 weights, 0.6 ms a photo
    on one core. Measured on the photo benchmark: see RESULTS.md, Photos.
    """
    x, (r0, r1, c0, c1), (nh, nw) = _segment_input(flat, dark)
    net, lock = _segmenter()
    with lock:
        net.setInput(x)
        logit = net.forward().reshape(SEG_SIDE, SEG_SIDE)[:nh, :nw]
    out = np.zeros_like(dark)
    out[r0:r1, c0:c1] = (cv2.resize(logit, (c1 - c0, r1 - r0), interpolation=cv2.INTER_LINEAR) > 0) \
        & dark[r0:r1, c0:c1]
    return out


def _hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a non-empty mask's pixels, (K, 2) of (x, y): the hull of each row's first and last
    pixel, which is the same hull (the rest of a row lies between them) from a few hundred points instead of
    every pixel (convexHull over every pixel cost a millisecond a photo)."""
    rows = np.flatnonzero(mask.any(axis=1))
    band = mask[rows]
    first = band.argmax(axis=1)
    last = mask.shape[1] - 1 - band[:, ::-1].argmax(axis=1)
    points = np.concatenate([np.stack([first, rows], 1), np.stack([last, rows], 1)]).astype(np.int32)
    return cv2.convexHull(points).reshape(-1, 2)


def _product(dark: np.ndarray) -> np.ndarray:
    """The product's mask: the largest connected part of `dark` (8-connected, after closing 1-pixel gaps) and
    every part of at least PART of its area."""
    closed = cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    if n <= 1:
        return np.zeros(dark.shape, bool)
    areas = stats[:, cv2.CC_STAT_AREA].copy()
    areas[0] = 0  # the background
    return (areas >= PART * areas.max())[labels]


def _straighten(crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The product on white, turned upright by up to TILT degrees, and trimmed again.

    The angle, from its working-size mask: a product that is mirror-symmetric when turned (garments and bags
    are photographed from the front in the dataset) is turned to where it is most symmetric; any other (a shoe,
    seen from the side) to where the upright box of its convex hull is smallest. On masks of validation images
    turned by up to 12 degrees, the box alone missed the angle by more than 3 degrees for 11 % of them (T-shirts
    and dresses 13-15 %), the two together for 7 % (garments 0-4 %, shoes 13-21 %). Measured on the photo
    benchmark: see RESULTS.md.
    """
    best, score = _symmetry_angle(mask)
    if score < SYMMETRIC:
        hull = _hull(mask).astype(np.float64)
        angles = np.radians(np.arange(-TILT, TILT + 0.01, 0.5))[:, None]
        x, y = hull[None, :, 0], hull[None, :, 1]
        area = np.ptp(x * np.cos(angles) - y * np.sin(angles), axis=1) * np.ptp(x * np.sin(angles) +
                                                                                y * np.cos(angles), axis=1)
        best = float(np.degrees(angles[int(np.argmin(area)), 0]))
        if area.min() > (1 - TILT_GAIN) * area[len(area) // 2]:  # nearly upright already
            best = 0.0
    if abs(best) < 0.25:
        return crop
    h, w = crop.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), -best, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(h * sin + w * cos)), int(np.ceil(h * cos + w * sin))
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    out = cv2.warpAffine(crop, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=255.0)
    ink = out < 254.5
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] if rows.size else crop


def _symmetry_angle(mask: np.ndarray) -> tuple[float, float]:
    """The turn (degrees, within TILT, every half degree) after which the product's mask is most
    mirror-symmetric about an upright line, and how symmetric it is then (intersection over union of the mask
    and its mirror, 0 to 1).

    On a copy of the mask's box SYM pixels long: its pixels are mirrored across the line through their centroid
    at each angle at once, and looked up in the mask (a warp per angle cost ten times as much).
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    scale = SYM / max(box.shape)
    small = cv2.resize(box, (max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA) > 0.5
    ys, xs = np.nonzero(small)
    if ys.size == 0:
        return 0.0, 0.0
    cy, cx = ys.mean(), xs.mean()
    points = np.stack([xs - cx, ys - cy]).astype(np.float32)  # (2, P) about the centroid
    angles = np.arange(-TILT, TILT + 0.01, 0.5)
    t = np.radians(angles)
    line = np.stack([np.sin(t), np.cos(t)], axis=1).astype(np.float32)  # (A, 2): upright turned by each angle
    along = 2 * (line @ points)  # (A, P): twice each point's distance along each line
    pad = small.shape[0] + small.shape[1]  # a mirrored pixel stays this close: no bounds to check
    padded = np.pad(small, pad).ravel()
    mx = (along * line[:, :1] - points[0] + np.float32(cx + pad + 0.5)).astype(np.int32)  # (A, P)
    my = (along * line[:, 1:] - points[1] + np.float32(cy + pad + 0.5)).astype(np.int32)
    both = np.count_nonzero(np.take(padded, my * (small.shape[1] + 2 * pad) + mx), axis=1)
    iou = both / (2 * ys.size - both)
    near = np.flatnonzero(iou >= iou.max() - SYM_TIE)  # as symmetric as the best: the smallest turn of those
    k = int(near[np.argmin(np.abs(angles[near]))])
    return float(angles[k]), float(iou[k])


def _paper_steps(crop: np.ndarray) -> np.ndarray:
    """The paper's steps after the trim, on a dark product on white, (H, W) floats: resize the longest edge to
    28, sharpen, centre on 28x28, negate -> (28, 28) uint8."""
    ch, cw = crop.shape
    scale = SIZE / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    if max(ch, cw) > SIZE:
        small = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float64)
    else:  # enlarged: nearest pixel, as the paper's subsampling would
        ys = np.minimum(((np.arange(nh) + 0.5) * ch / nh).astype(int), ch - 1)
        xs = np.minimum(((np.arange(nw) + 0.5) * cw / nw).astype(int), cw - 1)
        small = crop[ys][:, xs].astype(np.float64)
    small = np.clip(_sharpen(small.reshape(nh, nw, 1))[:, :, 0], 0, 255)
    canvas = np.full((SIZE, SIZE), 255.0)
    top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
    canvas[top:top + nh, left:left + nw] = small
    return np.clip((255.0 - canvas).round(), 0, 255).astype(np.uint8)


_G = np.exp(-np.add.outer(np.arange(-1, 2) ** 2, np.arange(-1, 2) ** 2) / 2.0)  # 3x3 Gaussian, sigma 1
_SHARPEN = -_G.copy()
_SHARPEN[1, 1] = 2 * _G.sum()
_SHARPEN /= _SHARPEN.sum()  # ImageMagick's SharpenImage kernel: about x + 0.83 (x - blur(x))


def _sharpen(a: np.ndarray) -> np.ndarray:
    """3x3 convolution with _SHARPEN over (H, W, C), edges repeated (C up to 4)."""
    return cv2.filter2D(np.asarray(a, np.float64), -1, _SHARPEN, borderType=cv2.BORDER_REPLICATE).reshape(a.shape)


def reframed(pixels: np.ndarray, enlarge: int = 4) -> np.ndarray:
    """A dataset image (28, 28) uint8 as `photo` gives back a photo of it on plain white paper: enlarged `enlarge`
    times, dark on white, trimmed, then the paper's steps (resized by area, sharpened, centred): registered as a
    photo's input is, not as the dataset's images are. evaluate.photo_calibration measures photo views on them."""
    crop = (255 - np.kron(np.asarray(pixels, np.uint8), np.ones((enlarge, enlarge), np.uint8))).astype(np.float32)
    ink = crop < 255 - CONTRAST
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size:
        crop = crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return _paper_steps(crop)


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


def prepare(source: Any, preprocess: str = "auto", max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Any image -> ((28, 28) uint8, the preprocessing applied: "photo" or "dataset"). max_pixels: see open_image."""
    if preprocess not in PREPROCESS:
        raise PredictError(f"unknown preprocessing '{preprocess}'; choose one of {', '.join(PREPROCESS)}.")
    im = open_image(source, max_pixels, grey=True)
    chosen = preprocess if preprocess != "auto" else "dataset" if looks_like_dataset(im) else "photo"
    return (photo(im) if chosen == "photo" else dataset_like(im)), chosen
