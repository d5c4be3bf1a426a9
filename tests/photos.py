"""Fashion-MNIST test images rendered as product photos: the kind of file a user brings to `fmnist predict`.

Each 28x28 image is inverted to a dark product on a light background, enlarged
4 to 12 times with bicubic smoothing, placed off-centre on a larger light
canvas, and saved as JPEG or PNG; some PNGs have a transparent background
instead. Used by the tests and by benchmarks/predict_speed.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def render(pixels: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """One (28, 28) uint8 dataset image -> (file bytes, suffix): a JPEG, a PNG, or a PNG with alpha."""
    side = int(rng.integers(4, 13)) * 28
    product = Image.fromarray(255 - pixels, "L").resize((side, side), Image.Resampling.BICUBIC)
    width, height = side + int(rng.integers(20, 200)), side + int(rng.integers(20, 200))
    left, top = int(rng.integers(5, width - side - 5)), int(rng.integers(5, height - side - 5))
    kind = ("jpeg", "png", "alpha")[int(rng.integers(3))]
    out = io.BytesIO()
    if kind == "alpha":  # the product opaque, the rest transparent (a cut-out)
        rgba = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        alpha = Image.fromarray(np.where(np.asarray(product) < 250, 255, 0).astype(np.uint8), "L")
        rgba.paste(Image.merge("RGBA", (product, product, product, alpha)), (left, top))
        rgba.save(out, format="PNG")
        return out.getvalue(), ".png"
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(product.convert("RGB"), (left, top))
    if kind == "jpeg":
        canvas.save(out, format="JPEG", quality=int(rng.integers(80, 96)))
        return out.getvalue(), ".jpg"
    canvas.save(out, format="PNG")
    return out.getvalue(), ".png"


def write_photos(directory: Path, images: np.ndarray, seed: int = 0) -> list[Path]:
    """Render every image into `directory` as 00000.jpg, 00001.png, ...; the paths, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, pixels in enumerate(images):
        raw, suffix = render(pixels, rng)
        path = directory / f"{i:05d}{suffix}"
        path.write_bytes(raw)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- photos as people take them

CONDITIONS = ("white", "small", "shadow", "grey", "tilt", "noise", "uneven", "dark")


def photograph(pixels: np.ndarray, condition: str, rng: np.random.Generator) -> Image.Image:
    """One (28, 28) uint8 dataset image -> an "RGB" photo of the product under one condition.

    The product (the image inverted, a dark object on white) is enlarged 4-12x and pasted where it is not
    blank; the sheet around it is lit by `light` (a level per pixel). white: a white studio sheet; small: the
    product a quarter to a third of the frame; shadow: a soft drop shadow beside it; grey: grey paper
    (200-235); tilt: turned by up to 12 degrees; noise: sensor noise (sigma 6); uneven: light falling off
    across the sheet (250 to 200, any direction); dark: a light product (the image as it is) on a dark
    table (20-70). A renderer for the tests and for tuning: benchmarks/photo_accuracy.py has its own.
    """
    side = int(rng.integers(4, 13)) * 28
    dark = condition == "dark"
    ink = Image.fromarray(pixels, "L").resize((side, side), Image.Resampling.BICUBIC)  # product "darkness"
    if condition == "tilt":
        angle = float(rng.uniform(4, 12)) * (1 if rng.random() < 0.5 else -1)
        ink = ink.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    ink = np.asarray(ink, np.float64)
    h, w = ink.shape
    margin = (lambda: int(rng.integers(3 * max(h, w) // 2, 3 * max(h, w)))) if condition == "small" else \
        (lambda: int(rng.integers(20, 200)))
    height, width = h + margin(), w + margin()
    top, left = int(rng.integers(5, height - h - 5)), int(rng.integers(5, width - w - 5))
    yy, xx = np.mgrid[0:height, 0:width]
    if condition == "grey":
        light = np.full((height, width), float(rng.integers(200, 236)))
    elif condition == "uneven":
        a = rng.uniform(0, 2 * np.pi)
        t = (xx - width / 2) * np.cos(a) + (yy - height / 2) * np.sin(a)
        t = (t - t.min()) / (np.ptp(t) or 1)
        light = 250 - 50 * t
    elif condition == "dark":
        light = np.full((height, width), float(rng.integers(20, 71)))
    else:
        light = np.full((height, width), 255.0)
    sheet = light.copy()
    if condition == "shadow":  # the product's outline, blurred, moved down and aside, darkening the sheet
        blur = max(h, w) / 25
        pad = int(3 * blur) + 1
        mask = Image.fromarray(np.pad((ink > 8).astype(np.uint8) * 255, pad), "L")
        from PIL import ImageFilter

        shade = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), np.float64) / 255
        dy, dx = (int(v) for v in rng.integers(max(h, w) // 30, max(h, w) // 12, 2))
        big = np.zeros((height + 2 * pad, width + 2 * pad))
        big[top + dy:top + dy + h + 2 * pad, left + dx:left + dx + w + 2 * pad] = shade[:height + 2 * pad - top - dy,
                                                                                       :width + 2 * pad - left - dx]
        sheet *= 1 - float(rng.uniform(0.25, 0.45)) * big[pad:pad + height, pad:pad + width]
    out = sheet
    region = out[top:top + h, left:left + w]
    if dark:  # a light product: its own brightness, lit like the table
        product = light[top:top + h, left:left + w] + ink / 255 * (235 - light[top:top + h, left:left + w])
    else:
        product = (255 - ink) * light[top:top + h, left:left + w] / 255
    region[ink > 8] = product[ink > 8]
    if condition == "noise":
        out = out[:, :, None] + rng.normal(0, 6, (height, width, 3))
    else:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()
