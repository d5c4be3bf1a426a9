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
