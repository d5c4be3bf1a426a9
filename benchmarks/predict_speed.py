"""How fast fmnist classifies: in-process inference (PyTorch and onnxruntime) and `fmnist predict` end to end.

    python benchmarks/predict_speed.py [--run RUN_DIR] [--files 10000] [--work DIR]

1. In-process: the default MLP through `Predictor.probabilities` (pixels in,
   probabilities out, normalisation included), batch 1024, images/s as the
   median of 30 calls; and the median latency of one image over 300 calls.
   PyTorch and onnxruntime (the same weights, exported by `fmnist export`'s
   writer) side by side.
2. End to end: `fmnist predict RUN DIR --json` over a directory of N PNG files,
   the median wall time of 3 runs in a fresh process (start-up included), for
   N test images saved as 28x28 PNGs and for the same images rendered as
   product photos (tests/photos.py: 112-336 px objects on a light canvas).
   Where the time goes: decoding, preprocessing and the model, each timed on
   its own in one process over the same files.

Without --run it trains a 2-epoch default MLP on the real data (the weights do
not change the speed). Prints a Markdown table; README.md quotes it.
Measured 2026-11-29 on the 2-core x86_64 VM (no GPU), torch 2.13.0, onnxruntime 1.32.0: see README.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from photos import write_photos  # noqa: E402

from fmnist import data, predict, runs, train  # noqa: E402
from fmnist.config import TrainConfig  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process(run_dir: Path, images: np.ndarray, work: Path) -> list[tuple[str, float, float]]:
    model, _, _ = runs.load_model(run_dir)
    onnx_path = work / "model.onnx"
    from fmnist import models

    predict._write_onnx(models.PixelClassifier(model).eval(), str(onnx_path), list(data.CLASSES), {
        "input": "pixels", "output": "probabilities"})
    rows = []
    batch, one = images[:1024], images[:1]
    for name, p in (("PyTorch", predict.Predictor(run_dir, batch_size=1024)),
                    ("onnxruntime", predict.Predictor(onnx_path, batch_size=1024))):
        per_batch = median_time(lambda p=p: p.probabilities(batch), 30)
        latency = median_time(lambda p=p: p.probabilities(one), 300)
        rows.append((name, 1024 / per_batch, latency * 1000))
    return rows


def end_to_end(run_dir: Path, directory: Path) -> float:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fmnist", "predict", str(run_dir), str(directory), "--json",
                        "--quiet"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stages(run_dir: Path, paths: list[Path]) -> dict[str, float]:
    """Seconds per image of each stage, one process, one core for decoding and preprocessing."""
    t = time.perf_counter()
    decoded = [predict.open_image(p) for p in paths]
    decode = time.perf_counter() - t
    t = time.perf_counter()
    prepared = [predict.photo(im) if not predict.looks_like_dataset(im) else predict.dataset_like(im)
                for im in decoded]
    prep = time.perf_counter() - t
    p = predict.Predictor(run_dir)
    t = time.perf_counter()
    p.probabilities(np.stack(prepared))
    model = time.perf_counter() - t
    n = len(paths)
    return {"decode": decode / n, "preprocess": prep / n, "model": model / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a trained run (default: train a 2-epoch default MLP)")
    ap.add_argument("--files", type=int, default=10_000, help="PNG files per directory (default: 10000)")
    ap.add_argument("--work", help="where to keep the files (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fmnist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.run:
        run_dir = Path(args.run)
    elif (work / "runs" / "bench" / "best.pt").is_file():
        run_dir = work / "runs" / "bench"
    else:
        run_dir = train.fit(TrainConfig(out_dir=str(work / "runs"), name="bench", epochs=2, plots=False)).dir
    x, _ = data.load_split(data.locate(), "test")
    x = np.concatenate([x] * (1 + args.files // len(x)))[: args.files]

    print("## In-process inference, default MLP\n")
    print("| backend | images/s at batch 1024 | single-image latency (median) |")
    print("| --- | ---: | ---: |")
    for name, rate, ms in in_process(run_dir, x, work):
        print(f"| {name} | {rate:,.0f} | {ms:.3f} ms |")

    small, photos = work / "png28", work / "photos"
    if not small.is_dir() or len(list(small.iterdir())) != args.files:
        small.mkdir(exist_ok=True)
        for i, img in enumerate(x):
            Image.fromarray(img).save(small / f"{i:05d}.png")
    if not photos.is_dir() or len(list(photos.iterdir())) != args.files:
        paths = write_photos(photos, x, seed=0)
        for p in paths:  # PNG only, as the benchmark promises: the JPEG renders become PNGs
            if p.suffix != ".png":
                Image.open(p).save(p.with_suffix(".png"))
                p.unlink()
    print(f"\n## `fmnist predict` over {args.files:,} PNG files (median of 3 runs, start-up included)\n")
    print("| files | wall | images/s | decode | preprocess | model (per image, one core) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, directory in (("28x28 test images", small), ("product photos", photos)):
        wall = end_to_end(run_dir, directory)
        s = stages(run_dir, sorted(directory.iterdir()))
        print(f"| {name} | {wall:.1f} s | {args.files / wall:,.0f} | {s['decode'] * 1e6:.0f} us | "
              f"{s['preprocess'] * 1e6:.0f} us | {s['model'] * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
