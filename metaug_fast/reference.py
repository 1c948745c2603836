"""Pure-PyTorch implementation of docs/mathematics.md#mathematics.

This module is the oracle every fused backend is tested against and the portable fallback that works on
any device. It is written for clarity and exactness, not speed, but it is not deliberately slow: it uses
the factorization of docs/mathematics.md#factorization (two row-wise log-sum-exps instead of the K⁺×K⁻ pair
matrix), so a row costs O(K⁺ + K⁻). Everything here is differentiable to second order with plain autograd.

Conventions shared by every function:

* fp16/bf16 inputs are computed in fp32 and the result is cast back to the input dtype.
* A mask entry ``False`` means the score does not exist: it is ignored even when it is NaN or inf, and it
  receives an exact zero gradient. A *valid* row has at least one positive and one negative.
* Inputs are not validated here; :mod:`metaug_fast.functional` validates before dispatching.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import OUCL_FORMS, LossParams, normalizes, slope
from .contract import SIMILARITIES as _SIMILARITY_IDS

__all__ = [
    "FORMS",
    "SIMILARITIES",
    "REDUCTIONS",
    "pairwise_similarity",
    "label_scores",
    "valid_rows",
    "reduce_rows",
    "positive_counts",
    "temperature_scale",
    "oucl",
    "oucl_embeddings",
    "info_nce",
    "info_nce_embeddings",
    "margin_statistics",
    "margin_statistics_embeddings",
    "margin_injection_loss",
]

FORMS = tuple(OUCL_FORMS)
SIMILARITIES = tuple(_SIMILARITY_IDS)
DEFAULTS = LossParams()
REDUCTIONS = ("mean", "sum", "none")
AVERAGES = ("anchor", "pair")


def acc(x: Tensor) -> Tensor:
    """Upcast half precision to fp32 so that every sum and exp accumulates in fp32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def apply_similarity(cos: Tensor, similarity: str) -> Tensor:
    return (1.0 + cos) * 0.5 if similarity == "shifted_cosine" else cos


def similarity_rows(x: Tensor, similarity: str) -> Tensor:
    """The rows whose inner products the similarity takes: L2-normalized, or as given for "dot"."""
    return F.normalize(acc(x), dim=1) if normalizes(similarity) else acc(x)


def pairwise_similarity(a: Tensor, b: Tensor, *, similarity: str = "shifted_cosine") -> Tensor:
    """d(a_i, b_j) for every pair: ``a [B,D]``, ``b [M,D]`` -> ``[B,M]`` in ``a.dtype``.

    Rows are L2-normalized first (gradients include the normalization; a zero row has similarity
    cos = 0 with everything), except for ``"dot"``, the inner product of the rows as given.
    """
    a_n = similarity_rows(a, similarity)
    b_n = similarity_rows(b, similarity)
    return apply_similarity(a_n @ b_n.T, similarity).to(a.dtype)


