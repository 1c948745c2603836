"""Drop-ins for ``pytorch_metric_learning.losses``: change the import line, keep the code.

>>> from metaug_fast.losses.pml import CircleLoss, NTXentLoss   # was: from pytorch_metric_learning.losses import ...
>>> loss = CircleLoss(m=0.25, gamma=256)(embeddings, labels)

Same constructors, same ``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``,
same values and gradients (tested against pytorch-metric-learning), on the fused label-mode ops: the B×M
similarity matrix, its masks and the pair index lists PML builds are never formed.

PML semantics kept exactly:

- without ``ref_emb`` every other row is scored and a row is not its own positive; with ``ref_emb`` and
  ``ref_labels`` the same tensor object as ``labels``, the pair (i, i) is dropped (PML fills the diagonal of its
  positive mask in that case);
- CircleLoss: ``softplus(LSE_p + LSE_n)`` per row at scale γ (the library's circle form times β = γ),
  averaged over the rows whose loss is greater than zero (``AvgNonZeroReducer``: rows with no positive or
  no negative, and rows whose loss underflows to exactly 0, do not count);
- NTXentLoss: the mean over every positive pair (i, p) of -log(e^{s_ip/τ} / (e^{s_ip/τ} + Σ_n e^{s_in/τ})),
  ``MeanReducer`` (InfoNCE with ``average="pair"``);
- both return 0 (with a zero gradient) when the batch has at most one positive and at most one negative
  pair, as PML's pair losses do.

What these classes do not implement raises a ``ValueError`` naming the argument: another distance (PML's
``LpDistance``, a ``power``), another reducer, an embedding regularizer, ``collect_stats``, and miners'
``indices_tuple``. Use pytorch-metric-learning itself for those.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _backend
from .. import _validate as V
from .. import functional as F
from .. import reference as R
from ._common import unsupported

__all__ = ["CircleLoss", "NTXentLoss"]


def _similarity(cls: str, distance, dot_allowed: bool) -> str:
    """Our similarity for PML's ``distance`` object (None: the loss's default, the cosine similarity)."""
    if distance is None:
        return "cosine"
    name = type(distance).__name__
    power, p = getattr(distance, "power", 1), getattr(distance, "p", 2)
    if power == 1 and name in ("CosineSimilarity", "DotProductSimilarity"):
        normalized = getattr(distance, "normalize_embeddings", True)
        if normalized and p == 2:
            return "cosine"
        if not normalized and dot_allowed:
            return "dot"
    supported = "CosineSimilarity()" + (" or DotProductSimilarity()" if dot_allowed else "")
    raise unsupported(cls, "distance", distance, f"it supports {supported} (power 1, p = 2); use "
                      f"pytorch_metric_learning.losses.{cls} for other distances")


def _check_reducer(cls: str, reducer, default: str) -> None:
    if reducer is None:
        return
    same = type(reducer).__name__ == default and getattr(reducer, "high", None) is None and \
        getattr(reducer, "low", 0) == 0 and not getattr(reducer, "collect_stats", False)
    if not same:
        raise unsupported(cls, "reducer", reducer, f"it reduces as PML's default {default}(); use "
                          f"pytorch_metric_learning.losses.{cls} for other reducers")


class _PairLoss(nn.Module):
    """PML's pair-loss contract over label mode: argument checks, the reference set, the empty-pairs rule."""

    _default_reducer = ""
    _dot_allowed = False

    def __init__(self, distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1,
                 collect_stats=False, backend: str = "auto") -> None:
        super().__init__()
        cls = type(self).__name__
        self.similarity = _similarity(cls, distance, self._dot_allowed)
        _check_reducer(cls, reducer, self._default_reducer)
        if embedding_regularizer is not None:
            raise unsupported(cls, "embedding_regularizer", embedding_regularizer,
                              "add the regularizer's term to the loss yourself")
        if collect_stats:
            raise unsupported(cls, "collect_stats", collect_stats, "the fused ops record no statistics")
        _backend.check_name(backend, "backend")
        self.backend = backend

    def _inputs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """(labels, ref_emb, ref_labels, self_offset) as label mode takes them, PML's rules applied (labels
        move to the embeddings' device, as PML moves them)."""
        cls = type(self).__name__
        if indices_tuple is not None:
            raise unsupported(cls, "indices_tuple", "<miner output>", "the fused ops score every pair; drop the "
                              "miner, or use pytorch_metric_learning.losses with it")
        if labels is None:
            raise ValueError(f"{cls}: labels are required (indices_tuple is not supported)")
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError(f"{cls}: ref_labels was given without ref_emb")
            return labels.to(embeddings.device), None, None, None
        if ref_labels is None:
            raise ValueError(f"{cls}: ref_emb needs ref_labels")
        offset = 0 if ref_labels is labels else None
        return labels.to(embeddings.device), ref_emb, ref_labels.to(ref_emb.device), offset

    @staticmethod
    def _pair_counts(labels: Tensor, ref_labels: Optional[Tensor], self_offset: Optional[int]) -> Tuple[Tensor, Tensor]:
        """(positive pairs, negative pairs) of the batch as PML lists them, from label counts (no sync)."""
        ref = labels if ref_labels is None else ref_labels
        same = R.positive_counts(labels, ref, None).sum()
        positives = R.positive_counts(labels, ref_labels, self_offset).sum()
        return positives, labels.shape[0] * ref.shape[0] - same

    @staticmethod
    def _zero_loss(embeddings: Tensor) -> Tensor:
        """PML's zero loss, Σ embeddings·0: 0, or NaN when an embedding is NaN or infinite (so a NaN input is
        never a finite loss)."""
        return (embeddings * 0).sum()

    def _no_pairs_rule(self, loss: Tensor, embeddings: Tensor, labels, ref_labels, self_offset) -> Tensor:
        """PML's zero loss where PML returns it: at most one positive and at most one negative pair."""
        positives, negatives = self._pair_counts(labels, ref_labels, self_offset)
        return torch.where((positives <= 1) & (negatives <= 1), self._zero_loss(embeddings), loss)


