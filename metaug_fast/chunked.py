"""Label-mode OUCL against a large reference set (a memory bank) in chunks, never storing B×M.

The reference set is cut into chunks of ``chunk_size`` rows. Each chunk yields, per anchor row, the
shifted partial sums (m, s) of its positives' and negatives' log-sum-exps (or the hinge's partial sums);
they are combined across chunks exactly like flash-attention's online softmax. Every chunk runs under
activation checkpointing, so the backward pass recomputes the chunk's ``[B, chunk]`` scores instead of
keeping them: peak memory is O(B·chunk + (B + M)·D), independent of B×M.

The results equal :func:`metaug_fast.reference.oucl_embeddings` with ``ref_emb`` (tested), with first
derivatives through the normalization of ``emb`` and ``ref_emb``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from . import reference as R
from ._numerics import combine, finite_or_zero
from .contract import LossParams

DEFAULTS = LossParams()


def _chunk_partials(z: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, similarity: str, form: str,
                    beta: float, gamma_pos: float, gamma_neg: float, margin: float) -> Tuple[Tensor, ...]:
    """Per row of ``z [B,D]`` against one chunk ``ref [c,D]``: (m_pos, s_pos, m_neg, s_neg, n_pos, n_neg),
    with LSE = m + log s; for the hinge form s holds plain sums and m is zero."""
    scores = R.apply_similarity(z @ F.normalize(R.acc(ref), dim=1).T, similarity)
    pm = labels[:, None] == ref_labels[None, :]
    nm = ~pm
    counts = (pm.sum(1), nm.sum(1))
    if form == "hinge":
        zero = torch.zeros(z.shape[0], dtype=scores.dtype, device=z.device)
        return zero, R.masked(scores, pm, 0.0).sum(1), zero, R.masked(scores, nm, 0.0).sum(1), *counts
    u, v = R.exponents(scores, scores, form, beta, gamma_pos, gamma_neg, margin)
    out = []
    for x, mask in ((u, pm), (v, nm)):
        x = R.masked(x, mask, float("-inf"))
        m = finite_or_zero(x.amax(1, keepdim=True).detach())
        s = torch.exp(x - m).sum(1)
        # A chunk with no entry for the row reports m = -inf so that it cannot win the max in combine.
        out += [torch.where(s > 0, m[:, 0], torch.full_like(s, float("-inf"))), s]
    return (*out, *counts)


def oucl_embeddings_chunked(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Tensor,
    ref_labels: Tensor,
    *,
    chunk_size: int = 4096,
    similarity: str = "shifted_cosine",
    params: LossParams = DEFAULTS,
    reduction: str = "mean",
) -> Tensor:
    """Label-mode OUCL of ``emb [B,D]`` against ``ref_emb [M,D]`` (``labels [B]``, ``ref_labels [M]``),
    ``chunk_size`` reference rows at a time, with the loss parameters ``params`` (validated when built).
    Same result as :func:`metaug_fast.functional.oucl_embeddings` with a reference set, whose checks of the
    tensors are not repeated here (``MemoryBank.score_all`` makes them)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    z = F.normalize(R.acc(emb), dim=1)
    form, beta = params.form, params.beta
    args = (similarity, form, beta, params.gamma_pos, params.gamma_neg, params.margin)
    parts = []
    for start in range(0, ref_emb.shape[0], chunk_size):
        ref, ref_lab = ref_emb[start:start + chunk_size], ref_labels[start:start + chunk_size]
        parts.append(checkpoint(_chunk_partials, z, labels, ref, ref_lab, *args, use_reentrant=False))
    stacked = [torch.stack(p, 1) for p in zip(*parts)] if parts else None
    B = emb.shape[0]
    if stacked is None:
        return R.reduce_rows(torch.zeros(B, dtype=z.dtype, device=z.device), torch.zeros(B, dtype=torch.bool,
                             device=z.device), reduction, emb.dtype)
    m_pos, s_pos, m_neg, s_neg, n_pos, n_neg = stacked
    valid = (n_pos.sum(1) > 0) & (n_neg.sum(1) > 0)
    if form == "hinge":
        rows = torch.relu(s_neg.sum(1) - s_pos.sum(1) + params.lam)
    else:
        (mp, sp), (mn, sn) = combine(m_pos, s_pos), combine(m_neg, s_neg)
        one = torch.ones((), dtype=z.dtype, device=z.device)
        lse_pos = mp + torch.log(torch.where(valid, sp, one))  # invalid rows are dropped by reduce_rows
        lse_neg = mn + torch.log(torch.where(valid, sn, one))
        rows = R.softplus(lse_pos + lse_neg) / beta
    return R.reduce_rows(rows, valid, reduction, emb.dtype)
