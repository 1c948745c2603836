"""Datasets and views for MetAug training.

``digits`` is embedded (sklearn's 8×8 digits, no download). ``cifar10``, ``cifar100``, ``stl10`` and
``tiny-imagenet`` are read from ``--data-root`` in the layout torchvision's datasets use; nothing is ever
downloaded (a missing folder raises :class:`DatasetNotFoundError` saying where the files go). The
readers are this module's own, so files are not rejected for a checksum, and tests can write a few
images in the same format.

Views: ``"lab"`` (CMC/MetAug) converts one augmented RGB image to Lab and gives L (1 channel) and ab
(2 channels) as two views, and the whole Lab image as a third (MetAug's); ``"crops"`` gives independent
augmentations of the image.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .augment import digits_shift, per_image

DATASETS = ("digits", "cifar10", "cifar100", "stl10", "tiny-imagenet")
VIEWS = ("lab", "crops")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for; the message says what to put where."""


@dataclass
class Split:
    """Images ``[N, C, H, W]`` (uint8 0-255, or float in [0, 1]) or a lazily loaded ImageFolder, and labels."""

    images: object
    labels: Tensor
    n_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Tensor:
        if isinstance(self.images, Tensor):
            x = self.images[i]
            return x.float() / 255.0 if x.dtype == torch.uint8 else x
        img, _ = self.images[i]  # torchvision ImageFolder with a ToTensor-like transform
        return img