class CircleLoss(_PairLoss):
    """pytorch-metric-learning's ``CircleLoss(m=0.4, gamma=80)`` on the fused circle form.

    Args:
        m: the relaxation margin.
        gamma: the scale (the library's β).
        **kwargs: PML's ``distance``, ``reducer``, ``embedding_regularizer``, ``embedding_reg_weight``,
            ``collect_stats``: only their defaults (or ``CosineSimilarity()``, ``AvgNonZeroReducer()``) are
            accepted; ``backend``: metaug_fast's backend choice (``"auto"``, ``"cpp"``, ...).
    Forward: ``embeddings [B, D]`` float, ``labels [B]`` integer, optional ``ref_emb [M, D]``,
    ``ref_labels [M]``; returns a scalar in ``embeddings.dtype``.

    Example:
        >>> import torch
        >>> from metaug_fast.losses.pml import CircleLoss
        >>> CircleLoss(m=0.25, gamma=256)(torch.randn(16, 32), torch.randint(0, 4, (16,))).shape
        torch.Size([])
    """

    _default_reducer = "AvgNonZeroReducer"

    def __init__(self, m: float = 0.4, gamma: float = 80, **kwargs) -> None:
        super().__init__(**kwargs)
        self.m, self.gamma = V.check_real(m, "m"), V.check_real(gamma, "gamma", positive=True)

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        labels, ref_emb, ref_labels, offset = self._inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        rows = F.oucl_embeddings(embeddings, labels, ref_emb, ref_labels, form="circle", beta=self.gamma,
                                 margin=self.m, similarity=self.similarity, reduction="none", self_offset=offset,
                                 backend=self.backend)
        losses = rows * self.gamma
        # AvgNonZeroReducer: the mean of the positive rows (a NaN row is not one), PML's zero loss if none is.
        kept = losses > 0
        n_kept = kept.sum()
        loss = torch.where(kept, losses, torch.zeros_like(losses)).sum() / n_kept.clamp(min=1)
        loss = torch.where(n_kept > 0, loss, self._zero_loss(embeddings))
        return self._no_pairs_rule(loss, embeddings, labels, ref_labels, offset)

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}, backend={self.backend!r}"


class NTXentLoss(_PairLoss):
    """pytorch-metric-learning's ``NTXentLoss(temperature=0.07)``: InfoNCE averaged over positive pairs.

    Args:
        temperature: τ (a float, or a 0-d tensor that gets its gradient).
        **kwargs: ``distance``: ``None``/``CosineSimilarity()`` (cosine), or
            ``DotProductSimilarity(normalize_embeddings=False)`` (plain inner products); ``reducer`` etc.: PML's
            defaults only; ``backend``: as :class:`CircleLoss`.
    Forward as :class:`CircleLoss`: ``embeddings [B, D]``, ``labels [B]``, optional ``ref_emb [M, D]``,
    ``ref_labels [M]``; returns a scalar.

    Example:
        >>> import torch
        >>> from metaug_fast.losses.pml import NTXentLoss
        >>> NTXentLoss(temperature=0.1)(torch.randn(16, 32), torch.arange(8).repeat(2)).shape
        torch.Size([])
    """

    _default_reducer = "MeanReducer"
    _dot_allowed = True

    def __init__(self, temperature=0.07, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature if isinstance(temperature, Tensor) else V.check_real(temperature, "temperature",
                                                                                       positive=True)

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        labels, ref_emb, ref_labels, offset = self._inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        loss = F.info_nce_embeddings(embeddings, labels, ref_emb, ref_labels, temperature=self.temperature,
                                     similarity=self.similarity, reduction="mean", average="pair",
                                     self_offset=offset, backend=self.backend)
        # PML scores every positive pair, even one whose row has no negative (ours drops such rows): a NaN or
        # infinite embedding makes its loss NaN whatever the batch, as the zero loss added here does.
        loss = loss + self._zero_loss(embeddings)
        return self._no_pairs_rule(loss, embeddings, labels, ref_labels, offset)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"
