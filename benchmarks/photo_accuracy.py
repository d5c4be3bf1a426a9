"""Does the photo pipeline keep a model's accuracy? The test set as product photos, through `fmnist predict`.

    python benchmarks/photo_accuracy.py RUN_DIR [--images 10000] [--work DIR]

Renders the first N test images as product photos (tests/photos.py: inverted
to a light background, enlarged 4-12x with bicubic smoothing, off-centre on a
larger canvas, a third each JPEG, PNG and PNG with a transparent background),
classifies the folder with `fmnist predict RUN_DIR --json`, and prints the
accuracy next to the same model's accuracy on the raw 28x28 test images, for
each kind of file, and for the usual tutorial recipe instead of the paper's
pipeline (greyscale, invert, resize the whole photo to 28x28).
Measured 2026-11-29 on the 2-core VM with the default MLP (seed 0): see README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from photos import write_photos  # noqa: E402

from fmnist import data, predict, runs  # noqa: E402


def classify(run_dir: Path, directory: Path, preprocess: str) -> list[dict]:
    """`fmnist predict --json` in its own process, as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "fmnist", "predict", str(run_dir), str(directory), "--json",
                          "--quiet", "--preprocess", preprocess], check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a trained run directory")
    ap.add_argument("--images", type=int, default=10_000, help="test images to render (default: all 10000)")
    ap.add_argument("--work", help="where to write the photos (default: a temporary folder)")
    args = ap.parse_args()
    run_dir = Path(args.run)
    cfg = runs.read_config(run_dir)
    x, y = data.load_split(data.locate(runs.data_dir_for(cfg.data_dir, None)), "test")
    x, y = x[: args.images], y[: args.images]
    work = Path(args.work or tempfile.mkdtemp(prefix="fmnist-photos-"))
    paths = write_photos(work / "photos", x, seed=0)
    raw = predict.Predictor(run_dir).probabilities(x).argmax(1) == y
    print(f"{len(y):,} test images, model {run_dir}\n")
    print("| input | accuracy |")
    print("| --- | ---: |")
    print(f"| raw 28x28 test images | {raw.mean():.2%} |")
    kind = np.array([".jpg" if p.suffix == ".jpg" else "alpha" if b"tRNS" in p.read_bytes()[:200] or
                     p.read_bytes()[25] == 6 else ".png" for p in paths])  # PNG colour type 6: RGBA
    recs = classify(run_dir, work / "photos", "photo")
    right = np.array([r.get("index") for r in recs]) == y
    print(f"| photos, `fmnist predict` (the paper's pipeline) | {right.mean():.2%} |")
    for k, name in ((".jpg", "JPEG"), (".png", "PNG"), ("alpha", "PNG with transparency")):
        print(f"| ... {name} only ({(kind == k).sum():,}) | {right[kind == k].mean():.2%} |")
    naive = np.stack([np.asarray(ImageOps.invert(predict.open_image(p).convert("L")).resize((28, 28)))
                      for p in paths])
    right = predict.Predictor(run_dir).probabilities(naive).argmax(1) == y
    print(f"| photos, tutorial recipe (greyscale, invert, resize to 28x28) | {right.mean():.2%} |")


if __name__ == "__main__":
    main()