def _missing(name: str, path: str, layout: str, source: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found: expected {path} ({layout}; available from {source}). No download is attempted "
        f"(this machine has no internet): put the files there, or point --data-root at their parent folder."
    )


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar(root: str, n_classes: int, train: bool) -> Split:
    if n_classes == 10:
        batches = ["data_batch_%d" % i for i in range(1, 6)] if train else ["test_batch"]
        folder, files, key = "cifar-10-batches-py", batches, "labels"
        name = "CIFAR-10"
    else:
        folder, files, key = "cifar-100-python", ["train" if train else "test"], "fine_labels"
        name = "CIFAR-100"
    base = os.path.join(root, folder)
    paths = [os.path.join(base, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise _missing(name, missing[0], f"torchvision's {folder}/ with {', '.join(files)}",
                       "https://www.cs.toronto.edu/~kriz/cifar.html")
    data, labels = [], []
    for p in paths:
        d = _unpickle(p)
        data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(d[key])
    return Split(torch.from_numpy(np.concatenate(data)), torch.tensor(labels, dtype=torch.long), n_classes)


def _stl10(root: str, train: bool) -> Split:
    base = os.path.join(root, "stl10_binary")
    parts = [("train_X.bin", "train_y.bin")] if train else [("test_X.bin", "test_y.bin")]
    if train and os.path.isfile(os.path.join(base, "unlabeled_X.bin")):
        parts.append(("unlabeled_X.bin", None))
    images, labels = [], []
    for xf, yf in parts:
        xp = os.path.join(base, xf)
        if not os.path.isfile(xp) or (yf and not os.path.isfile(os.path.join(base, yf))):
            raise _missing("STL-10", xp, "torchvision's stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, "
                           "test_y.bin (and optionally unlabeled_X.bin)", "https://cs.stanford.edu/~acoates/stl10/")
        x = np.fromfile(xp, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # stored column-major
        images.append(np.ascontiguousarray(x))
        if yf:
            labels.append(np.fromfile(os.path.join(base, yf), dtype=np.uint8).astype(np.int64) - 1)
        else:
            labels.append(np.full(len(x), -1, dtype=np.int64))  # unlabeled: used by training, not the probe
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), 10)


def _tiny_imagenet(root: str, train: bool) -> Split:
    import torchvision
    from torchvision.transforms.functional import pil_to_tensor

    base = os.path.join(root, "tiny-imagenet-200")
    train_dir = os.path.join(base, "train")
    if not os.path.isdir(train_dir):
        raise _missing("Tiny ImageNet", train_dir, "ImageFolder layout: tiny-imagenet-200/train/<class>/..., "
                       "tiny-imagenet-200/val/<class>/... or val/images with val_annotations.txt",
                       "http://cs231n.stanford.edu/tiny-imagenet-200.zip")
    to_tensor = lambda img: pil_to_tensor(img.convert("RGB")).float() / 255.0
    ds = torchvision.datasets.ImageFolder(train_dir, transform=to_tensor)
    if not train:
        val_dir = os.path.join(base, "val")
        ann = os.path.join(val_dir, "val_annotations.txt")
        if os.path.isfile(ann):  # the archive's own layout: one folder of images and an annotation file
            with open(ann) as f:
                rows = [line.split("\t")[:2] for line in f if line.strip()]
            ds.samples = [(os.path.join(val_dir, "images", fn), ds.class_to_idx[wnid]) for fn, wnid in rows]
            ds.targets = [t for _, t in ds.samples]
        elif os.path.isdir(val_dir):
            ds = torchvision.datasets.ImageFolder(val_dir, transform=to_tensor)
        else:
            raise _missing("Tiny ImageNet", val_dir, "tiny-imagenet-200/val/", "http://cs231n.stanford.edu/tiny-imagenet-200.zip")
    return Split(ds, torch.tensor(ds.targets, dtype=torch.long), len(ds.classes))


def _digits(train: bool) -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    # A fixed split (independent of the run's seed) so every run is probed on the same held-out images.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    idx = perm[:1400] if train else perm[1400:]
    return Split(x[idx], y[idx], 10)


def load_split(name: str, root: Optional[str], train: bool) -> Split:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "digits":
        return _digits(train)
    if not root:
        raise DatasetNotFoundError(f"{name} needs --data-root: the folder that holds its files (nothing is downloaded)")
    if name in ("cifar10", "cifar100"):
        return _cifar(root, 10 if name == "cifar10" else 100, train)
    if name == "stl10":
        return _stl10(root, train)
    return _tiny_imagenet(root, train)


# ------------------------------------------------------------------------------------------------ views
def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB ``[3, H, W]`` in [0, 1] -> CIE Lab (D65), scaled to L/100 in [0, 1] and ab/110 in about [-1, 1]."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=x.dtype)
    xyz = torch.einsum("ij,jhw->ihw", m, lin) / torch.tensor([0.950456, 1.0, 1.088754], dtype=x.dtype)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    L = 116 * f[1] - 16
    a = 500 * (f[0] - f[1])
    b = 200 * (f[1] - f[2])
    return torch.stack([L / 100, a / 110, b / 110])


def digits_augment(x: Tensor) -> Tensor:
    """A random shift of up to one pixel, 20 % pixel dropout and noise on ``[1, 8, 8]`` (global RNG)."""
    x = digits_shift(x)
    return x * (torch.rand_like(x) > 0.2).to(x.dtype) + 0.1 * torch.randn_like(x)


def image_augment(size: int, color: bool) -> Callable[[Tensor], Tensor]:
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if color:
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    return v2.Compose(ops)


class Views(Dataset):
    """(v1, ..., vV, label, index) per sample; ``augment=False`` gives the deterministic views the probe uses.

    ``views="lab"``: L and ab of one augmented image, and with ``n_views=3`` its whole Lab image too (the
    official code's third view); ``views="crops"``: ``n_views`` independent augmentations of the image.
    ``augmentations``: a set of :data:`metaug_fast.metaug.augment.AUGMENTATIONS` (its per-image part; mixup
    is the batch's) instead of the defaults (:func:`image_augment`, :func:`digits_augment`).
    """

    def __init__(self, split: Split, views: str, augment: bool, image_size: int, n_views: int = 2,
                 augmentations: Optional[Tuple[str, ...]] = None) -> None:
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        if n_views not in (2, 3):
            raise ValueError(f"n_views must be 2 or 3, got {n_views}")
        self.split, self.views, self.augment, self.n_views = split, views, augment, n_views
        self.is_digits = isinstance(split.images, Tensor) and split.images.shape[-1] == 8
        self.transform = None
        if augment and augmentations is not None:
            self.transform = per_image(augmentations, image_size, self.is_digits)
        elif augment and not self.is_digits:
            self.transform = image_augment(image_size, color=views == "crops")
        self.resize = None
        if not self.is_digits:
            from torchvision.transforms import v2

            self.resize = v2.Resize((image_size, image_size), antialias=True)

    def __len__(self) -> int:
        return len(self.split)

    def _aug(self, x: Tensor) -> Tensor:
        if not self.augment:
            return x if self.resize is None else self.resize(x)
        return self.transform(x) if self.transform is not None else digits_augment(x)

    def channels(self) -> Tuple[int, ...]:
        """Channels of each view."""
        if self.views == "lab":
            return (1, 2, 3)[:self.n_views]
        return (self.split.image(0).shape[0],) * self.n_views

    def __getitem__(self, i: int) -> tuple:
        x = self.split.image(i)
        if self.views == "lab":
            lab = rgb_to_lab(self._aug(x))
            out = (lab[:1], lab[1:], lab)[:self.n_views]
        else:
            out = tuple(self._aug(x) for _ in range(self.n_views))
        return (*out, self.split.labels[i], i)
