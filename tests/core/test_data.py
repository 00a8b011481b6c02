"""Data sets: digits split and shapes, synthetic determinism, clear errors for missing data, imagefolder."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from core.data import DatasetError, build_datasets


def test_digits_is_a_fixed_stratified_split_of_32px_rgb_images():
    train, val, info = build_datasets("digits")
    assert (info.num_classes, info.image_size, info.train_size, info.val_size) == (10, 32, 1437, 360)
    x, y = val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    counts = Counter(int(val.labels[i]) for i in range(len(val)))
    assert min(counts.values()) >= 35 and max(counts.values()) <= 37  # stratified: ~36 per class
    again, _, _ = build_datasets("digits", seed=123)  # the split does not depend on the run's seed
    assert torch.equal(again.labels, train.labels) and torch.equal(again.images, train.images)
    # training images are shifted by up to 2 px; validation images are as stored
    assert torch.equal(val[5][0], val.images[5])
    torch.manual_seed(0)
    shifted = {tuple(train[3][0].flatten()[:64].tolist()) for _ in range(10)}
    assert len(shifted) > 1


def test_synthetic_is_seeded_and_class_dependent():
    train, val, info = build_datasets("synthetic", image_size=16, num_classes=4, synthetic_train_size=40,
                                      synthetic_val_size=8, seed=5)
    assert (info.num_classes, info.train_size, info.val_size) == (4, 40, 8)
    x, y = train[6]
    assert x.shape == (3, 16, 16) and y == 6 % 4
    assert torch.equal(x, train[6][0])  # an index always gives the same image
    other, _, _ = build_datasets("synthetic", image_size=16, num_classes=4, synthetic_train_size=40, seed=6)
    assert not torch.equal(x, other[6][0])
    # the class means differ far more than the noise of a mean over 10 images
    means = torch.stack([torch.stack([train[i][0] for i in range(c, 40, 4)]).mean(0) for c in range(4)])
    gap = (means[0] - means[1]).pow(2).mean().sqrt()
    assert gap > 0.5
    with pytest.raises(IndexError):
        train[40]


def test_cifar_is_never_downloaded_unasked(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10: not found at .*cifar-10-batches-py.*download"):
        build_datasets("cifar10", data_root=tmp_path)
    with pytest.raises(DatasetError, match="cifar100: not found"):
        build_datasets("cifar100", data_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_imagefolder_layout(tmp_path):
    from PIL import Image

    with pytest.raises(DatasetError, match=r"no folder .*train"):
        build_datasets("imagefolder", data_root=tmp_path)
    for split in ("train", "val"):
        for cls, color in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), color).save(folder / f"{i}.png")
    train, val, info = build_datasets("imagefolder", data_root=tmp_path, image_size=24)
    assert (info.num_classes, info.train_size, info.val_size, info.image_size) == (2, 4, 4, 24)
    x, y = val[3]
    assert x.shape == (3, 24, 24) and y == 1
    assert train[0][0].shape == (3, 24, 24)


def test_bad_names_and_options():
    with pytest.raises(DatasetError, match="dataset must be one of imagefolder, cifar10"):
        build_datasets("mnist")
    with pytest.raises(DatasetError, match="num_classes: digits has 10 classes"):
        build_datasets("digits", num_classes=5)
    with pytest.raises(DatasetError, match="image_size: cifar10 images are 32 px"):
        build_datasets("cifar10", image_size=64)
