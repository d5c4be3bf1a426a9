"""Train the shadow segmenter that `preprocess.photo` runs: the product within what is darker than the sheet,
its drop shadow not. Writes src/fmnist/shadow.onnx (read by OpenCV's dnn module, so preprocessing stays
torch-free).

    python benchmarks/shadow_segmenter.py                  # 32,000 pairs, 14 epochs: about 20 minutes on 2 cores
    python benchmarks/shadow_segmenter.py --pairs 2000 --epochs 1 --out /tmp/shadow.onnx   # a quick try

Training images only (the run's training split at the default split seed): each one photographed twice by a
randomised renderer written for this (not the benchmark's, not the tests': they measure it), once with a drop
shadow and once with the same draws and no shadow. The shadows: cast any way round (half of them down and
aside, as a lamp above gives), 1.5-10 % of the product's size away, blurred by 0.5-8 % of it (Gaussian or
box), 15-60 % dark, from the product's soft outline or its hard one; a quarter of the pairs have no shadow at
all, so the network learns to leave a light product whole. The rest varies too: white, grey or unevenly lit
paper, the product's edge from hard to soft, lit by the sheet's light or a lamp's, 0-30 degrees of tilt, a
small product in a big frame, sensor noise, JPEG quality 75-95.

The input is what `photo` decides from: the flattened working copy and its dark mask, the dark region's box
(`preprocess._segment_input`). The target: the product found in the shadowless twin (`preprocess._product`
of its dark mask), within the shadowed photo's dark mask. The network: a three-level U-Net, 8-16-16 channels,
dilated convolutions at the bottom (a receptive field wider than the farthest shadow), about 17,500
weights; binary cross-entropy over the dark pixels, AdamW with a one-cycle schedule, fp32.

Needs torch and onnx (`pip install 'fmnist[onnx]'`), and the dataset.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fmnist import data, preprocess  # noqa: E402


def photograph(pixels: np.ndarray, rng: np.random.Generator, darkness: float) -> Image.Image:
    """One (28, 28) uint8 training image -> an "L" photo of it with a drop shadow `darkness` dark (0: none).
    Every random draw is made whatever `darkness` is, so a twin with 0 differs by its shadow alone."""
    side = int(rng.integers(90, 420))
    interp = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)[int(rng.integers(3))]
    ink = np.clip(cv2.resize(pixels.astype(np.float32) / 255, (side, side), interpolation=interp), 0, 1)
    turn = rng.random() < 0.3
    angle = float(rng.uniform(-12, 12))
    if turn:
        m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
        big = int(side * 1.42) + 2
        m[:, 2] += (big - side) / 2
        ink = cv2.warpAffine(ink, m, (big, big), flags=cv2.INTER_CUBIC)
        rows, cols = np.flatnonzero(ink.max(axis=1) > 0.01), np.flatnonzero(ink.max(axis=0) > 0.01)
        ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    alpha = np.clip(ink * float(rng.choice([3.0, 6.0, 10.0, 20.0, 100.0])), 0, 1)  # the edge, soft to hard
    h, w = ink.shape
    size = max(h, w)
    if rng.random() < 0.2:  # a small product in a big frame
        frame = int(size / rng.uniform(0.15, 0.35))
        height, width = frame, int(frame * rng.uniform(0.75, 1.34))
    else:
        height, width = h + int(rng.integers(30, 400)), w + int(rng.integers(30, 400))
    height, width = max(height, h + 14), max(width, w + 14)
    top, left = int(rng.integers(7, height - h - 6)), int(rng.integers(7, width - w - 6))
    level = 255.0 if rng.random() < 0.5 else float(rng.uniform(195, 250))
    sheet = np.full((height, width), level, np.float32)
    uneven, a, fall = rng.random() < 0.25, rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
    if uneven:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx - width / 2) * np.cos(a) + (yy - height / 2) * np.sin(a)
        sheet *= (1 - fall * (t - t.min()) / max(float(np.ptp(t)), 1.0)).astype(np.float32)
    lit = sheet.copy()
    way = rng.uniform(0, 2 * np.pi) if rng.random() < 0.5 else rng.uniform(0.15 * np.pi, 0.85 * np.pi)
    far = rng.uniform(0.015, 0.10) * size
    soft_outline, blur, gaussian = rng.random() < 0.7, size * rng.uniform(0.005, 0.08), rng.random() < 0.7
    if darkness > 0:
        dy, dx = int(round(np.sin(way) * far)), int(round(np.cos(way) * far))
        y0, x0 = int(np.clip(top + dy, 0, height - h)), int(np.clip(left + dx, 0, width - w))
        shade = np.zeros((height, width), np.float32)
        shade[y0:y0 + h, x0:x0 + w] = alpha if soft_outline else (ink > 0.03).astype(np.float32)
        if gaussian:
            shade = cv2.GaussianBlur(shade, (0, 0), max(blur, 0.3))
        else:
            k = max(1, int(blur * 2.5)) | 1
            shade = cv2.blur(shade, (k, k))
        sheet = sheet * (1 - darkness * shade)
    light = lit[top:top + h, left:left + w] if rng.random() < 0.5 else np.full((h, w), level, np.float32)
    tone = (1 - rng.uniform(0.85, 0.95) * ink) * light
    out = sheet.copy()
    place = (slice(top, top + h), slice(left, left + w))
    out[place] = alpha * tone + (1 - alpha) * out[place]
    out += rng.normal(0, rng.uniform(0.5, 5), out.shape).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "L")


def _found(im: Image.Image, quality: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A photo through JPEG and `photo`'s first steps: (the flattened working copy, its dark mask)."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    g = np.asarray(preprocess.open_image(buf.getvalue(), grey=True).convert("L"))
    found = preprocess._flattened(g)
    return None if found is None else (found[3], found[4])


def pairs(job: tuple[np.ndarray, int, np.ndarray]) -> np.ndarray:
    """Training pairs for some of the images: (n, 3, SEG_SIDE, SEG_SIDE) float16, the segmenter's two input
    channels and the target (the shadowless twin's product within the shadowed photo's dark mask)."""
    picks, seed, images = job  # the images of `picks` alone (not the whole split: each job is pickled to a worker)
    out = []
    for i, pixels in zip(picks, images):
        rng = np.random.default_rng([seed, int(i)])
        darkness = float(rng.uniform(0.15, 0.6)) if rng.random() < 0.75 else 0.0
        quality = int(rng.integers(75, 96))
        state = rng.bit_generator.state
        twins = []
        for d in (darkness, 0.0):
            rng.bit_generator.state = state
            twins.append(_found(photograph(pixels, rng, d), quality))
        (shadowed, clean) = twins
        if shadowed is None or clean is None or shadowed[0].shape != clean[0].shape or not shadowed[1].any():
            continue
        flat, dark = shadowed
        x, (r0, r1, c0, c1), (nh, nw) = preprocess._segment_input(flat, dark)
        target = np.zeros((preprocess.SEG_SIDE, preprocess.SEG_SIDE), np.float32)
        product = (preprocess._product(clean[1]) & dark)[r0:r1, c0:c1].astype(np.float32)
        target[:nh, :nw] = cv2.resize(product, (nw, nh), interpolation=cv2.INTER_AREA)
        out.append(np.concatenate([x[0], target[None]]).astype(np.float16))
    return np.stack(out)


def network():
    """The segmenter: a three-level U-Net on (N, 2, S, S) -> (N, S, S) logits (product or not)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def conv(i: int, o: int, dilation: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self, a: int = 8, b: int = 16) -> None:
            super().__init__()
            self.e1 = nn.Sequential(conv(2, a), conv(a, a))
            self.e2 = nn.Sequential(conv(a, b), conv(b, b))
            self.e3 = nn.Sequential(conv(b, b), conv(b, b, 2), conv(b, b, 4))
            self.d2 = conv(2 * b, b)
            self.d1 = conv(b + a, a)
            self.out = nn.Conv2d(a, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1 = self.e1(x)
            x2 = self.e2(F.max_pool2d(x1, 2))
            x3 = self.e3(F.max_pool2d(x2, 2))
            y = self.d2(torch.cat([F.interpolate(x3, scale_factor=2.0), x2], 1))
            y = self.d1(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1))
            return self.out(y)[:, 0]

    return UNet()


