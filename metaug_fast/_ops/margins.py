"""Margin statistics on the C++ (and CUDA) backend, score mode: ``torch.ops.metaug_fast.margin_score_{fwd,bwd}``
find each row's minimum positive and maximum negative with their ties in one pass; the backward shares the
gradient equally among tied entries, as torch.amin/amax do. σ⁺ = min(p_min, n_max) and σ⁻ = max(p_min,
n_max) are then taken with torch.minimum/maximum, which split a tie between p_min and n_max the same way
reference.py does. A gradient of the gradient is recomputed with differentiable PyTorch ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference

MARGIN_ID = 5  # csrc/oucl_common.h: kMargin


def sigmas(p_min: Tensor, n_max: Tensor, valid: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(σ⁺, σ⁻) from row extrema; rows without a positive or a negative get (+inf, -inf)."""
    inf = torch.full_like(p_min, float("inf"))
    sigma_pos = torch.where(valid, torch.minimum(p_min, n_max), inf)
    sigma_neg = torch.where(valid, torch.maximum(p_min, n_max), -inf)
    return sigma_pos.to(dtype), sigma_neg.to(dtype)


class _MarginScore(torch.autograd.Function):
    """(pos [B,K⁺], neg [B,K⁻]) -> (p_min [B], n_max [B], valid [B]) in the accumulation dtype."""

    @staticmethod
    def forward(ctx, pos, neg, pos_mask, neg_mask):
        stats = torch.ops.metaug_fast.margin_score_fwd(pos.detach(), neg.detach(), pos_mask, neg_mask)
        ctx.save_for_backward(pos, neg, pos_mask, neg_mask, stats)
        valid = stats[:, 4] > 0
        ctx.mark_non_differentiable(valid)
        return stats[:, 0].clone(), stats[:, 1].clone(), valid

    @staticmethod
    def backward(ctx, g_min, g_max, _g_valid):
        pos, neg, pos_mask, neg_mask, stats = ctx.saved_tensors
        if torch.is_grad_enabled():
            p = reference._masked(reference._acc(pos), pos_mask, float("inf"))
            n = reference._masked(reference._acc(neg), neg_mask, float("-inf"))
            valid = stats[:, 4] > 0
            p_min = p.amin(1) if pos.shape[1] else stats[:, 0]
            n_max = n.amax(1) if neg.shape[1] else stats[:, 1]
            outs = [torch.where(valid, p_min, 0 * p_min), torch.where(valid, n_max, 0 * n_max)]
            wanted = [x for x, need in zip((pos, neg), ctx.needs_input_grad[:2]) if need]
            grads = iter(torch.autograd.grad(outs, wanted, (g_min, g_max), create_graph=True, allow_unused=True))
            return (*(next(grads) if need else None for need in ctx.needs_input_grad[:2]), None, None)
        gp, gn = torch.ops.metaug_fast.margin_score_bwd(
            torch.stack([g_min, g_max], 1).contiguous(), pos.detach(), neg.detach(), pos_mask, neg_mask, stats
        )
        return gp, gn, None, None


def margin_statistics_fused(pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor] = None,
                            neg_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Same contract as :func:`metaug_fast.reference.margin_statistics`, one fused pass per row."""
    p_min, n_max, valid = _MarginScore.apply(pos, neg, pos_mask, neg_mask)
    return sigmas(p_min, n_max, valid, pos.dtype)
