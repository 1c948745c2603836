"""The meta feature augmentation generator (MAG)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MetaFeatureAugmenter(nn.Module):
    """a_ω: an MLP D → h → h → D with BatchNorm and ReLU between layers and an L2-normalized output.

    The paper's size is 128 → 2048 → 2048 → 128; one MAG per view. Input and output ``[B, D]`` float.

    Example:
        >>> import torch
        >>> from metaug_fast.metaug import MetaFeatureAugmenter
        >>> mag = MetaFeatureAugmenter(dim=128, hidden=2048)
        >>> mag(torch.randn(64, 128)).shape, mag.hidden(torch.randn(64, 128)).shape
        (torch.Size([64, 128]), torch.Size([64, 2048]))
    """

    def __init__(self, dim: int = 128, hidden: int = 2048) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be positive, got dim={dim}, hidden={hidden}")
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=False),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=False),
            nn.Linear(hidden, dim),
        )

    def forward(self, z: Tensor) -> Tensor:
        return F.normalize(self.net(z), dim=1)

    def hidden(self, z: Tensor) -> Tensor:
        """The second hidden layer's activations ``[B, h]`` (the official probe reads them)."""
        return self.net[:6](z)


@torch.no_grad()
def output_change(before: Sequence[nn.Module], after: Sequence[nn.Module], features: Sequence[Tensor]) -> float:
    """How much the MAGs' function changed: 1 − the mean cosine between ``before[v](features[v])`` and
    ``after[v](features[v])`` over every row of every view (0: the same outputs, 1: orthogonal).

    The parameter norm is a poor measure of a MAG's change: weight decay shrinks every layer, and the
    BatchNorm layers and the normalized output undo most of such a rescaling. The MAGs run in train mode (on
    the batch statistics of ``features``, as in training) on copies, so no running statistic moves.

    Args:
        before: one MAG per view.
        after: the same MAGs later.
        features: one ``[N, D]`` float tensor per view.
    """
    gaps = []
    for a, b, z in zip(before, after, features):
        x, y = (copy.deepcopy(mag).train()(z).double() for mag in (a, b))
        # 1 − x·y as ‖x − y‖²/2 (unit rows): exact for the small changes that 1 − x·y rounds to 0.
        gaps.append((x - y).pow(2).sum(1) / 2)
    return torch.cat(gaps).mean().item()
