"""The usual tutorial pipeline, written here as the speed baseline.

A per-sample `Dataset` that turns each image into a PIL image, flips it at
random, converts it to a tensor and normalises it (what torchvision's
RandomHorizontalFlip + ToTensor + Normalize do), served by a `DataLoader` with
batch size 64, shuffled, in the main process, and a plain training loop.
The model and the optimiser are the same as fmnist's default.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fmnist import data


class TutorialFashionMNIST(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool):
        self.images, self.labels, self.train = images, labels, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L")
        if self.train and torch.rand(1).item() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
        x = (x - data.MEAN) / data.STD
        return x, int(self.labels[i])


def loaders(splits: data.Splits, batch_size: int = 64):
    tr = TutorialFashionMNIST(splits.train[0].numpy(), splits.train[1].numpy(), train=True)
    va = TutorialFashionMNIST(splits.val[0].numpy(), splits.val[1].numpy(), train=False)
    return (torch.utils.data.DataLoader(tr, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(va, batch_size=1000))


def train_epoch(model, loader, opt) -> float:
    """Seconds for one epoch of the tutorial loop."""
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def val_accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total
