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
  pair, as PML's pair losses do;
- labels may be floats, as PML compares them (a NaN label matches nothing);
- a NaN or infinite input that reaches the loss makes it NaN: where PML's AvgNonZeroReducer drops a NaN row
  and returns a finite loss (with NaN gradients, which an optimizer step writes into every weight), CircleLoss
  returns NaN, so that a ``torch.isfinite(loss)`` guard fires.

A miner's ``indices_tuple`` (triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)``) restricts each anchor to its
listed pairs, as PML's pair losses do: CircleLoss counts a pair listed twice once (PML sets a mask), NTXentLoss
counts every listing (PML scores a list of pairs). The listed scores become score-mode lists, one row per
anchor, with masks: only the listed pairs are scored, and the fused score-mode ops take them.

With pytorch-metric-learning installed, the classes extend its ``BaseMetricLossFunction``, so its wrappers
take them: ``CrossBatchMemory``, ``DistributedLossWrapper`` (the DDP route: wrap the loss as with PML's own),
``SelfSupervisedLoss`` and ``MultipleLosses``. Without it they are plain ``nn.Module`` s and compute the same.

What these classes do not implement raises a ``ValueError`` naming the argument: another distance (PML's
``LpDistance``, a ``power``), another reducer, an embedding regularizer and ``collect_stats``. Use
pytorch-metric-learning itself for those.
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

try:  # PML's wrappers accept only losses of its base class; extending it costs nothing to users who have PML.
    from pytorch_metric_learning.losses import BaseMetricLossFunction as _Base
except ImportError:
    _Base = None

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


def _class_ids(labels: Tensor, ref_labels: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """(labels, ref_labels) as int64 class ids where either is a float tensor, equal exactly where PML's
    ``==`` finds the labels equal (a NaN label is a class of its own that nothing matches); integer labels
    are returned as they are, and ``ref_labels is labels`` stays true."""
    pair = [labels] if ref_labels is None or ref_labels is labels else [labels, ref_labels]
    if not any(t.dtype.is_floating_point for t in pair):
        return labels, ref_labels
    common = pair[0].dtype if len(pair) == 1 else torch.promote_types(pair[0].dtype, pair[1].dtype)
    values = torch.cat([t.to(common) for t in pair])
    ids = torch.unique(values, return_inverse=True)[1]
    nan = values.isnan()
    ids = torch.where(nan, values.numel() + torch.cumsum(nan, 0), ids)  # past every id unique() gives
    if len(pair) == 1:
        return ids, (None if ref_labels is None else ids)
    return ids[:labels.shape[0]], ids[labels.shape[0]:]


def _listed_pairs(cls: str, indices_tuple, n_rows: int, n_ref: int, device) -> Tuple[Tensor, ...]:
    """A miner's ``indices_tuple`` as PML's pairs ``(a1, p, a2, n)``, int64 on ``device``: triplets
    ``(a, p, n)`` become ``(a, p, a, n)``; anchors index the ``n_rows`` embeddings, the others the ``n_ref``
    reference rows. Indices out of range raise (one wait for the device, to read their bounds)."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(f"{cls}: indices_tuple must be a miner's triplets (anchors, positives, negatives) or "
                         f"pairs (anchors, positives, anchors, negatives), got {type(indices_tuple).__name__}"
                         + (f" of length {len(indices_tuple)}" if isinstance(indices_tuple, (tuple, list)) else ""))
    indices = []
    for i, t in enumerate(indices_tuple):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or \
                t.dtype == torch.bool:
            what = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{cls}: indices_tuple[{i}] must be a 1-D integer tensor, got {what}")
        indices.append(t.to(device=device, dtype=torch.long))
    if len(indices) == 3:
        a, p, n = indices
        indices = [a, p, a, n]
    a1, p, a2, n = indices
    if a1.numel() != p.numel() or a2.numel() != n.numel():
        raise ValueError(f"{cls}: indices_tuple's anchors and their positives (or negatives) differ in length: "
                         f"{[t.numel() for t in indices]}")
    limits = (n_rows, n_ref, n_rows, n_ref)
    listed = [(i, t) for i, t in enumerate(indices) if t.numel()]
    if listed:
        bounds = torch.stack([torch.stack([t.min(), t.max()]) for _, t in listed]).tolist()
        for (i, _), (low, high) in zip(listed, bounds):
            if low < 0 or high >= limits[i]:
                raise ValueError(f"{cls}: indices_tuple holds indices from {low} to {high}, outside the "
                                 f"{limits[i]} rows they index ({'embeddings' if i % 2 == 0 else 'ref_emb'})")
    return a1, p, a2, n


def _listed_rows(x: Tensor, r: Tensor, rows: Tensor, cols: Tensor, cosine: bool) -> Tuple[Tensor, Tensor]:
    """(x, r) as the listed pairs score them: rows that no pair lists zeroed (the loss does not depend on
    them, so a NaN there gets a zero gradient; PML's matrix spreads it to every row's gradient, under a finite
    loss), then normalized for the cosine similarity. ``rows`` index ``x``, ``cols`` index ``r``."""
    x = x.where(torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device).index_fill(0, rows, True), 0)
    r = r.where(torch.zeros(r.shape[0], 1, dtype=torch.bool, device=r.device).index_fill(0, cols, True), 0)
    if cosine:
        x, r = nn.functional.normalize(x, dim=1), nn.functional.normalize(r, dim=1)
    return x, r


def _pair_scores(x: Tensor, r: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``[P]``: ⟨x[rows[k]], r[cols[k]]⟩ for each listed pair; from the gathered rows, or from the similarity
    matrix where the pairs are so many that their rows outweigh it (P·D > B·M)."""
    if rows.numel() * x.shape[1] <= x.shape[0] * r.shape[0]:
        return (x[rows] * r[cols]).sum(1)
    return (x @ r.T)[rows, cols]


def _per_anchor(anchors: Tensor, values: Tensor, n_rows: int) -> Tuple[Tensor, Tensor]:
    """(``[n_rows, K]`` values, bool mask ``[n_rows, K]``): each anchor's values in a row of its own, in the
    order they are listed, K the largest number of values an anchor has (score mode's lists with masks)."""
    order = torch.argsort(anchors, stable=True)
    anchors = anchors[order]
    counts = torch.bincount(anchors, minlength=n_rows)
    k = int(counts.max()) if anchors.numel() else 0
    slot = torch.arange(anchors.numel(), device=anchors.device) - (torch.cumsum(counts, 0) - counts)[anchors]
    lists = values.new_zeros(n_rows, k).index_put((anchors, slot), values[order])
    mask = torch.zeros(n_rows, k, dtype=torch.bool, device=values.device).index_put(
        (anchors, slot), torch.ones((), dtype=torch.bool, device=values.device))
    return lists, mask


class _PairLoss(nn.Module if _Base is None else _Base):
    """PML's pair-loss contract over the fused ops: argument checks, the reference set, miners' pairs, the
    empty-pairs rule."""

    _default_reducer = ""
    _dot_allowed = False

    def __init__(self, distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1,
                 collect_stats=False, backend: str = "auto") -> None:
        cls = type(self).__name__
        similarity = _similarity(cls, distance, self._dot_allowed)
        _check_reducer(cls, reducer, self._default_reducer)
        if embedding_regularizer is not None:
            raise unsupported(cls, "embedding_regularizer", embedding_regularizer,
                              "add the regularizer's term to the loss yourself")
        if collect_stats:
            raise unsupported(cls, "collect_stats", collect_stats, "the fused ops record no statistics")
        _backend.check_name(backend, "backend")
        if _Base is None:
            super().__init__()
        else:
            super().__init__(distance=distance, reducer=reducer)
        self.similarity, self.backend = similarity, backend

    def get_default_distance(self):
        """PML's base class asks for the default distance object (``self.distance``): the cosine similarity."""
        from pytorch_metric_learning.distances import CosineSimilarity
        return CosineSimilarity()

    def get_default_reducer(self):
        """PML's base class asks for the default reducer object (``self.reducer``): the one this loss applies."""
        from pytorch_metric_learning import reducers
        return getattr(reducers, self._default_reducer)()

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        """``embeddings [B, D]`` float; ``labels [B]`` integer or float (optional with ``indices_tuple``);
        ``indices_tuple``: a miner's triplets or pairs; ``ref_emb [M, D]``, ``ref_labels [M]``. Returns a
        scalar in ``embeddings.dtype``."""
        if indices_tuple is None:
            labels, ref_emb, ref_labels, offset = self._inputs(embeddings, labels, ref_emb, ref_labels)
            loss = self._all_pairs(embeddings, labels, ref_emb, ref_labels, offset)
            return self._no_pairs_rule(loss, embeddings, labels, ref_labels, offset)
        ref = embeddings if ref_emb is None else ref_emb
        pairs = _listed_pairs(type(self).__name__, indices_tuple, embeddings.shape[0], ref.shape[0],
                              embeddings.device)
        if all(t.numel() <= 1 for t in pairs) or pairs[0].numel() == 0 or pairs[2].numel() == 0:
            return self._zero_loss(embeddings)  # PML's zero loss: too few pairs, or no positive or no negative
        a1, p, a2, n = pairs
        x, r = _listed_rows(embeddings, ref.to(embeddings.device), torch.cat([a1, a2]), torch.cat([p, n]),
                            self.similarity == "cosine")
        return self._listed(x, r, pairs, embeddings)

    def _inputs(self, embeddings, labels, ref_emb, ref_labels):
        """(labels, ref_emb, ref_labels, self_offset) as label mode takes them, PML's rules applied (labels
        move to the embeddings' device, as PML moves them, and float labels become class ids)."""
        cls = type(self).__name__
        if labels is None:
            raise ValueError(f"{cls}: labels are required unless a miner's indices_tuple is given")
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError(f"{cls}: ref_labels was given without ref_emb")
            return _class_ids(labels.to(embeddings.device), None)[0], None, None, None
        if ref_labels is None:
            raise ValueError(f"{cls}: ref_emb needs ref_labels (or a miner's indices_tuple)")
        offset = 0 if ref_labels is labels else None
        moved = labels.to(embeddings.device)
        labels, ref_labels = _class_ids(moved, moved if offset == 0 else ref_labels.to(ref_emb.device))
        return labels, ref_emb, ref_labels, offset

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
    Forward: ``embeddings [B, D]`` float, ``labels [B]`` integer or float, optional ``indices_tuple`` (a miner's
    output), ``ref_emb [M, D]``, ``ref_labels [M]``; returns a scalar in ``embeddings.dtype``.

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

    def _all_pairs(self, embeddings, labels, ref_emb, ref_labels, offset) -> Tensor:
        rows = F.oucl_embeddings(embeddings, labels, ref_emb, ref_labels, form="circle", beta=self.gamma,
                                 margin=self.m, similarity=self.similarity, reduction="none", self_offset=offset,
                                 backend=self.backend)
        return self._avg_non_zero(rows * self.gamma, embeddings)

    def _listed(self, x: Tensor, r: Tensor, pairs, embeddings: Tensor) -> Tensor:
        # PML marks the listed pairs in B×M masks: a pair listed twice counts once.
        lists = []
        for anchors, others in (pairs[:2], pairs[2:]):
            keys = torch.unique(anchors * r.shape[0] + others)
            anchors, others = keys // r.shape[0], keys % r.shape[0]
            lists += _per_anchor(anchors, _pair_scores(x, r, anchors, others), x.shape[0])
        rows = F.oucl(lists[0], lists[2], pos_mask=lists[1], neg_mask=lists[3], form="circle", beta=self.gamma,
                      margin=self.m, reduction="none", backend=self.backend)
        return self._avg_non_zero(rows * self.gamma, embeddings)

    def _avg_non_zero(self, losses: Tensor, embeddings: Tensor) -> Tensor:
        """PML's AvgNonZeroReducer, the mean of the rows above 0 (its zero loss if none is), except that a NaN
        row makes the loss NaN: PML drops that row and returns a finite loss whose gradients are NaN."""
        kept = losses > 0
        n_kept = kept.sum()
        loss = torch.where(kept, losses, torch.zeros_like(losses)).sum() / n_kept.clamp(min=1)
        loss = torch.where(n_kept > 0, loss, self._zero_loss(embeddings))
        return torch.where(losses.isnan().any(), torch.full_like(loss, float("nan")), loss)

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}, backend={self.backend!r}"


class NTXentLoss(_PairLoss):
    """pytorch-metric-learning's ``NTXentLoss(temperature=0.07)``: InfoNCE averaged over positive pairs.

    Args:
        temperature: τ (a float, or a 0-d tensor that gets its gradient).
        **kwargs: ``distance``: ``None``/``CosineSimilarity()`` (cosine), or
            ``DotProductSimilarity(normalize_embeddings=False)`` (plain inner products); ``reducer`` etc.: PML's
            defaults only; ``backend``: as :class:`CircleLoss`.
    Forward as :class:`CircleLoss`: ``embeddings [B, D]``, ``labels [B]``, optional ``indices_tuple``,
    ``ref_emb [M, D]``, ``ref_labels [M]``; returns a scalar.

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

    def _all_pairs(self, embeddings, labels, ref_emb, ref_labels, offset) -> Tensor:
        loss = F.info_nce_embeddings(embeddings, labels, ref_emb, ref_labels, temperature=self.temperature,
                                     similarity=self.similarity, reduction="mean", average="pair",
                                     self_offset=offset, backend=self.backend)
        # PML scores every positive pair, even one whose row has no negative (ours drops such rows): a NaN or
        # infinite embedding makes its loss NaN whatever the batch, as the zero loss added here does.
        return loss + self._zero_loss(embeddings)

    def _listed(self, x: Tensor, r: Tensor, pairs, embeddings: Tensor) -> Tensor:
        # PML scores the lists of pairs as they are: a pair listed twice counts twice, as a positive (twice in
        # the mean) or as a negative (twice in its anchor's denominator).
        pos, pos_mask = _per_anchor(pairs[0], _pair_scores(x, r, pairs[0], pairs[1]), x.shape[0])
        neg, neg_mask = _per_anchor(pairs[2], _pair_scores(x, r, pairs[2], pairs[3]), x.shape[0])
        loss = F.info_nce(pos, neg, temperature=self.temperature, pos_mask=pos_mask, neg_mask=neg_mask,
                          reduction="mean", average="pair", backend=self.backend)
        # A positive whose anchor has no listed negative scores -log 1 = 0 in both, but NaN in PML if its
        # score is: so it is here (masked entries are 0).
        return loss + (pos * 0).sum()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"
