"""Score-mode OUCL and InfoNCE in Triton: one program per block of rows, streaming
K⁺ and K⁻ in blocks with a running (max, sum) per row for each log-sum-exp.

The launchers take and return exactly what the C++ ops ``oucl_score_{fwd,bwd,bwd_bwd}`` (csrc/cpu/score.cpp)
take and return, including the per-row ``stats [B, 5]`` layout, so the same autograd Functions
(metaug_fast/_ops/score.py) drive either backend:

- OUCL forms: (A.shift, A.log_sum, C.shift, C.log_sum, valid), A = LSE_p u(p), C = LSE_n v(n),
  ℓ = softplus(A + C)/β; hinge: (Σn - Σp + λ, 0, 0, 0, valid).
- InfoNCE (β = 1/τ): (C.shift, C.log_sum, Σ_k σ(C - β p_k), n_p, valid), ℓ = mean_k softplus(C - β p_k).

Sums and exponentials run in fp32 for fp16/bf16 inputs (fp64 for fp64); gradients are written in the
input dtype.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    COMPILE_OPTIONS,  # noqa: F401  (how run_rows compiles them; tools/ reads it here)
    HINGE,
    INFONCE,
    WEIGHTED,
    acc_dtype,
    finite_or_zero,
    load_cfg,
    load_rows,
    load_stats,
    loss_args,
    lse_update,
    mask_flags,
    mul_rn,
    op,
    run_rows,
    score_args,
    side_terms,
    sigmoid,
    softplus,
    store_stats,
    tuned,
)


@triton.jit
def _side_lse(x_ptr, m_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, beta, gamma_pos, gamma_neg, margin,
              FORM: tl.constexpr, POS: tl.constexpr, HAS_M: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """(shift, log_sum, count) of one side's exponents for each row of the block."""
    run_max = tl.full((BLOCK_B,), float("-inf"), acc_ty)
    total = tl.zeros((BLOCK_B,), acc_ty)
    count = tl.zeros((BLOCK_B,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        e, _, _ = side_terms(x, FORM, POS, beta, gamma_pos, gamma_neg, margin)
        run_max, total = lse_update(run_max, total, tl.where(keep, e, float("-inf")), False)
        count += tl.sum(keep.to(tl.int32), axis=1)
    return finite_or_zero(run_max), tl.log(total), count


@triton.jit
def _side_sum(x_ptr, m_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, HAS_M: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """(Σ kept scores, count) per row (the hinge form)."""
    total = tl.zeros((BLOCK_B,), acc_ty)
    count = tl.zeros((BLOCK_B,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        total += tl.sum(tl.where(keep, x, 0.0), axis=1)
        count += tl.sum(keep.to(tl.int32), axis=1)
    return total, count


@tuned((4, 256, 4), (4, 128, 8), (8, 128, 8), (2, 512, 4), fp64=((2, 256, 4),))
@triton.jit
def _score_fwd_kernel(pos_ptr, neg_ptr, pm_ptr, nm_ptr, beta: tl.float64, inv_beta: tl.float64, gamma_pos: tl.float64,
                      gamma_neg: tl.float64, margin: tl.float64,
                      lam: tl.float64, rows_ptr, stats_ptr, B, KP, KN,
                      s_pb, s_pk, s_nb, s_nk, s_pmb, s_pmk, s_nmb, s_nmk,
                      FORM: tl.constexpr, HAS_PM: tl.constexpr, HAS_NM: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    acc_ty = rows_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    zero = tl.zeros((BLOCK_B,), acc_ty)
    if FORM == HINGE:
        sp, n_p = _side_sum(pos_ptr, pm_ptr, rows, rmask, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_B, BLOCK_K,
                            acc_ty)
        sn, n_n = _side_sum(neg_ptr, nm_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, HAS_NM, BLOCK_B, BLOCK_K,
                            acc_ty)
        valid = (n_p > 0) & (n_n > 0)
        arg = sn - sp + lam
        # relu that keeps NaN (a comparison alone would turn NaN into 0)
        loss = tl.where((arg > 0) | (arg != arg), arg, zero)
        st0, st1, st2, st3 = arg, zero, zero, zero
    elif FORM == INFONCE:
        c_shift, c_log, n_n = _side_lse(neg_ptr, nm_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, beta, 0.0,
                                        0.0, 0.0, WEIGHTED, False, HAS_NM, BLOCK_B, BLOCK_K, acc_ty)
        c = c_shift + c_log
        loss_sum = zero
        sig_sum = zero
        n_p = tl.zeros((BLOCK_B,), tl.int32)
        for k0 in range(0, KP, BLOCK_K):
            x, keep = load_rows(pos_ptr, pm_ptr, rows, rmask, k0, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_K,
                                acc_ty)
            t = c[:, None] - beta * x
            loss_sum += tl.sum(tl.where(keep, softplus(t), 0.0), axis=1)
            sig_sum += tl.sum(tl.where(keep, sigmoid(t), 0.0), axis=1)
            n_p += tl.sum(keep.to(tl.int32), axis=1)
        valid = (n_p > 0) & (n_n > 0)
        loss = loss_sum / tl.maximum(n_p, 1).to(acc_ty)
        st0, st1, st2, st3 = c_shift, c_log, sig_sum, n_p.to(acc_ty)
    else:
        a_shift, a_log, n_p = _side_lse(pos_ptr, pm_ptr, rows, rmask, KP, s_pb, s_pk, s_pmb, s_pmk, beta,
                                        gamma_pos, gamma_neg, margin, FORM, True, HAS_PM, BLOCK_B, BLOCK_K, acc_ty)
        c_shift, c_log, n_n = _side_lse(neg_ptr, nm_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, beta,
                                        gamma_pos, gamma_neg, margin, FORM, False, HAS_NM, BLOCK_B, BLOCK_K, acc_ty)
        valid = (n_p > 0) & (n_n > 0)
        loss = softplus(a_shift + a_log + c_shift + c_log) * inv_beta
        st0, st1, st2, st3 = a_shift, a_log, c_shift, c_log
    # Invalid rows keep their parts (callers that merge partial reference sets need them), loss 0.
    tl.store(rows_ptr + rows, tl.where(valid, loss, zero), mask=rmask)
    store_stats(stats_ptr, rows, rmask, st0, st1, st2, st3, valid)


@tuned((4, 256, 4), (4, 512, 8), (16, 128, 8), (8, 256, 8))
@triton.jit
def _score_bwd_kernel(g_ptr, pos_ptr, neg_ptr, pm_ptr, nm_ptr, beta: tl.float64, inv_beta: tl.float64,
                      gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                      lam: tl.float64, stats_ptr, gp_ptr, gn_ptr, B, KP, KN,
                      s_pb, s_pk, s_nb, s_nk, s_pmb, s_pmk, s_nmb, s_nmk,
                      FORM: tl.constexpr, HAS_PM: tl.constexpr, HAS_NM: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """∂(Σ_i g_i ℓ_i)/∂pos and /∂neg; the outputs are contiguous [B, K] in the input dtype."""
    acc_ty = stats_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    st0, st1, st2, st3, valid = load_stats(stats_ptr, rows, rmask)
    g = tl.where(valid, tl.load(g_ptr + rows, mask=rmask, other=0.0).to(acc_ty), 0.0)
    if FORM == HINGE:
        coef_p = tl.where(st0 > 0, -g, 0.0)
        coef_n = -coef_p
    elif FORM == INFONCE:
        coef_p = g / tl.maximum(st3, 1.0)  # g / n_p
        coef_n = coef_p * st2 * beta  # g / n_p · Σσ · β, times ω_j below
    else:
        coef_p = g * inv_beta * sigmoid(st0 + st1 + st2 + st3)
        coef_n = coef_p
    for k0 in range(0, KP, BLOCK_K):
        x, keep = load_rows(pos_ptr, pm_ptr, rows, rmask, k0, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_K,
                            acc_ty)
        cols = k0 + tl.arange(0, BLOCK_K)
        if FORM == HINGE:
            grad = coef_p[:, None] + tl.zeros_like(x)
        elif FORM == INFONCE:
            grad = -coef_p[:, None] * beta * sigmoid((st0 + st1)[:, None] - beta * x)
        else:
            e, d1, _ = side_terms(x, FORM, True, beta, gamma_pos, gamma_neg, margin)
            grad = coef_p[:, None] * tl.exp(e - st0[:, None] - st1[:, None]) * d1
        out = gp_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :]
        tl.store(out, tl.where(keep, grad, 0.0).to(gp_ptr.dtype.element_ty), mask=rmask[:, None] & (cols[None, :] < KP))
    for k0 in range(0, KN, BLOCK_K):
        x, keep = load_rows(neg_ptr, nm_ptr, rows, rmask, k0, KN, s_nb, s_nk, s_nmb, s_nmk, HAS_NM, BLOCK_K,
                            acc_ty)
        cols = k0 + tl.arange(0, BLOCK_K)
        if FORM == HINGE:
            grad = coef_n[:, None] + tl.zeros_like(x)
        elif FORM == INFONCE:
            grad = coef_n[:, None] * tl.exp(beta * x - st0[:, None] - st1[:, None])
        else:
            e, d1, _ = side_terms(x, FORM, False, beta, gamma_pos, gamma_neg, margin)
            grad = coef_n[:, None] * tl.exp(e - st2[:, None] - st3[:, None]) * d1
        out = gn_ptr + rows[:, None].to(tl.int64) * KN + cols[None, :]
        tl.store(out, tl.where(keep, grad, 0.0).to(gn_ptr.dtype.element_ty), mask=rmask[:, None] & (cols[None, :] < KN))


@triton.jit
def _side_dot(x_ptr, m_ptr, t_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, shift, log_sum, beta, gamma_pos,
              gamma_neg, margin, FORM: tl.constexpr, POS: tl.constexpr, HAS_M: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """Σ_k w_k e'_k t_k per row: the side's share of the directional derivative along t ([B, K] contiguous)."""
    acc = tl.zeros((BLOCK_B,), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        x, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        cols = k0 + tl.arange(0, BLOCK_K)
        t = tl.load(t_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=keep, other=0.0).to(acc_ty)
        e, d1, _ = side_terms(x, FORM, POS, beta, gamma_pos, gamma_neg, margin)
        acc += tl.sum(tl.where(keep, mul_rn(tl.exp(e - shift[:, None] - log_sum[:, None]) * d1, t), 0.0), axis=1)
    return acc


@triton.jit
def _side_hvp(x_ptr, m_ptr, t_ptr, out_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, shift, log_sum, c1, c2, t_side,
              beta, gamma_pos, gamma_neg, margin, FORM: tl.constexpr, POS: tl.constexpr, HAS_M: tl.constexpr,
              BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """H t of one side: c1·w·e' + c2·w·(e'·(e'·t - t_side) + e''·t). Grouping e'·t - t_side makes a side
    with one entry, where the two cancel, give exactly 0 as autograd does: both products rounded alike
    (mul_rn here and in _side_dot, whatever the compile options)."""
    for k0 in range(0, K, BLOCK_K):
        x, keep = load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        cols = k0 + tl.arange(0, BLOCK_K)
        t = tl.load(t_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=keep, other=0.0).to(acc_ty)
        e, d1, d2 = side_terms(x, FORM, POS, beta, gamma_pos, gamma_neg, margin)
        w = tl.exp(e - shift[:, None] - log_sum[:, None])
        h = w * d1 * c1[:, None] + c2[:, None] * w * (d1 * (mul_rn(d1, t) - t_side[:, None]) + d2 * t)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                 tl.where(keep, h, 0.0).to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < K))


@tuned((4, 256, 8), (8, 256, 8), (4, 128, 8), fp64=((4, 256, 8), (8, 128, 8), (2, 512, 4)))
@triton.jit
def _score_bwd_bwd_kernel(g_ptr, tp_ptr, tn_ptr, pos_ptr, neg_ptr, pm_ptr, nm_ptr, beta: tl.float64,
                          inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                      lam: tl.float64, stats_ptr,
                          ggo_ptr, hp_ptr, hn_ptr, B, KP, KN, s_pb, s_pk, s_nb, s_nk, s_pmb, s_pmk, s_nmb, s_nmk,
                          FORM: tl.constexpr, HAS_PM: tl.constexpr, HAS_NM: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Double backward (not the hinge, whose Hessian is zero): given t = (t_pos, t_neg), the cotangent of
    the gradients, ggo_i = ∂ℓ_i/∂x · t_i and hv = g_i · H_i t_i. OUCL forms: H = (1/β)[s(1-s)∇T∇Tᵀ + s∇²T],
    T = A + C, s = σ(T). InfoNCE (σ'_k = σ(x_k)(1 - σ(x_k)), ⟨ω,t⟩ = Σ_j ω_j t_nj, S = Σ_k σ_k):
    (Ht)_pk = β²/n_p·σ'_k(t_pk - ⟨ω,t⟩), (Ht)_nj = β²/n_p·ω_j(S(t_nj - ⟨ω,t⟩) + ⟨ω,t⟩Σσ' - Σσ'_k t_pk)."""
    acc_ty = stats_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    st0, st1, st2, st3, valid = load_stats(stats_ptr, rows, rmask)
    g = tl.where(valid, tl.load(g_ptr + rows, mask=rmask, other=0.0).to(acc_ty), 0.0)
    zero = tl.zeros((BLOCK_B,), acc_ty)
    if FORM == INFONCE:
        c = st0 + st1
        n_p = tl.maximum(st3, 1.0)
        wt = _side_dot(neg_ptr, nm_ptr, tn_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, st0, st1, beta, 0.0,
                       0.0, 0.0, WEIGHTED, False, HAS_NM, BLOCK_B, BLOCK_K, acc_ty) / beta  # ⟨ω, t_n⟩
        sig_t = zero
        dsig = zero
        dsig_t = zero
        for k0 in range(0, KP, BLOCK_K):
            x, keep = load_rows(pos_ptr, pm_ptr, rows, rmask, k0, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_K,
                                acc_ty)
            cols = k0 + tl.arange(0, BLOCK_K)
            t = tl.load(tp_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :], mask=keep, other=0.0).to(acc_ty)
            xs = c[:, None] - beta * x
            s = sigmoid(xs)
            ds = s * sigmoid(-xs)
            sig_t += tl.sum(tl.where(keep, s * t, 0.0), axis=1)
            dsig += tl.sum(tl.where(keep, ds, 0.0), axis=1)
            dsig_t += tl.sum(tl.where(keep, ds * t, 0.0), axis=1)
        ggo = tl.where(valid, beta / n_p * (mul_rn(st2, wt) - sig_t), zero)
        coef = g * beta * beta / n_p
        for k0 in range(0, KP, BLOCK_K):
            x, keep = load_rows(pos_ptr, pm_ptr, rows, rmask, k0, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_K,
                                acc_ty)
            cols = k0 + tl.arange(0, BLOCK_K)
            t = tl.load(tp_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :], mask=keep, other=0.0).to(acc_ty)
            xs = c[:, None] - beta * x
            h = coef[:, None] * sigmoid(xs) * sigmoid(-xs) * (t - wt[:, None])
            tl.store(hp_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :],
                     tl.where(keep, h, 0.0).to(hp_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (cols[None, :] < KP))
        k_0 = mul_rn(wt, dsig) - dsig_t - mul_rn(st2, wt)
        for k0 in range(0, KN, BLOCK_K):
            x, keep = load_rows(neg_ptr, nm_ptr, rows, rmask, k0, KN, s_nb, s_nk, s_nmb, s_nmk, HAS_NM, BLOCK_K,
                                acc_ty)
            cols = k0 + tl.arange(0, BLOCK_K)
            t = tl.load(tn_ptr + rows[:, None].to(tl.int64) * KN + cols[None, :], mask=keep, other=0.0).to(acc_ty)
            w = tl.exp(beta * x - st0[:, None] - st1[:, None])
            h = coef[:, None] * w * (mul_rn(st2[:, None] + tl.zeros_like(t), t) + k_0[:, None])
            tl.store(hn_ptr + rows[:, None].to(tl.int64) * KN + cols[None, :],
                     tl.where(keep, h, 0.0).to(hn_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (cols[None, :] < KN))
    else:
        total = st0 + st1 + st2 + st3
        s = sigmoid(total)
        one_minus_s = sigmoid(-total)  # 1 - s would cancel when s -> 1
        ta = _side_dot(pos_ptr, pm_ptr, tp_ptr, rows, rmask, KP, s_pb, s_pk, s_pmb, s_pmk, st0, st1, beta,
                       gamma_pos, gamma_neg, margin, FORM, True, HAS_PM, BLOCK_B, BLOCK_K, acc_ty)
        tb = _side_dot(neg_ptr, nm_ptr, tn_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, st2, st3, beta,
                       gamma_pos, gamma_neg, margin, FORM, False, HAS_NM, BLOCK_B, BLOCK_K, acc_ty)
        t_all = ta + tb
        ggo = tl.where(valid, inv_beta * s * t_all, zero)
        c1 = g * inv_beta * s * one_minus_s * t_all
        c2 = g * inv_beta * s
        _side_hvp(pos_ptr, pm_ptr, tp_ptr, hp_ptr, rows, rmask, KP, s_pb, s_pk, s_pmb, s_pmk, st0, st1, c1, c2, ta,
                  beta, gamma_pos, gamma_neg, margin, FORM, True, HAS_PM, BLOCK_K, acc_ty)
        _side_hvp(neg_ptr, nm_ptr, tn_ptr, hn_ptr, rows, rmask, KN, s_nb, s_nk, s_nmb, s_nmk, st2, st3, c1, c2, tb,
                  beta, gamma_pos, gamma_neg, margin, FORM, False, HAS_NM, BLOCK_K, acc_ty)
    tl.store(ggo_ptr + rows, ggo, mask=rmask)


# ---------------------------------------------------------------------------------------------- launchers
@op
def oucl_score_fwd(pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor], neg_mask: Optional[Tensor], form: int,
                   beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float) -> Tuple[Tensor, Tensor]:
    """(rows [B], stats [B, 5]) in the accumulation dtype, as ``torch.ops.metaug_fast.oucl_score_fwd``."""
    acc = acc_dtype(pos)
    pm, nm, B, KP, KN, strides = score_args(pos, neg, pos_mask, neg_mask)
    rows = torch.empty(B, dtype=acc, device=pos.device)
    stats = torch.empty(B, 5, dtype=acc, device=pos.device)
    run_rows(_score_fwd_kernel, B, pos.device, pos, neg, pm, nm,
             *loss_args((form, beta, gamma_pos, gamma_neg, margin, lam)),
         rows, stats, B, KP, KN, *strides, FORM=form, **mask_flags(pos_mask, neg_mask))
    return rows, stats


@op
def oucl_score_bwd(grad_rows: Tensor, pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor], neg_mask: Optional[Tensor],
                   stats: Tensor, form: int, beta: float, gamma_pos: float, gamma_neg: float, margin: float,
                   lam: float) -> Tuple[Tensor, Tensor]:
    """(grad_pos [B, K⁺], grad_neg [B, K⁻]) in the input dtype."""
    pm, nm, B, KP, KN, strides = score_args(pos, neg, pos_mask, neg_mask)
    gp = torch.empty(B, KP, dtype=pos.dtype, device=pos.device)
    gn = torch.empty(B, KN, dtype=neg.dtype, device=neg.device)
    run_rows(_score_bwd_kernel, B, pos.device, grad_rows.contiguous(), pos, neg, pm, nm,
         *loss_args((form, beta, gamma_pos, gamma_neg, margin, lam)), stats.contiguous(), gp, gn, B, KP, KN, *strides,
         FORM=form, **mask_flags(pos_mask, neg_mask))
    return gp, gn


@op
def oucl_score_bwd_bwd(grad_rows: Tensor, gg_pos: Tensor, gg_neg: Tensor, pos: Tensor, neg: Tensor,
                       pos_mask: Optional[Tensor], neg_mask: Optional[Tensor], stats: Tensor, form: int, beta: float,
                       gamma_pos: float, gamma_neg: float, margin: float, lam: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad of grad_rows [B], hv_pos [B, K⁺], hv_neg [B, K⁻]); not for the hinge form (zero Hessian)."""
    if form == 0:
        raise ValueError("the hinge form has a zero Hessian: its double backward needs no kernel")
    pm, nm, B, KP, KN, strides = score_args(pos, neg, pos_mask, neg_mask)
    ggo = torch.empty(B, dtype=stats.dtype, device=pos.device)
    hp = torch.empty(B, KP, dtype=pos.dtype, device=pos.device)
    hn = torch.empty(B, KN, dtype=neg.dtype, device=neg.device)
    run_rows(_score_bwd_bwd_kernel, B, pos.device, grad_rows.contiguous(), gg_pos.contiguous(), gg_neg.contiguous(),
             pos, neg, pm, nm, *loss_args((form, beta, gamma_pos, gamma_neg, margin, lam)), stats.contiguous(), ggo,
             hp, hn, B, KP, KN, *strides, FORM=form, **mask_flags(pos_mask, neg_mask))
    return ggo, hp, hn
