"""Encoders f_θ with projection heads g_ϑ for two views, and the layers the linear probe reads.

Every model maps ``(v1, v2)`` to L2-normalized ``(z1, z2)`` and exposes ``probe_features(v1, v2, layer)``
with ``layer`` in ``("conv", "fc")``: the last convolutional block and the first fully connected layer,
the paper's conv5/fc6 protocol (for two-encoder models the two views' features are concatenated).
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


class TwoViewModel(nn.Module):
    """One encoder shared by both views (``shared=True``) or one encoder per view (CMC's L/ab)."""

    def __init__(self, arch: str, in_channels: Tuple[int, int], dim: int = 128, shared: bool = True,
                 image_size: int = 32) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if shared and in_channels[0] != in_channels[1]:
            raise ValueError(f"a shared encoder needs views with equal channels, got {in_channels}")

        def make(ch: int) -> _Encoder:
            if arch == "small_cnn":
                return small_cnn(ch, dim)
            if arch == "alexnet_half":
                return alexnet_half(ch, dim)
            return resnet18(ch, dim, small_input=image_size <= 64)

        self.shared = shared
        self.encoders = nn.ModuleList([make(in_channels[0])] if shared else [make(c) for c in in_channels])

    def _enc(self, view: int) -> _Encoder:
        return self.encoders[0 if self.shared else view]

    def forward(self, v1: Tensor, v2: Tensor) -> Tuple[Tensor, Tensor]:
        return self._enc(0)(v1), self._enc(1)(v2)

    @torch.no_grad()
    def probe_features(self, v1: Tensor, v2: Tensor, layer: str) -> Tensor:
        if layer not in ("conv", "fc"):
            raise ValueError(f"layer must be 'conv' or 'fc', got {layer!r}")
        if self.shared:
            return self._enc(0).features(v1, layer)
        return torch.cat([self._enc(0).features(v1, layer), self._enc(1).features(v2, layer)], 1)
