"""The meta feature augmentation generator (MAG)."""
from __future__ import annotations

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
