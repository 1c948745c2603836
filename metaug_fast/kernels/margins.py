"""Margin statistics and margin injection in Triton, score mode, the row-block layout of score.py.

``margin_score_{fwd,bwd}`` take and return what the C++ ops of the same names take and return: per row the
minimum kept positive and maximum kept negative with their tie counts, stats ``[B, 5]`` = (p_min, n_max,
ties_p, ties_n, valid), NaN sticky as torch.amin/amax; the backward shares ∂/∂p_min, ∂/∂n_max among the
ties. ``margin_injection_{fwd,bwd}`` give the margin-injection regularizer R_σ per row and its gradients
(metaug_fast/_ops/margins.py).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    COMPILE_OPTIONS,  # noqa: F401  (how run_rows compiles them; tools/ reads it here)
    acc_dtype,
    extremum_update,
    load_rows,
    load_stats,
    mask_flags,
    op,
    run_rows,
    score_args,
    store_stats,
    tuned,
)


# ------------------------------------------------------------------------------------ margin statistics
@triton.jit
def _side_extremum(x_ptr, m_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, MIN: tl.constexpr, HAS_M: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """(extremum, ties) over the kept entries of each row; NaN is sticky (extremum NaN, ties 1) and an empty
    row gives (±inf, 0)."""
    limit = float("inf") if MIN else float("-inf")
    best = tl.full((BLOCK_B,), limit, acc_ty)
    ties = tl.zeros((BLOCK_B,), acc_ty)
    has_nan = tl.zeros((BLOCK_B,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        best, ties, has_nan = extremum_update(best, ties, has_nan, x, keep, MIN)
    nan = has_nan > 0
    return tl.where(nan, float("nan"), best), tl.where(nan, 1.0, ties)


@tuned((16, 128, 8), (4, 256, 4), (4, 512, 4), (4, 128, 8))
@triton.jit
def _margin_fwd_kernel(pos_ptr, neg_ptr, pm_ptr, nm_ptr, stats_ptr, B, KP, KN, s_pb, s_pk, s_nb, s_nk,
                       s_pmb, s_pmk, s_nmb, s_nmk, HAS_PM: tl.constexpr, HAS_NM: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    acc_ty = stats_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    p_min, ties_p = _side_extremum(pos_ptr, pm_ptr, rows, rmask, KP, s_pb, s_pk, s_pmb, s_pmk, True, HAS_PM,
                                   BLOCK_B, BLOCK_K, acc_ty)
    n_max, ties_n = _side_extremum(neg_ptr, nm_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, False, HAS_NM,
                                   BLOCK_B, BLOCK_K, acc_ty)
    store_stats(stats_ptr, rows, rmask, p_min, n_max, ties_p, ties_n, (ties_p > 0) & (ties_n > 0))


@triton.jit
def _side_extremum_grad(x_ptr, m_ptr, out_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, best, share,
                        HAS_M: tl.constexpr, BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """Each entry attaining the extremum gets ``share``; a NaN extremum gives every kept entry NaN (as
    torch.amin/amax's 0/0)."""
    nan = best != best
    for k0 in range(0, K, BLOCK_K):
        x, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        cols = k0 + tl.arange(0, BLOCK_K)
        grad = tl.where(nan[:, None], float("nan"), tl.where(x == best[:, None], share[:, None], 0.0))
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                 tl.where(keep, grad, 0.0).to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < K))