def label_scores(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    similarity: str = "shifted_cosine",
    self_offset: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Label mode as score mode: ``(scores [B,M], pos_mask [B,M], neg_mask [B,M])``.

    ``scores`` stays in the accumulation dtype (fp32 for fp16/bf16). Without a reference set the
    reference is ``emb`` itself and the diagonal (j = i) is neither positive nor negative; with one,
    ``self_offset`` says that anchor i is reference row i + self_offset (a rank's rows inside a gathered
    batch), and that pair is excluded too.
    """
    z = similarity_rows(emb, similarity)
    if ref_emb is None:
        r, ref_labels = z, labels
    else:
        r = similarity_rows(ref_emb, similarity)
    scores = apply_similarity(z @ r.T, similarity)
    same = labels[:, None] == ref_labels[None, :]
    neg_mask = ~same
    offset = 0 if ref_emb is None else self_offset
    if offset is not None:
        rows = torch.arange(emb.shape[0], device=emb.device)
        same = same.clone()
        same[rows, rows + offset] = False
    return scores, same, neg_mask


def valid_rows(pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor], neg_mask: Optional[Tensor]) -> Tensor:
    """``[B]`` bool: the row has at least one positive and at least one negative."""
    B = pos.shape[0]
    has_pos = pos_mask.any(1) if pos_mask is not None else torch.full((B,), pos.shape[1] > 0, device=pos.device)
    has_neg = neg_mask.any(1) if neg_mask is not None else torch.full((B,), neg.shape[1] > 0, device=neg.device)
    return has_pos & has_neg


def masked(x: Tensor, mask: Optional[Tensor], fill: float) -> Tensor:
    return x if mask is None else torch.where(mask, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def _score_rows(pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor], neg_mask: Optional[Tensor]):
    """(valid ``[B]``, pos, neg) of a score-mode loss: the scores in the accumulation dtype, masked entries 0."""
    return valid_rows(pos, neg, pos_mask, neg_mask), masked(acc(pos), pos_mask, 0.0), masked(acc(neg), neg_mask,
                                                                                                0.0)


def _row_lse(x: Tensor, mask: Optional[Tensor], valid: Tensor) -> Tensor:
    """Row log-sum-exp over the entries the mask keeps.

    Invalid rows are replaced by zeros before the reduction: their result is discarded by the caller,
    and an all -inf row would give NaN gradients through torch.logsumexp.
    """
    x = masked(x, mask, float("-inf"))
    x = torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.logsumexp(x, dim=1)


def softplus(x: Tensor) -> Tensor:
    # log(1 + e^x) without F.softplus's linear cut-off at x > 20, so fp64 results are exact.
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def exponents(
    p: Tensor, n: Tensor, form: str, beta: float, gamma_pos: float, gamma_neg: float, margin: float
) -> Tuple[Tensor, Tensor]:
    """u(p) and v(n) of docs/mathematics.md#factorization: the pair term is exp(u(p) + v(n))."""
    if form == "squared":
        return beta * (p - 1.0) ** 2, beta * (n * n - 2.0 * margin * margin)
    if form == "weighted":
        return -beta * (p - gamma_pos), beta * (n - gamma_neg)
    if form != "circle":  # hinge has no exponents; anything else is not a form
        raise ValueError(f"form must be one of {tuple(f for f in OUCL_FORMS if f != 'hinge')} here, got {form!r}")
    # circle: Γ⁺ and Γ⁻ are constants for autograd, at every order.
    gp = torch.relu(1.0 + margin - p).detach()
    gn = torch.relu(n + margin).detach()
    return -beta * gp * (p - (1.0 - margin)), beta * gn * (n - margin)


def reduce_rows(rows: Tensor, valid: Tensor, reduction: str, dtype: torch.dtype,
                weights: Optional[Tensor] = None) -> Tensor:
    """Reduce per-row losses ``[B]``: "mean" averages over valid rows (0 when there are none). Invalid rows
    (no positive or no negative) count 0, whatever their entry holds. With ``weights [B]`` (InfoNCE's pair
    average: each row's number of positives) a row counts ``weights_i`` times, "none" returns the weighted
    rows and "mean" divides by the sum of every row's weight."""
    rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if weights is not None:
        rows = acc(rows) * weights.to(acc(rows).dtype)
    if reduction == "none":
        return rows.to(dtype)
    rows = acc(rows)
    total = rows.sum()
    if reduction == "mean":
        total = total / (valid.sum() if weights is None else weights.sum()).clamp(min=1)
    return total.to(dtype)


def positive_counts(labels: Tensor, ref_labels: Optional[Tensor] = None, self_offset: Optional[int] = None) -> Tensor:
    """``[B]`` int64: each anchor's number of positives in label mode (as :func:`label_scores` masks them),
    from a sort of the reference labels (O((B + M)·log M), never B×M)."""
    ref = labels if ref_labels is None else ref_labels
    ordered = torch.sort(ref.long()).values
    lab = labels.long()
    counts = torch.searchsorted(ordered, lab, right=True) - torch.searchsorted(ordered, lab)
    offset = 0 if ref_labels is None else self_offset
    if offset is not None and labels.shape[0]:
        counts = counts - (ref[offset:offset + labels.shape[0]].long() == lab).long()
    return counts


def pair_weights(average: str, pos: Tensor, pos_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The weights of :func:`reduce_rows` for InfoNCE's ``average``: None per anchor, positive counts per pair."""
    if average == "anchor":
        return None
    if pos_mask is not None:
        return pos_mask.sum(1)
    return torch.full((pos.shape[0],), pos.shape[1], device=pos.device)


def temperature_scale(temperature: Tensor, similarity: str) -> Tensor:
    """c with InfoNCE(d / τ) = InfoNCE(⟨c·x, c·y⟩) at τ = 1 for rows x, y as the similarity takes them:
    c = (a/τ)^½ with d = a·⟨x, y⟩ + b (b is dropped: a shift common to a row's scores leaves InfoNCE as it
    is). How the fused backends take a temperature tensor: the scale is a torch op, so τ gets its gradient
    from autograd, at every order."""
    return (slope(similarity) / temperature).sqrt()


def oucl(
    pos: Tensor,
    neg: Tensor,
    *,
    form: str = DEFAULTS.form,
    beta: float = DEFAULTS.beta,
    gamma_pos: float = DEFAULTS.gamma_pos,
    gamma_neg: float = DEFAULTS.gamma_neg,
    margin: float = DEFAULTS.margin,
    lam: float = DEFAULTS.lam,
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """OUCL loss in score mode (docs/mathematics.md#oucl-forms).

    Args:
        pos: ``[B, K⁺]`` positive scores, float16/bfloat16/float32/float64.
        neg: ``[B, K⁻]`` negative scores, same dtype and device.
        pos_mask: optional bool mask of ``pos``'s shape (True = the entry counts).
        neg_mask: optional bool mask of ``neg``'s shape.
    Returns:
        A scalar for ``"mean"``/``"sum"``, ``[B]`` for ``"none"`` (0 for invalid rows), in ``pos.dtype``.
    """
    valid, p, n = _score_rows(pos, neg, pos_mask, neg_mask)
    if form == "hinge":
        rows = torch.relu(n.sum(1) - p.sum(1) + lam)
    else:
        u, v = exponents(p, n, form, beta, gamma_pos, gamma_neg, margin)
        rows = softplus(_row_lse(u, pos_mask, valid) + _row_lse(v, neg_mask, valid)) / beta
    return reduce_rows(rows, valid, reduction, pos.dtype)


def oucl_embeddings(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    similarity: str = "shifted_cosine",
    form: str = DEFAULTS.form,
    beta: float = DEFAULTS.beta,
    gamma_pos: float = DEFAULTS.gamma_pos,
    gamma_neg: float = DEFAULTS.gamma_neg,
    margin: float = DEFAULTS.margin,
    lam: float = DEFAULTS.lam,
    reduction: str = "mean",
    self_offset: Optional[int] = None,
) -> Tensor:
    """OUCL loss in label mode: ``emb [B,D]``, ``labels [B]``, optional ``ref_emb [M,D]``, ``ref_labels [M]``
    (``self_offset`` as in :func:`label_scores`).

    Materializes the ``[B,M]`` score matrix (the reason fused backends exist). Result in ``emb.dtype``.
    """
    scores, pm, nm = label_scores(emb, labels, ref_emb, ref_labels, similarity=similarity, self_offset=self_offset)
    out = oucl(
        scores, scores, form=form, beta=beta, gamma_pos=gamma_pos, gamma_neg=gamma_neg, margin=margin,
        lam=lam, pos_mask=pm, neg_mask=nm, reduction=reduction,
    )
    return out.to(emb.dtype)


def info_nce(
    pos: Tensor,
    neg: Tensor,
    *,
    temperature=0.07,
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
    reduction: str = "mean",
    average: str = "anchor",
) -> Tensor:
    """InfoNCE in score mode: ``pos [B,K⁺]``, ``neg [B,K⁻]`` similarities.

    For positive k of row i: -log(e^{p_k/τ} / (e^{p_k/τ} + Σ_j e^{n_j/τ})) = softplus(LSE_j(n_j/τ) - p_k/τ).
    ``average="anchor"``: the row's loss is the mean over its positives, reduced as in :func:`oucl`;
    ``"pair"``: the row's loss is the sum over its positives and "mean" divides by the number of positive
    pairs (pytorch-metric-learning's NT-Xent; a pair whose anchor has no negative has loss -log 1 = 0).
    ``temperature``: a float or a 0-d tensor (which then gets its gradient).
    """
    valid, p, n = _score_rows(pos, neg, pos_mask, neg_mask)
    lse_neg = _row_lse(n / temperature, neg_mask, valid)
    per_pos = masked(softplus(lse_neg[:, None] - p / temperature), pos_mask, 0.0)
    if pos_mask is None:
        rows = per_pos.mean(1) if pos.shape[1] > 0 else per_pos.sum(1)
    else:
        rows = per_pos.sum(1) / pos_mask.sum(1).clamp(min=1)
    return reduce_rows(rows, valid, reduction, pos.dtype, pair_weights(average, pos, pos_mask))


def info_nce_embeddings(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature=0.07,
    similarity: str = "cosine",
    reduction: str = "mean",
    average: str = "anchor",
    self_offset: Optional[int] = None,
) -> Tensor:
    """InfoNCE in label mode (NT-Xent for two views: ``emb = cat(z1, z2)``, ``labels = arange(B)`` twice);
    ``average`` and ``temperature`` as in :func:`info_nce`, ``self_offset`` as in :func:`label_scores`."""
    scores, pm, nm = label_scores(emb, labels, ref_emb, ref_labels, similarity=similarity, self_offset=self_offset)
    out = info_nce(scores, scores, temperature=temperature, pos_mask=pm, neg_mask=nm, reduction=reduction,
                   average=average)
    return out.to(emb.dtype)


def symmetric_info_nce(
    emb: Tensor,
    ref_emb: Tensor,
    labels: Tensor,
    ref_labels: Tensor,
    *,
    temperature=0.07,
    similarity: str = "cosine",
    reduction: str = "mean",
    average: str = "anchor",
) -> Tensor:
    """InfoNCE both ways between two sets (CLIP's loss): the mean of :func:`info_nce_embeddings` of ``emb``
    against ``ref_emb`` and of ``ref_emb`` against ``emb``, each reduced by ``reduction`` ("mean" or "sum")."""
    return two_way(info_nce_embeddings)(emb, ref_emb, labels, ref_labels, temperature=temperature,
                                        similarity=similarity, reduction=reduction, average=average)


def two_way(info_nce_embeddings_impl: Callable) -> Callable:
    """:func:`symmetric_info_nce` from a backend's ``info_nce_embeddings``, called once per direction."""
    def symmetric(emb, ref_emb, labels, ref_labels, **kw):
        return (info_nce_embeddings_impl(emb, labels, ref_emb, ref_labels, **kw)
                + info_nce_embeddings_impl(ref_emb, ref_labels, emb, labels, **kw)) / 2
    return symmetric


def margin_statistics(
    pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor] = None, neg_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """σ⁺ = min(p_min, n_max) and σ⁻ = max(p_min, n_max) per row (docs/mathematics.md#margins), ``[B]`` each.

    Gradients reach the arg-min/arg-max entries (split evenly between ties, as torch.amin/amax do). A row
    without a positive or a negative gets σ⁺ = +inf and σ⁻ = -inf: it puts no constraint on the
    augmented scores in :func:`margin_injection_loss`.
    """
    valid = valid_rows(pos, neg, pos_mask, neg_mask)
    p = masked(acc(pos), pos_mask, float("inf"))
    n = masked(acc(neg), neg_mask, float("-inf"))
    B = pos.shape[0]
    inf = torch.full((B,), float("inf"), dtype=p.dtype, device=p.device)
    p_min = p.amin(1) if pos.shape[1] > 0 else inf
    n_max = n.amax(1) if neg.shape[1] > 0 else -inf
    sigma_pos = torch.where(valid, torch.minimum(p_min, n_max), inf)
    sigma_neg = torch.where(valid, torch.maximum(p_min, n_max), -inf)
    return sigma_pos.to(pos.dtype), sigma_neg.to(pos.dtype)


def margin_statistics_embeddings(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    similarity: str = "shifted_cosine",
) -> Tuple[Tensor, Tensor]:
    """:func:`margin_statistics` in label mode: ``emb [B,D]``, ``labels [B]``, optional reference set;
    ``(sigma_pos [B], sigma_neg [B])`` in ``emb.dtype``."""
    scores, pm, nm = label_scores(emb, labels, ref_emb, ref_labels, similarity=similarity)
    sp, sn = margin_statistics(scores, scores, pm, nm)
    return sp.to(emb.dtype), sn.to(emb.dtype)


def _masked_row_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return x.mean(1) if x.shape[1] > 0 else x.sum(1)
    return masked(x, mask, 0.0).sum(1) / mask.sum(1).clamp(min=1)


def margin_injection_loss(
    pos_aug: Tensor,
    neg_aug: Tensor,
    sigma_pos: Tensor,
    sigma_neg: Tensor,
    *,
    detach_margin: bool = False,
    reduction: str = "mean",
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
) -> Tensor:
    """R_σ (docs/mathematics.md#margins).

    Args:
        pos_aug: ``[B, K̂⁺]`` scores of augmented positives.
        neg_aug: ``[B, K̂⁻]`` scores of augmented negatives.
        sigma_pos: ``[B]`` σ⁺ from :func:`margin_statistics` on the original features.
        sigma_neg: ``[B]`` σ⁻.
        pos_mask: optional bool mask over ``pos_aug``; a row's mean is over the entries kept (a row with
            none contributes 0 for that term).
        neg_mask: optional bool mask over ``neg_aug``.
    Returns:
        ``mean_i(mean_k [P̂_ik - σ⁺_i]_+ + mean_k [σ⁻_i - N̂_ik]_+)`` over all B rows for ``"mean"``,
        the sum for ``"sum"``, ``[B]`` for ``"none"``; in ``pos_aug.dtype``.
    """
    sp, sn = acc(sigma_pos), acc(sigma_neg)
    if detach_margin:
        sp, sn = sp.detach(), sn.detach()
    p = masked(acc(pos_aug), pos_mask, 0.0)
    n = masked(acc(neg_aug), neg_mask, 0.0)
    rows = _masked_row_mean(torch.relu(p - sp[:, None]), pos_mask) + _masked_row_mean(
        torch.relu(sn[:, None] - n), neg_mask
    )
    if reduction == "none":
        return rows.to(pos_aug.dtype)
    out = rows.sum() if reduction == "sum" else rows.mean() if rows.numel() else rows.sum()
    return out.to(pos_aug.dtype)
