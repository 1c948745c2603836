"""A memory bank of every training sample's features (SPEC.md section 5)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

import metaug_fast.functional as MF
from metaug_fast.chunked import oucl_embeddings_chunked
from metaug_fast.reference import SIMILARITIES


class MemoryBank:
    """``n_data × dim`` L2-normalized features per view, updated with momentum after scoring.

    Args:
        n_data: number of training samples; dim: feature size; views: number of views (one bank each).
        momentum: m in bank_j ← normalize(m·bank_j + (1 - m)·z_j) (0.5 in the paper).
        generator: the random source for initialization and sampling (reproducible runs).
    """

    def __init__(self, n_data: int, dim: int, views: int = 2, momentum: float = 0.5,
                 generator: Optional[torch.Generator] = None, device="cpu") -> None:
        if n_data < 1 or dim < 1 or views < 1:
            raise ValueError(f"n_data, dim and views must be positive, got {n_data}, {dim}, {views}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        init = torch.randn(views, n_data, dim, generator=generator)
        self.features = F.normalize(init, dim=2).to(device)

    @property
    def n_data(self) -> int:
        return self.features.shape[1]

    def sample(self, batch: int, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``[batch, k]`` indices drawn uniformly with replacement."""
        return torch.randint(0, self.n_data, (batch, k), generator=generator).to(self.features.device)

    def gather(self, view: int, index: Tensor) -> Tensor:
        """Bank rows of ``view`` at ``index`` (any shape) -> ``index.shape + [dim]``, detached."""
        return self.features[view][index]

    @torch.no_grad()
    def update(self, view: int, index: Tensor, z: Tensor) -> None:
        """bank[index] ← normalize(m·bank[index] + (1 - m)·z) for ``index [B]``, ``z [B, dim]``."""
        mixed = self.momentum * self.features[view][index] + (1.0 - self.momentum) * z.detach().to(self.features)
        self.features[view][index] = F.normalize(mixed, dim=1)

    def score_all(self, view: int, z: Tensor, labels: Tensor, bank_labels: Tensor, *, chunk_size: int = 4096,
                  similarity: str = "shifted_cosine", reduction: str = "mean", **form_params) -> Tensor:
        """OUCL of ``z [B, dim]`` in label mode against the whole bank of ``view`` (``bank_labels [n_data]``).

        ``form_params``: form, beta, gamma_pos, gamma_neg, margin, lam (as :func:`~metaug_fast.functional.oucl`).
        Runs ``chunk_size`` bank rows at a time (:func:`metaug_fast.chunked.oucl_embeddings_chunked`), so the
        B×n_data score matrix is never stored; arguments are validated as by ``oucl_embeddings``.
        """
        ref = self.features[view]
        MF._label_inputs(z, labels, ref, bank_labels)
        unknown = set(form_params) - {"form", "beta", "gamma_pos", "gamma_neg", "margin", "lam"}
        if unknown:
            raise TypeError(f"score_all got unexpected arguments {sorted(unknown)}")
        defaults = dict(form="weighted", beta=16.0, gamma_pos=0.0, gamma_neg=0.0, margin=0.25, lam=0.0)
        params = MF._oucl_params(**{**defaults, **form_params}, reduction=reduction)
        similarity = MF._choice(similarity, "similarity", SIMILARITIES)
        return oucl_embeddings_chunked(z, labels, ref, bank_labels, chunk_size=chunk_size, similarity=similarity,
                                       **params)

    def state_dict(self) -> dict:
        return {"features": self.features.clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        if state["features"].shape != self.features.shape:
            raise ValueError(f"bank shape {tuple(state['features'].shape)} does not match {tuple(self.features.shape)}")
        self.features.copy_(state["features"])
        self.momentum = float(state["momentum"])
