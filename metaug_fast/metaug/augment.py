"""The augmentations of the paper's ablation ("comparison with different data augmentations"): six of them,
any set of which can make the training views, and the paper's eight sets by ID.

=====  ==========================================  =======================================================
name   images (``[C, H, W]`` in [0, 1])            digits (``[1, 8, 8]``)
=====  ==========================================  =======================================================
flip   horizontal flip, p = 0.5                    the same
rotate a random angle in [-30°, 30°]               [-15°, 15°] (an 8-pixel digit loses its corners sooner)
crop   RandomResizedCrop, scale [0.2, 1]           a random shift of up to one pixel (pad 1, crop 8)
grey   RandomGrayscale, p = 0.2                    refused: a one-channel image has no colour to remove
jitter ColorJitter(0.4, 0.4, 0.4, 0.1), p = 0.8    brightness and contrast ×U(0.6, 1.4), noise σ = 0.1
mixup  each view x ← λ·x + (1 − λ)·x[π] over the batch, π a random permutation and λ = max(u, 1 − u),
       u ~ U(0, 1) per sample (the batch-level mix of i-Mix and MixCo used as an augmentation: the sample
       itself keeps the larger share, so its two views stay a positive pair)
=====  ==========================================  =======================================================

The paper gives the sets, not every parameter: the crop, grey and jitter parameters are the ones its
training code and SimCLR use, the rotation range and the mixup weights are this library's documented
choices. Without ``crop`` images are resized to the training size. The paper's IDs (:data:`PAPER_SETS`):
1 flip + rotate, 2 crop, 3 grey, 4 jitter, 5 flip + crop, 6 rotate + jitter, 7 flip + crop + mixup,
8 all six.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

AUGMENTATIONS = ("flip", "rotate", "crop", "grey", "jitter", "mixup")
PAPER_SETS = {1: ("flip", "rotate"), 2: ("crop",), 3: ("grey",), 4: ("jitter",), 5: ("flip", "crop"),
              6: ("rotate", "jitter"), 7: ("flip", "crop", "mixup"), 8: AUGMENTATIONS}
# What digits cannot take, and why.
DIGITS_REFUSED = {"grey": "a one-channel digit has no colour to remove"}


def parse_augment(text: str) -> Tuple[str, ...]:
    """``"flip,crop"`` -> ``("flip", "crop")`` in :data:`AUGMENTATIONS` order; a ``ValueError`` naming
    ``augment`` for an unknown, repeated or missing name."""
    names = [t.strip() for t in str(text).split(",")]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or not names:
        raise ValueError(f"augment: unknown augmentation(s) {unknown}, choose from {', '.join(AUGMENTATIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"augment: {text!r} names an augmentation twice")
    return tuple(n for n in AUGMENTATIONS if n in names)


def paper_set(augment_id: int) -> Tuple[str, ...]:
    """The paper's set ``augment_id`` (1..8)."""
    if augment_id not in PAPER_SETS:
        raise ValueError(f"augment_id must be one of 1..8 (the paper's sets), got {augment_id!r}")
    return PAPER_SETS[augment_id]


def check_for(names: Sequence[str], digits: bool) -> None:
    """Refuses, with the reason, an augmentation that means nothing for the data (``digits``: 8×8 grey)."""
    refused = [f"{n} ({DIGITS_REFUSED[n]})" for n in names if digits and n in DIGITS_REFUSED]
    if refused:
        raise ValueError(f"augment: digits cannot take {', '.join(refused)}")


def digits_shift(x: Tensor) -> Tensor:
    """A random shift of up to one pixel of an 8×8 digit ``[1, 8, 8]`` (pad 1, crop 8; global RNG)."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,)).tolist()
    return padded[:, dy:dy + 8, dx:dx + 8]


def _digits_jitter(x: Tensor) -> Tensor:
    brightness, contrast = (0.6 + 0.8 * torch.rand(2)).tolist()
    mean = x.mean()
    return (x - mean) * contrast + mean * brightness + 0.1 * torch.randn_like(x)


def per_image(names: Sequence[str], size: int, digits: bool) -> Callable[[Tensor], Tensor]:
    """The per-image part of the set ``names`` (mixup is the batch's: :func:`mixup`) as one transform of a
    ``[C, H, W]`` image, drawing from the global RNG as the data loader's transforms do; the output is
    ``[C, size, size]`` (digits stay 8×8)."""
    check_for(names, digits)
    from torchvision.transforms import v2

    ops = []
    if "crop" in names:
        ops.append(digits_shift if digits else v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True))
    elif not digits:
        ops.append(v2.Resize((size, size), antialias=True))
    if "flip" in names:
        ops.append(v2.RandomHorizontalFlip())
    if "rotate" in names:
        ops.append(v2.RandomRotation(15 if digits else 30))
    if "jitter" in names:
        ops.append(_digits_jitter if digits else v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8))
    if "grey" in names:
        ops.append(v2.RandomGrayscale(p=0.2))
    return v2.Compose(ops) if ops else (lambda x: x)


def mixup(views: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> Tuple[Tensor, ...]:
    """Each view ``[B, ...]`` mixed with a random other sample of the batch: x ← λ·x + (1 − λ)·x[π], one
    permutation π and one λ = max(u, 1 − u), u ~ U(0, 1), per view and sample, drawn from ``generator``."""
    out = []
    for x in views:
        b, where = x.shape[0], generator.device if generator is not None else x.device
        perm = torch.randperm(b, generator=generator, device=where).to(x.device)
        u = torch.rand(b, generator=generator, dtype=torch.float64, device=where)
        lam = torch.maximum(u, 1 - u).to(device=x.device, dtype=x.dtype).view(b, *([1] * (x.dim() - 1)))
        out.append(lam * x + (1 - lam) * x[perm])
    return tuple(out)
