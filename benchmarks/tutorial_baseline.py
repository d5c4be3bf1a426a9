"""The usual tutorial pipeline, written here as the speed baseline.

What PyTorch's own Fashion-MNIST quickstart and most course notebooks do:
torchvision's `FashionMNIST` Dataset (each item made a PIL image), the
transforms RandomHorizontalFlip, ToTensor and Normalize applied per sample,
and a `DataLoader` with batch size 64, shuffled, in the main process, for
training and for evaluation. torchvision itself is not a dependency of
fmnist, so its per-sample steps are re-created here operation for operation.
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
        img = Image.fromarray(self.images[i], mode="L")  # torchvision.datasets.FashionMNIST
        if self.train and torch.rand(1) < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))  # ToTensor
        x = x.view(img.size[1], img.size[0], 1).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        mean = torch.as_tensor([data.MEAN], dtype=x.dtype)  # Normalize
        std = torch.as_tensor([data.STD], dtype=x.dtype)
        x = x.sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))
        return x, int(self.labels[i])


def loaders(splits: data.Splits, batch_size: int = 64):
    tr = TutorialFashionMNIST(splits.train[0].numpy(), splits.train[1].numpy(), train=True)
    va = TutorialFashionMNIST(splits.val[0].numpy(), splits.val[1].numpy(), train=False)
    return (torch.utils.data.DataLoader(tr, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(va, batch_size=batch_size))


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


class TutorialCNN(torch.nn.Module):
    """The convnet of the common Fashion-MNIST CNN tutorials: two conv-BN-ReLU-pool layers, then
    600 -> 120 -> 10 fully connected with dropout; trained with Adam at 1e-3 on the loaders above."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.layer1 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(64 * 6 * 6, 600)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(600, 120)
        self.fc3 = nn.Linear(120, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(x)).flatten(1)
        return self.fc3(self.fc2(self.drop(self.fc1(x))))
