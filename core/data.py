"""Data sets and loaders for training: imagefolder, cifar10/cifar100, digits, synthetic.

Every data set yields `(image (3, H, W) float32 normalized, label int)`:

* `imagefolder`: ImageNet layout `data_root/train/<class>/*.jpg`, `data_root/val/<class>/*`;
  RandomResizedCrop + flip for training, resize + center crop for validation (image_size, 224).
* `cifar10` / `cifar100`: torchvision's readers under `data_root`; downloaded only when
  `download=True`; random crop (pad 4) + flip for training. 32 px.
* `digits`: scikit-learn's bundled handwritten digits (1797 images of 8x8, no download),
  bilinearly upscaled to 32 px, grey copied to 3 channels, a fixed stratified 80/20 split
  (1437 train / 360 val, independent of the run's seed); random translation by up to 2 px for
  training (no flips: digits are not mirror-symmetric).
* `synthetic`: seeded, class-dependent images of any size and count, drawn on the fly per index
  (a smooth class prototype plus per-image noise), for throughput tests and smoke runs.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from core import names

DATASETS = names.DATASETS

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class DatasetError(ValueError):
    """A data set that cannot be opened as asked (missing files, bad option); the message says where it looked."""


@dataclass
class DataInfo:
    name: str
    num_classes: int
    image_size: int
    train_size: int
    val_size: int


class TensorImages(Dataset):
    """In-memory images `(N, 3, S, S)` (already normalized) with labels and an optional random shift."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0) -> None:
        self.images, self.labels, self.shift = images, labels, int(shift)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.shift:
            # Random translation by up to `shift` px; replicate-padding continues the blank background.
            s = self.shift
            padded = F.pad(img[None], (s, s, s, s), mode="replicate")[0]
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            img = padded[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
        return img, int(self.labels[i])


def _digits(image_size: int) -> tuple[TensorImages, TensorImages, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_val = train_test_split(range(len(y)), test_size=0.2, random_state=0,
                                          stratify=bunch.target)
    mean, std = x[idx_train].mean().item(), x[idx_train].std().item()  # statistics of the training split
    x = ((x - mean) / std).contiguous()
    shift = max(1, image_size // 16)
    return (TensorImages(x[idx_train], y[idx_train], shift=shift),
            TensorImages(x[idx_val], y[idx_val], shift=0), 10)


class SyntheticImages(Dataset):
    """`size` seeded images of `image_size` px in `num_classes` classes, generated per index.

    Class `c` has a smooth prototype (8x8 Gaussian noise, bilinearly upscaled); image `i` has
    label `i % num_classes` and is its prototype plus white noise of std `noise`, drawn from a
    generator seeded by `(seed, split, i)`, so an index always gives the same image.
    """

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int, split: str,
                 noise: float = 1.0) -> None:
        self.size, self.image_size, self.num_classes = int(size), int(image_size), int(num_classes)
        self.seed, self.split, self.noise = int(seed), split, float(noise)
        g = torch.Generator().manual_seed(zlib.crc32(f"synthetic-prototypes:{seed}".encode()))
        self.prototypes = torch.randn(num_classes, 3, 8, 8, generator=g)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        label = i % self.num_classes
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.split}:{i}".encode()))
        proto = F.interpolate(self.prototypes[label][None], size=(self.image_size,) * 2,
                              mode="bilinear", align_corners=False)[0]
        return proto + self.noise * torch.randn(proto.shape, generator=g), label


def _cifar(name: str, root: Path, download: bool) -> tuple[Dataset, Dataset, int]:
    import torchvision
    from torchvision import transforms as T

    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if not download and not (root / folder).is_dir():
        raise DatasetError(f"dataset {name}: not found at {root / folder} (data_root={str(root)!r}); "
                           "set download=true (CLI: --download) to fetch it, or point data_root at it")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.ToTensor(), norm])
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        val = cls(str(root), train=False, transform=val_tf, download=download)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise DatasetError(f"dataset {name}: cannot read {root / folder}: {exc}") from None
    return train, val, 10 if name == "cifar10" else 100


def _imagefolder(root: Path, image_size: int) -> tuple[Dataset, Dataset, int]:
    import torchvision
    from torchvision import transforms as T

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"dataset imagefolder: no folder {root / split} (data_root={str(root)!r}); "
                               "expected data_root/train/<class>/* and data_root/val/<class>/*")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(int(math.ceil(image_size / 0.875))), T.CenterCrop(image_size),
                        T.ToTensor(), norm])
    train = torchvision.datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val = torchvision.datasets.ImageFolder(str(root / "val"), transform=val_tf)
    if train.classes != val.classes:
        raise DatasetError(f"dataset imagefolder: train/ and val/ under {root} have different class folders")
    return train, val, len(train.classes)


def build_datasets(name: str, *, data_root: str | os.PathLike = "data", image_size: int | None = None,
                   download: bool = False, seed: int = 0, num_classes: int | None = None,
                   synthetic_train_size: int = 1024, synthetic_val_size: int = 256,
                   ) -> tuple[Dataset, Dataset, DataInfo]:
    """`(train, val, info)` for data set `name` (one of DATASETS).

    image_size: output side in px (default 32 for cifar/digits/synthetic, 224 for imagefolder;
    cifar is always 32). seed and num_classes (default 10) and the two sizes apply to synthetic.
    """
    if name not in DATASETS:
        raise DatasetError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    root = Path(data_root).expanduser()
    if name in ("cifar10", "cifar100"):
        if image_size not in (None, 32):
            raise DatasetError(f"image_size: {name} images are 32 px, got {image_size}")
        train, val, n_cls = _cifar(name, root, download)
        size = 32
    elif name == "imagefolder":
        size = image_size or 224
        train, val, n_cls = _imagefolder(root, size)
    elif name == "digits":
        size = image_size or 32
        train, val, n_cls = _digits(size)
    else:
        size = image_size or 32
        n_cls = num_classes or 10
        if synthetic_train_size < 1 or synthetic_val_size < 1:
            raise DatasetError("synthetic_train_size and synthetic_val_size must be >= 1")
        train = SyntheticImages(synthetic_train_size, size, n_cls, seed, "train")
        val = SyntheticImages(synthetic_val_size, size, n_cls, seed, "val")
    if num_classes is not None and name != "synthetic" and num_classes != n_cls:
        raise DatasetError(f"num_classes: {name} has {n_cls} classes, got num_classes={num_classes}")
    return train, val, DataInfo(name=name, num_classes=n_cls, image_size=size,
                                train_size=len(train), val_size=len(val))
