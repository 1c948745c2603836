"""Margin statistics on the fused backends, score mode: ``margin_score_{fwd,bwd}`` (C++/CUDA ops or Triton)
find each row's minimum positive and maximum negative with their ties in one pass; the backward shares the
gradient equally among tied entries, as torch.amin/amax do. σ⁺ = min(p_min, n_max) and σ⁻ = max(p_min,
n_max) are then taken with torch.minimum/maximum, which split a tie between p_min and n_max the same way
reference.py does. When a differentiable gradient is needed (create_graph, torch.func), the same shares
are computed with PyTorch ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..contract import Stat
from .score import CPP_OPS


def sigmas(p_min: Tensor, n_max: Tensor, valid: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(σ⁺, σ⁻) from row extrema; rows without a positive or a negative get (+inf, -inf)."""
    inf = torch.full_like(p_min, float("inf"))
    sigma_pos = torch.where(valid, torch.minimum(p_min, n_max), inf)
    sigma_neg = torch.where(valid, torch.maximum(p_min, n_max), -inf)
    return sigma_pos.to(dtype), sigma_neg.to(dtype)


class _MarginScore(torch.autograd.Function):
    """(pos [B,K⁺], neg [B,K⁻]) -> (p_min [B], n_max [B], valid [B], stats [B,5]) in the accumulation dtype
    (setup_context style, so torch.func transforms can use it)."""

    @staticmethod
    def forward(pos, neg, pos_mask, neg_mask, ops):
        stats = ops.margin_score_fwd(pos, neg, pos_mask, neg_mask)
        return stats[:, Stat.P_MIN].clone(), stats[:, Stat.N_MAX].clone(), stats[:, Stat.VALID] > 0, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        pos, neg, pos_mask, neg_mask, ops = inputs
        ctx.save_for_backward(pos, neg, pos_mask, neg_mask, output[3])
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.ops = ops

    @staticmethod
    def backward(ctx, g_min, g_max, _g_valid, _g_stats):
        pos, neg, pos_mask, neg_mask, stats = ctx.saved_tensors
        if torch.is_grad_enabled():
            # A differentiable gradient (create_graph or torch.func): the same shares in PyTorch ops, linear
            # in the incoming gradient and piecewise constant in the scores, as torch.amin/amax's backward.
            return (_share(pos, pos_mask, stats[:, Stat.P_MIN], stats[:, Stat.TIES_POS], g_min),
                    _share(neg, neg_mask, stats[:, Stat.N_MAX], stats[:, Stat.TIES_NEG], g_max), None, None, None)
        gp, gn = ctx.ops.margin_score_bwd(
            torch.stack([g_min, g_max], 1).contiguous(), pos, neg, pos_mask, neg_mask, stats
        )
        return gp, gn, None, None, None


def _share(x: Tensor, mask: Optional[Tensor], value: Tensor, ties: Tensor, g: Tensor) -> Tensor:
    """g/ties on the kept entries equal to the row's extremum (NaN on every kept entry of a NaN row)."""
    dtype, x = x.dtype, reference.acc(x)
    kept = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    share = (g / ties.clamp(min=1))[:, None]
    nan_row = torch.isnan(value)[:, None]
    out = torch.where(kept & (x == value[:, None]), share, torch.zeros_like(share))
    out = torch.where(kept & nan_row, torch.full_like(out, float("nan")), out)
    return out.to(dtype)


def margin_statistics_fused(pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor] = None,
                            neg_mask: Optional[Tensor] = None, ops=CPP_OPS) -> Tuple[Tensor, Tensor]:
    """Same contract as :func:`metaug_fast.reference.margin_statistics`, one fused pass per row on the
    kernels of ``ops`` (the C++/CUDA ops or Triton's)."""
    p_min, n_max, valid, _ = _MarginScore.apply(pos, neg, pos_mask, neg_mask, ops)
    return sigmas(p_min, n_max, valid, pos.dtype)


class _MarginInjection(torch.autograd.Function):
    """(pos_aug [B,K̂⁺], neg_aug [B,K̂⁻], σ⁺ [B], σ⁻ [B]) -> per-row R_σ [B] on the Triton kernels. The loss is
    piecewise linear, so its gradient is the incoming gradient times constant indicators: when a graph of
    the backward is requested it is written with those indicators in PyTorch ops (exact: zero Hessian,
    linear in the incoming gradient)."""

    @staticmethod
    def forward(ctx, pos, neg, sigma_pos, sigma_neg, pos_mask, neg_mask):
        from ..kernels.margins import margin_injection_fwd

        ctx.save_for_backward(pos, neg, sigma_pos, sigma_neg, pos_mask, neg_mask)
        return margin_injection_fwd(pos, neg, pos_mask, neg_mask, sigma_pos, sigma_neg)

    @staticmethod
    def backward(ctx, g):
        pos, neg, sp, sn, pm, nm = ctx.saved_tensors
        if torch.is_grad_enabled():
            gp, d_sp = _hinge_share(pos, pm, sp, g, 1.0)
            gn, d_sn = _hinge_share(neg, nm, sn, g, -1.0)
        else:
            from ..kernels.margins import margin_injection_bwd

            gp, gn, d_sp, d_sn = margin_injection_bwd(g, pos, neg, pm, nm, sp, sn)
        return gp, gn, d_sp.to(sp.dtype), d_sn.to(sn.dtype), None, None


def _hinge_share(x: Tensor, mask: Optional[Tensor], sigma: Tensor, g: Tensor, sign: float):
    """∂/∂x and ∂/∂σ of mean_k [sign·(x_k - σ)]_+ times g, per row, in PyTorch ops."""
    x_acc = reference.acc(x)
    kept = torch.ones_like(x_acc, dtype=torch.bool) if mask is None else mask
    on = kept & (sign * (x_acc - reference.acc(sigma)[:, None]) > 0)
    share = (sign * g / kept.sum(1).clamp(min=1))[:, None]
    grad = torch.where(on, share, torch.zeros_like(share))
    return grad.to(x.dtype), -grad.sum(1)


def margin_injection_loss_triton(pos_aug: Tensor, neg_aug: Tensor, sigma_pos: Tensor, sigma_neg: Tensor, *,
                                 detach_margin: bool, reduction: str, pos_mask: Optional[Tensor],
                                 neg_mask: Optional[Tensor]) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.margin_injection_loss`, one Triton pass per row."""
    if detach_margin:
        sigma_pos, sigma_neg = sigma_pos.detach(), sigma_neg.detach()
    rows = _MarginInjection.apply(pos_aug, neg_aug, sigma_pos, sigma_neg, pos_mask, neg_mask)
    if reduction == "none":
        return rows.to(pos_aug.dtype)
    out = rows.sum() if reduction == "sum" or rows.numel() == 0 else rows.mean()
    return out.to(pos_aug.dtype)