def train(g: np.ndarray, epochs: int, seed: int) -> tuple[object, dict]:
    """Fit the network to the pairs (the last 1,000 held out): the network, and intersection over union of its
    masks and of the dark masks with the targets on the held-out pairs."""
    import torch
    from torch.nn import functional as F

    torch.manual_seed(seed)
    g = torch.from_numpy(g.astype(np.float32))
    fit, held = g[:-1000], g[-1000:]
    net = network()
    batch = 64
    steps = epochs * (len(fit) // batch)
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)

    def loss(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, within = net(b[:, :2]), b[:, 1] > 0.5
        each = F.binary_cross_entropy_with_logits(logits, (b[:, 2] > 0.5).float(), reduction="none")
        return (each * within).sum() / within.sum().clamp(min=1), logits

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a & b).sum((1, 2)).float() / (a | b).sum((1, 2)).clamp(min=1)).mean())

    for epoch in range(epochs):
        start = time.perf_counter()
        net.train()
        order = torch.randperm(len(fit))
        for i in range(len(fit) // batch):
            b = fit[order[i * batch:(i + 1) * batch]]
            if torch.rand(()) < 0.5:  # mirrored: a shadow may fall either way
                b = b.flip(-1)
            value, _ = loss(b)
            opt.zero_grad()
            value.backward()
            opt.step()
            schedule.step()
        net.eval()
        with torch.no_grad():
            value, logits = loss(held)
        within, target = held[:, 1] > 0.5, held[:, 2] > 0.5
        scores = {"loss": float(value), "iou": iou((logits > 0) & within, target), "iou_dark": iou(within, target)}
        print(f"epoch {epoch + 1}/{epochs}: held-out loss {scores['loss']:.4f}, intersection over union "
              f"{scores['iou']:.4f} (the dark mask itself: {scores['iou_dark']:.4f}), "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return net, scores


def export(net, path: Path) -> None:
    """The network as ONNX (opset 17, the TorchScript-based exporter: plain Conv, MaxPool, Resize, Concat that
    OpenCV's dnn reads), checked against torch before it replaces `path`."""
    import torch

    side = preprocess.SEG_SIDE
    example = torch.rand(1, 2, side, side)
    tmp = path.with_name(path.name + ".tmp")
    torch.onnx.export(net.eval(), (example,), str(tmp), input_names=["x"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    reader = cv2.dnn.readNetFromONNX(str(tmp))
    reader.setInput(example.numpy())
    with torch.no_grad():
        gap = float(np.abs(reader.forward().reshape(side, side) - net(example)[0].numpy()).max())
    if gap > 1e-3:
        tmp.unlink()
        raise SystemExit(f"the exported segmenter differs from torch's by {gap:.2g}: not written.")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32000, help="photo pairs to render (default 32,000)")
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=preprocess.SEGMENTER, help="default: src/fmnist/shadow.onnx")
    args = ap.parse_args()
    x = data.load(data.locate()).train[0].numpy()  # the default split's training images: never validation or test
    picks = np.random.default_rng(args.seed).permutation(len(x))[:args.pairs]
    start = time.perf_counter()
    with Pool(args.workers) as pool:
        g = np.concatenate(pool.map(pairs, [(part, args.seed, x[part]) for part in np.array_split(picks, 32)]))
    print(f"{len(g)} pairs rendered in {time.perf_counter() - start:.0f} s", flush=True)
    net, _ = train(g, args.epochs, args.seed)
    export(net, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
