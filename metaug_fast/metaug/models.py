"""Encoders f_θ with projection heads g_ϑ for two or three views, and the layers the linear probe reads.

Every model maps its views ``(v1, ..., vV)`` to L2-normalized features ``(z1, ..., zV)`` and exposes
``probe_features(*views, layer=...)`` with ``layer`` in ``("conv", "fc")``: the last convolutional block
and the first fully connected layer, the paper's conv5/fc6 protocol (with one encoder per view the views'
features are concatenated).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ARCHS = ("small_cnn", "alexnet_half", "resnet18")


def _conv(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(3, 2, padding=1))
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    """conv trunk -> flatten ("conv") -> fc + BN + ReLU ("fc") -> more fc -> head -> normalize."""

    def __init__(self, conv: nn.Module, conv_dim: int, fc: Tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.conv = conv
        layers, width = [], conv_dim
        for h in fc:
            layers.append(nn.Sequential(nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()))
            width = h
        self.fc = nn.ModuleList(layers)
        self.head = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).flatten(1)
        for layer in self.fc:
            h = layer(h)
        return F.normalize(self.head(h), dim=1)

    def features(self, x: Tensor, layer: str) -> Tensor:
        h = self.conv(x).flatten(1)
        return h if layer == "conv" else self.fc[0](h)


def small_cnn(in_ch: int, dim: int) -> _Encoder:
    """For 8×8 digits: two conv blocks (32, 64 channels) -> 64·4·4 -> fc 256 -> head."""
    conv = nn.Sequential(_conv(in_ch, 32, False), _conv(32, 64, True))
    return _Encoder(conv, 64 * 4 * 4, (256,), dim)


def alexnet_half(in_ch: int, dim: int) -> _Encoder:
    """AlexNet at half width (48, 128, 192, 192, 128 channels; fc6/fc7 2048), as CMC and MetAug use one
    per view of a Lab image (L: 1 channel, ab: 2). Input of any size >= 32 (pooled to 2×2 after conv5)."""
    conv = nn.Sequential(_conv(in_ch, 48, True), _conv(48, 128, True), _conv(128, 192, False),
                         _conv(192, 192, False), _conv(192, 128, True), nn.AdaptiveAvgPool2d(2))
    return _Encoder(conv, 128 * 2 * 2, (2048, 2048), dim)


def resnet18(in_ch: int, dim: int, small_input: bool = True) -> _Encoder:
    """torchvision's ResNet-18 (random init) up to global pooling ("conv", 512) -> fc 512 -> head.
    ``small_input`` uses a 3×3 stem without max-pool, the usual change for 32×32 images."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    if small_input:
        net.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_ch != 3:
        net.conv1 = nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False)
    net.fc = nn.Identity()
    return _Encoder(net, 512, (512,), dim)


class MultiViewModel(nn.Module):
    """One encoder shared by every view (``shared=True``) or one encoder per view (CMC's L/ab, MetAug's
    L/ab/Lab). ``in_channels`` has one entry per view (2 or 3 views)."""

    def __init__(self, arch: str, in_channels: Tuple[int, ...], dim: int = 128, shared: bool = True,
                 image_size: int = 32) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if len(in_channels) not in (2, 3):
            raise ValueError(f"in_channels needs one entry per view (2 or 3 views), got {in_channels}")
        if shared and len(set(in_channels)) != 1:
            raise ValueError(f"a shared encoder needs views with equal channels, got {in_channels}")

        def make(ch: int) -> _Encoder:
            if arch == "small_cnn":
                return small_cnn(ch, dim)
            if arch == "alexnet_half":
                return alexnet_half(ch, dim)
            return resnet18(ch, dim, small_input=image_size <= 64)

        self.shared, self.n_views = shared, len(in_channels)
        self.encoders = nn.ModuleList([make(in_channels[0])] if shared else [make(c) for c in in_channels])

    def _enc(self, view: int) -> _Encoder:
        return self.encoders[0 if self.shared else view]

    def forward(self, *views: Tensor) -> Tuple[Tensor, ...]:
        if len(views) != self.n_views:
            raise ValueError(f"the model takes {self.n_views} views, got {len(views)}")
        return tuple(self._enc(v)(x) for v, x in enumerate(views))

    @torch.no_grad()
    def probe_features(self, *views: Tensor, layer: str) -> Tensor:
        """``layer`` of the first view's encoder (shared) or every encoder's, concatenated: ``[B, F]``."""
        if layer not in ("conv", "fc"):
            raise ValueError(f"layer must be 'conv' or 'fc', got {layer!r}")
        if self.shared:
            return self._enc(0).features(views[0], layer)
        return torch.cat([self._enc(v).features(x, layer) for v, x in enumerate(views)], 1)