@tuned((16, 128, 8), (4, 256, 4), (4, 512, 4), (4, 128, 4))
@triton.jit
def _margin_bwd_kernel(g_ptr, pos_ptr, neg_ptr, pm_ptr, nm_ptr, stats_ptr, gp_ptr, gn_ptr, B, KP, KN,
                       s_pb, s_pk, s_nb, s_nk, s_pmb, s_pmk, s_nmb, s_nmk, HAS_PM: tl.constexpr,
                       HAS_NM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    acc_ty = stats_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    p_min, n_max, ties_p, ties_n, valid = load_stats(stats_ptr, rows, rmask)
    g_min = tl.load(g_ptr + rows * 2, mask=rmask, other=0.0).to(acc_ty)
    g_max = tl.load(g_ptr + rows * 2 + 1, mask=rmask, other=0.0).to(acc_ty)
    share_p = tl.where(valid, g_min / tl.maximum(ties_p, 1.0), 0.0)
    share_n = tl.where(valid, g_max / tl.maximum(ties_n, 1.0), 0.0)
    _side_extremum_grad(pos_ptr, pm_ptr, gp_ptr, rows, rmask, KP, s_pb, s_pk, s_pmb, s_pmk, p_min, share_p, HAS_PM,
                        BLOCK_K, acc_ty)
    _side_extremum_grad(neg_ptr, nm_ptr, gn_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, n_max, share_n, HAS_NM,
                        BLOCK_K, acc_ty)


# ------------------------------------------------------------------------------------ margin injection
@triton.jit
def _hinge_mean(x_ptr, m_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, sigma, SIGN: tl.constexpr,
                HAS_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """mean over kept entries of [SIGN·(x - σ)]_+ per row (NaN propagates, as torch.relu), and the count."""
    total = tl.zeros((BLOCK_B,), acc_ty)
    count = tl.zeros((BLOCK_B,), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        x, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        d = SIGN * (x - sigma[:, None])
        total += tl.sum(tl.where(keep & ((d > 0) | (d != d)), d, 0.0), axis=1)
        count += tl.sum(keep.to(acc_ty), axis=1)
    return total / tl.maximum(count, 1.0), count


@tuned((4, 256, 4), (4, 512, 8), (16, 128, 8), (4, 128, 4))
@triton.jit
def _margin_injection_fwd_kernel(pos_ptr, neg_ptr, pm_ptr, nm_ptr, sp_ptr, sn_ptr, rows_ptr, B, KP, KN,
                                 s_pb, s_pk, s_nb, s_nk, s_pmb, s_pmk, s_nmb, s_nmk, HAS_PM: tl.constexpr,
                                 HAS_NM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """R_σ per row: mean_k [p̂_k - σ⁺]_+ + mean_k [σ⁻ - n̂_k]_+ over the kept entries."""
    acc_ty = rows_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    sp = tl.load(sp_ptr + rows, mask=rmask, other=0.0).to(acc_ty)
    sn = tl.load(sn_ptr + rows, mask=rmask, other=0.0).to(acc_ty)
    a, _ = _hinge_mean(pos_ptr, pm_ptr, rows, rmask, KP, s_pb, s_pk, s_pmb, s_pmk, sp, 1.0, HAS_PM, BLOCK_B,
                       BLOCK_K, acc_ty)
    b, _ = _hinge_mean(neg_ptr, nm_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, sn, -1.0, HAS_NM, BLOCK_B,
                       BLOCK_K, acc_ty)
    tl.store(rows_ptr + rows, a + b, mask=rmask)


@triton.jit
def _hinge_mean_grad(x_ptr, m_ptr, out_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, sigma, g, SIGN: tl.constexpr,
                     HAS_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """Writes ∂/∂x = SIGN·g/count on the kept entries where SIGN·(x - σ) > 0; returns ∂/∂σ per row."""
    count = tl.zeros((BLOCK_B,), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        _, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        count += tl.sum(keep.to(acc_ty), axis=1)
    share = SIGN * g / tl.maximum(count, 1.0)
    d_sigma = tl.zeros((BLOCK_B,), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        x, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        cols = k0 + tl.arange(0, BLOCK_K)
        on = keep & (SIGN * (x - sigma[:, None]) > 0)
        grad = tl.where(on, share[:, None], 0.0)
        d_sigma -= tl.sum(grad, axis=1)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], grad.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < K))
    return d_sigma


@tuned((4, 128, 4), (4, 512, 8), (16, 128, 8), (4, 256, 8))
@triton.jit
def _margin_injection_bwd_kernel(g_ptr, pos_ptr, neg_ptr, pm_ptr, nm_ptr, sp_ptr, sn_ptr, gp_ptr, gn_ptr, gsp_ptr,
                                 gsn_ptr, B, KP, KN, s_pb, s_pk, s_nb, s_nk, s_pmb, s_pmk, s_nmb, s_nmk,
                                 HAS_PM: tl.constexpr, HAS_NM: tl.constexpr, BLOCK_B: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    acc_ty = gsp_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(acc_ty)
    sp = tl.load(sp_ptr + rows, mask=rmask, other=0.0).to(acc_ty)
    sn = tl.load(sn_ptr + rows, mask=rmask, other=0.0).to(acc_ty)
    dsp = _hinge_mean_grad(pos_ptr, pm_ptr, gp_ptr, rows, rmask, KP, s_pb, s_pk, s_pmb, s_pmk, sp, g, 1.0, HAS_PM,
                           BLOCK_B, BLOCK_K, acc_ty)
    dsn = _hinge_mean_grad(neg_ptr, nm_ptr, gn_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, sn, g, -1.0, HAS_NM,
                           BLOCK_B, BLOCK_K, acc_ty)
    tl.store(gsp_ptr + rows, dsp, mask=rmask)
    tl.store(gsn_ptr + rows, dsn, mask=rmask)


@op
def margin_score_fwd(pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor], neg_mask: Optional[Tensor]) -> Tensor:
    """stats [B, 5] = (p_min, n_max, ties_p, ties_n, valid) in the accumulation dtype."""
    pm, nm, B, KP, KN, strides = score_args(pos, neg, pos_mask, neg_mask)
    stats = torch.empty(B, 5, dtype=acc_dtype(pos), device=pos.device)
    run_rows(_margin_fwd_kernel, B, pos.device, pos, neg, pm, nm, stats, B, KP, KN, *strides,
             **mask_flags(pos_mask, neg_mask))
    return stats


@op
def margin_score_bwd(grad: Tensor, pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor], neg_mask: Optional[Tensor],
                     stats: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad_pos, grad_neg) from ``grad [B, 2]`` = (∂/∂p_min, ∂/∂n_max) per row."""
    pm, nm, B, KP, KN, strides = score_args(pos, neg, pos_mask, neg_mask)
    gp = torch.empty(B, KP, dtype=pos.dtype, device=pos.device)
    gn = torch.empty(B, KN, dtype=neg.dtype, device=neg.device)
    run_rows(_margin_bwd_kernel, B, pos.device, grad.contiguous(), pos, neg, pm, nm, stats.contiguous(), gp, gn, B, KP,
             KN,
         *strides, **mask_flags(pos_mask, neg_mask))
    return gp, gn


@op
def margin_injection_fwd(pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor], neg_mask: Optional[Tensor],
                         sigma_pos: Tensor, sigma_neg: Tensor) -> Tensor:
    """Per-row R_σ ``[B]`` in the accumulation dtype."""
    pm, nm, B, KP, KN, strides = score_args(pos, neg, pos_mask, neg_mask)
    rows = torch.empty(B, dtype=acc_dtype(pos), device=pos.device)
    run_rows(_margin_injection_fwd_kernel, B, pos.device, pos, neg, pm, nm, sigma_pos.contiguous(),
             sigma_neg.contiguous(),
         rows, B, KP, KN, *strides, **mask_flags(pos_mask, neg_mask))
    return rows


@op
def margin_injection_bwd(grad_rows: Tensor, pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor],
                         neg_mask: Optional[Tensor], sigma_pos: Tensor,
                         sigma_neg: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂pos [B, K̂⁺], ∂neg [B, K̂⁻] in the input dtype, ∂σ⁺ [B], ∂σ⁻ [B] in the accumulation dtype)."""
    pm, nm, B, KP, KN, strides = score_args(pos, neg, pos_mask, neg_mask)
    gp = torch.empty(B, KP, dtype=pos.dtype, device=pos.device)
    gn = torch.empty(B, KN, dtype=neg.dtype, device=neg.device)
    gsp, gsn = (torch.empty(B, dtype=acc_dtype(pos), device=pos.device) for _ in range(2))
    run_rows(_margin_injection_bwd_kernel, B, pos.device, grad_rows.contiguous(), pos, neg, pm, nm,
             sigma_pos.contiguous(),
         sigma_neg.contiguous(), gp, gn, gsp, gsn, B, KP, KN, *strides, **mask_flags(pos_mask, neg_mask))
    return gp, gn, gsp, gsn
