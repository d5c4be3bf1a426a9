"""Does `fmnist predict` find the product in photos as people take them? Test images photographed under each
condition, classified through the Predictor, against the same images given raw.

    python benchmarks/photo_accuracy.py RUN_DIR [--images 500] [--conditions white,grey,...] [--no-straighten]
    python benchmarks/photo_accuracy.py --speed   # decode + preprocess time per photo, on one core

The renderer here is the benchmark's own, apart from tests/photos.py (on which the pipeline was tried while it
was built): each 28x28 test image becomes a product of 140-420 px (Lanczos), composited with a soft alpha
(its own intensity) onto a sheet of 300-900 px under a slightly warm or cool white balance, saved as a JPEG of
quality 80-95 (what a phone gives). Conditions: a white studio sheet; a small product (15-30 % of the frame);
a soft drop shadow (offset 3-8 %, blurred 3-7 % of the product's size, 30-50 % dark); grey paper (200-235);
a tilt of up to 12 degrees either way; sensor noise (sigma 6 in each channel); light falling off across the
sheet from 250 to 200 (a cosine ramp in any direction); a light product on a dark table (15-60, textured).

The photos go through `Predictor.predict` (preprocess auto, as `fmnist predict`), and each condition's accuracy
is printed beside the raw images' accuracy on the same test images, with the expected calibration error of
the answers (15 bins). `--no-straighten` turns preprocess's
straightening off, to measure what it does. Measured results, the command and the machine: RESULTS.md, Photos.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CONDITIONS = ("white", "small", "shadow", "grey", "tilt", "noise", "uneven", "dark")


def photograph(pixels: np.ndarray, condition: str, rng: np.random.Generator) -> Image.Image:
    """One (28, 28) uint8 test image -> an "RGB" photo of it under `condition`."""
    side = int(rng.integers(140, 421))
    ink = cv2.resize(pixels.astype(np.float32) / 255, (side, side), interpolation=cv2.INTER_LANCZOS4).clip(0, 1)
    alpha = np.clip(ink * 10, 0, 1)  # opaque where the product is, soft at its edge
    if condition == "tilt":
        angle = float(rng.uniform(-12, 12))
        m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
        big = int(side * 1.42) + 2
        m[:, 2] += (big - side) / 2
        ink = cv2.warpAffine(ink, m, (big, big), flags=cv2.INTER_CUBIC)
        alpha = cv2.warpAffine(alpha, m, (big, big), flags=cv2.INTER_LINEAR)
        rows, cols = np.flatnonzero(alpha.max(axis=1) > 0.01), np.flatnonzero(alpha.max(axis=0) > 0.01)
        ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        alpha = alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = ink.shape
    if condition == "small":
        frame = int(max(h, w) / rng.uniform(0.15, 0.30))
        height, width = frame, int(frame * rng.uniform(0.75, 1.34))
    else:
        height, width = h + int(rng.integers(30, 480)), w + int(rng.integers(30, 480))
    height, width = max(height, h + 12), max(width, w + 12)
    top, left = int(rng.integers(6, height - h - 5)), int(rng.integers(6, width - w - 5))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if condition == "grey":
        sheet = np.full((height, width), float(rng.uniform(200, 235)), np.float32)
    elif condition == "uneven":  # 250 on one side of the sheet to 200 on the other, in a cosine ramp
        a = rng.uniform(0, 2 * np.pi)
        t = (xx - width / 2) * np.cos(a) + (yy - height / 2) * np.sin(a)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        sheet = 200 + 50 * (0.5 + 0.5 * np.cos(np.pi * t))
    elif condition == "dark":  # a table: dark, with a little grain
        sheet = float(rng.uniform(15, 60)) + cv2.GaussianBlur(rng.normal(0, 3, (height, width)).astype(np.float32),
                                                                (0, 0), 2)
    else:
        sheet = np.full((height, width), 255.0, np.float32)
    place = (slice(top, top + h), slice(left, left + w))
    if condition == "shadow":
        size = max(h, w)
        shadow = np.zeros((height, width), np.float32)
        dy, dx = (int(size * rng.uniform(0.03, 0.08)) * rng.choice([-1, 1]) for _ in range(2))
        dy = abs(dy)  # light from above: the shadow falls below
        y0, x0 = np.clip(top + dy, 0, height - h), np.clip(left + dx, 0, width - w)
        shadow[y0:y0 + h, x0:x0 + w] = alpha
        shadow = cv2.GaussianBlur(shadow, (0, 0), size * rng.uniform(0.03, 0.07))
        sheet = sheet * (1 - float(rng.uniform(0.3, 0.5)) * shadow)
    if condition == "dark":  # a light product: as bright as the test image, lit like the table
        tone = sheet[place] + ink * (245 - sheet[place])
    else:  # a dark product: its reflectance, under the sheet's light
        tone = (1 - 0.92 * ink) * (sheet[place] if condition in ("grey", "uneven") else 255)
    out = sheet.copy()
    out[place] = alpha * tone + (1 - alpha) * sheet[place]
    rgb = out[:, :, None] * np.array([1.0, 1.0, 1.0], np.float32) + rng.uniform(-5, 5, 3).astype(np.float32)
    if condition == "noise":
        rgb += rng.normal(0, 6, rgb.shape).astype(np.float32)
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), "RGB")


def write(directory: Path, images: np.ndarray, condition: str, seed: int) -> list[Path]:
    rng = np.random.default_rng([seed, CONDITIONS.index(condition)])
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(images):
        path = directory / f"{i:05d}.jpg"
        photograph(pixels, condition, rng).save(path, format="JPEG", quality=int(rng.integers(80, 96)))
        paths.append(path)
    return paths


def cpu() -> str:
    from fmnist import devices

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    return f"{name}, {devices.instruction_set()}, {os.cpu_count()} cores"


def speed(repeats: int) -> None:
    """Decode + preprocess time per photo on one core (this process pinned to one CPU), for the sizes a phone
    gives: its camera's JPEG (12 MP), one shared through a messenger (1600x1200) and a smaller one. CPU time
    (this thread's: what the work costs a core) and wall time (what it took, other jobs on that core included)."""
    from fmnist import data, preprocess

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rng = np.random.default_rng(0)
    x, _ = data.load_split(data.locate(), "test")
    print(f"CPU: {cpu()}; one core; median over {repeats} photos each; load average {os.getloadavg()[0]:.1f}\n")
    print("| photo | file | decode (CPU) | preprocess (CPU) | total CPU | total wall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (width, height, quality) in {"phone camera 4032x3024 JPEG": (4032, 3024, 90),
                                           "shared 1600x1200 JPEG": (1600, 1200, 85),
                                           "1024x768 JPEG": (1024, 768, 85)}.items():
        decode, prep, wall, sizes = [], [], [], []
        for i in range(repeats):
            im = photograph(x[i], CONDITIONS[i % len(CONDITIONS)], rng).resize((width, height), Image.BICUBIC)
            noisy = np.asarray(im, np.float32) + rng.normal(0, 3, (height, width, 3)).astype(np.float32)
            out = io.BytesIO()
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
            raw = out.getvalue()
            sizes.append(len(raw))
            w0, t0 = time.perf_counter(), time.thread_time()
            opened = preprocess.open_image(raw, grey=True)  # as prepare(raw) decodes it: a JPEG's luma only
            t1 = time.thread_time()
            preprocess.prepare(opened)
            t2, w2 = time.thread_time(), time.perf_counter()
            decode.append(t1 - t0)
            prep.append(t2 - t1)
            wall.append(w2 - w0)
        d, p, w = (statistics.median(v) * 1e3 for v in (decode, prep, wall))
        print(f"| {name} | {statistics.median(sizes) / 2**20:.1f} MiB | {d:.1f} ms | {p:.1f} ms | {d + p:.1f} ms "
              f"| {w:.1f} ms |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", help="a trained run directory")
    ap.add_argument("--images", type=int, default=500, help="test images per condition (default: 500)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="which conditions (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="the renderer's seed (default: 0)")
    ap.add_argument("--split", choices=("test", "validation"), default="test",
                    help="whose images: the test split (to report) or the run's validation split (to choose on)")
    ap.add_argument("--no-straighten", action="store_true", help="preprocess without straightening a tilt")
    ap.add_argument("--work", help="where to write the photos (default: a temporary folder)")
    ap.add_argument("--speed", action="store_true", help="measure decode + preprocess time instead")
    ap.add_argument("--repeats", type=int, default=40, help="photos per size for --speed (default: 40)")
    args = ap.parse_args()
    if args.speed:
        speed(args.repeats)
        return
    if not args.run:
        ap.error("give a run directory (or --speed)")
    from fmnist import data, predict, preprocess, runs

    if args.no_straighten:
        preprocess.STRAIGHTEN = False  # the workers are forked: they see it too
    run_dir = Path(args.run)
    cfg = runs.read_config(run_dir)
    if args.split == "test":
        x, y = data.load_split(data.locate(runs.data_dir_for(cfg.data_dir, None)), "test")
    else:
        splits = data.load(runs.data_dir_for(cfg.data_dir, None), cfg.val_size, cfg.split_seed)
        x, y = (t.numpy() for t in splits.val)
    pick = np.random.default_rng(args.seed).permutation(len(y))[: args.images]
    x, y = x[pick], y[pick]
    p = predict.Predictor(run_dir)
    raw_probs = p.probabilities(x)
    raw = raw_probs.argmax(1) == y
    work = Path(args.work or tempfile.mkdtemp(prefix="fmnist-photos-"))
    print(f"{len(y)} {args.split} images per condition, model {run_dir}; CPU: {cpu()}")
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| condition | accuracy through Predictor | against raw | ECE (15 bins) | chosen |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(f"| raw 28x28 {args.split} images | {raw.mean():.1%} | | {ece(raw_probs, y):.1%} | |")
    for condition in args.conditions.split(","):
        paths = write(work / condition, x, condition, args.seed)
        recs = p.predict(paths, preprocess="auto", top_k=len(p.classes))
        right = np.array([r.get("index", -1) for r in recs]) == y
        probs = np.array([[{t["label"]: t["probability"] for t in r["top"]}[c] for c in p.classes] for r in recs])
        chosen = {c: sum(r.get("preprocess") == c for r in recs) for c in ("photo", "dataset")}
        shown = ", ".join(f"{k} {v}" for k, v in chosen.items() if v)
        print(f"| {condition} | {right.mean():.1%} | {100 * (right.mean() - raw.mean()):+.1f} | "
              f"{ece(probs, y):.1%} | {shown} |", flush=True)


def ece(probs: np.ndarray, labels: np.ndarray) -> float:
    """Expected calibration error (15 bins) of the answers as predict gives them (calibrated probabilities)."""
    import torch

    from fmnist import calibrate

    return calibrate.calibration_error(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels))


if __name__ == "__main__":
    main()
