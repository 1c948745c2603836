"""Score-mode OUCL, InfoNCE and margin statistics in Triton: one program per block of rows, streaming
K⁺ and K⁻ in blocks with a running (max, sum) per row for each log-sum-exp.

The launchers take and return exactly what the C++ ops ``oucl_score_{fwd,bwd,bwd_bwd}`` and
``margin_score_{fwd,bwd}`` (csrc/oucl_cpu.cpp) take and return, including the per-row ``stats [B, 5]``
layout, so the same autograd Functions (metaug_fast/_ops) drive either backend:

- OUCL forms: (A.shift, A.log_sum, C.shift, C.log_sum, valid), A = LSE_p u(p), C = LSE_n v(n),
  ℓ = softplus(A + C)/β; hinge: (Σn - Σp + λ, 0, 0, 0, valid).
- InfoNCE (β = 1/τ): (C.shift, C.log_sum, Σ_k σ(C - β p_k), n_p, valid), ℓ = mean_k softplus(C - β p_k).
- margins: (p_min, n_max, ties_p, ties_n, valid), NaN sticky as torch.amin/amax.

Sums and exponentials run in fp32 for fp16/bf16 inputs (fp64 for fp64); gradients are written in the
input dtype.
"""
import os

import torch
import triton
import triton.language as tl

from ._common import (HINGE, INFONCE, WEIGHTED, finite_or_zero, launch, load_cfg, load_stats, loss_args, lse_update,
                      side_terms, sigmoid, softplus, store_stats)


def _configs():
    """A small autotuning space (rows per program × columns per step × warps), tuned per (K⁺, K⁻, dtype);
    one configuration under the interpreter, where timing them would only cost time."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_B": 16, "BLOCK_K": 64})]
    return [triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w)
            for bb in (4, 16) for bk in (128, 512) for w in (4, 8)]


def _tuned(kernel):
    return triton.autotune(configs=_configs(), key=["KP", "KN"])(kernel)


@triton.jit
def _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M: tl.constexpr, BLOCK_K: tl.constexpr,
          acc_ty: tl.constexpr):
    """A ``[BLOCK_B, BLOCK_K]`` block of one side: scores in the accumulation dtype, which entries count,
    and the column indices."""
    cols = k0 + tl.arange(0, BLOCK_K)
    inb = rmask[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xb + cols[None, :].to(tl.int64) * s_xk, mask=inb,
                other=0.0).to(acc_ty)
    keep = inb
    if HAS_M:
        offsets = rows[:, None].to(tl.int64) * s_mb + cols[None, :].to(tl.int64) * s_mk
        keep = keep & (tl.load(m_ptr + offsets, mask=inb, other=0) != 0)
    return x, keep, cols


@triton.jit
def _side_lse(x_ptr, m_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, beta, gamma_pos, gamma_neg, margin,
              FORM: tl.constexpr, POS: tl.constexpr, HAS_M: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """(shift, log_sum, count) of one side's exponents for each row of the block."""
    run_max = tl.full((BLOCK_B,), float("-inf"), acc_ty)
    total = tl.zeros((BLOCK_B,), acc_ty)
    count = tl.zeros((BLOCK_B,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x, keep, _ = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        e, _, _ = side_terms(x, FORM, POS, beta, gamma_pos, gamma_neg, margin)
        run_max, total = lse_update(run_max, total, tl.where(keep, e, float("-inf")))
        count += tl.sum(keep.to(tl.int32), axis=1)
    return finite_or_zero(run_max), tl.log(total), count


@triton.jit
def _side_sum(x_ptr, m_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, HAS_M: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """(Σ kept scores, count) per row (the hinge form)."""
    total = tl.zeros((BLOCK_B,), acc_ty)
    count = tl.zeros((BLOCK_B,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x, keep, _ = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        total += tl.sum(tl.where(keep, x, 0.0), axis=1)
        count += tl.sum(keep.to(tl.int32), axis=1)
    return total, count


@_tuned
@triton.jit
def _score_fwd_kernel(pos_ptr, neg_ptr, pm_ptr, nm_ptr, beta: tl.float64, inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
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
            x, keep, _ = _load(pos_ptr, pm_ptr, rows, rmask, k0, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_K,
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


@_tuned
@triton.jit
def _score_bwd_kernel(g_ptr, pos_ptr, neg_ptr, pm_ptr, nm_ptr, beta: tl.float64, inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
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
        x, keep, cols = _load(pos_ptr, pm_ptr, rows, rmask, k0, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_K,
                              acc_ty)
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
        x, keep, cols = _load(neg_ptr, nm_ptr, rows, rmask, k0, KN, s_nb, s_nk, s_nmb, s_nmk, HAS_NM, BLOCK_K,
                              acc_ty)
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
        x, keep, cols = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        t = tl.load(t_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=keep, other=0.0).to(acc_ty)
        e, d1, _ = side_terms(x, FORM, POS, beta, gamma_pos, gamma_neg, margin)
        acc += tl.sum(tl.where(keep, tl.exp(e - shift[:, None] - log_sum[:, None]) * d1 * t, 0.0), axis=1)
    return acc


@triton.jit
def _side_hvp(x_ptr, m_ptr, t_ptr, out_ptr, rows, rmask, K, s_xb, s_xk, s_mb, s_mk, shift, log_sum, c1, c2, t_side,
              beta, gamma_pos, gamma_neg, margin, FORM: tl.constexpr, POS: tl.constexpr, HAS_M: tl.constexpr,
              BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    """H t of one side: c1·w·e' + c2·w·(e'·(e'·t - t_side) + e''·t). Grouping e'·t - t_side makes a side
    with one entry, where the two cancel, give exactly 0 as autograd does."""
    for k0 in range(0, K, BLOCK_K):
        x, keep, cols = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        t = tl.load(t_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=keep, other=0.0).to(acc_ty)
        e, d1, d2 = side_terms(x, FORM, POS, beta, gamma_pos, gamma_neg, margin)
        w = tl.exp(e - shift[:, None] - log_sum[:, None])
        h = w * d1 * c1[:, None] + c2[:, None] * w * (d1 * (d1 * t - t_side[:, None]) + d2 * t)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], tl.where(keep, h, 0.0).to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < K))


@_tuned
@triton.jit
def _score_bwd_bwd_kernel(g_ptr, tp_ptr, tn_ptr, pos_ptr, neg_ptr, pm_ptr, nm_ptr, beta: tl.float64, inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
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
            x, keep, cols = _load(pos_ptr, pm_ptr, rows, rmask, k0, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_K,
                                  acc_ty)
            t = tl.load(tp_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :], mask=keep, other=0.0).to(acc_ty)
            xs = c[:, None] - beta * x
            s = sigmoid(xs)
            ds = s * sigmoid(-xs)
            sig_t += tl.sum(tl.where(keep, s * t, 0.0), axis=1)
            dsig += tl.sum(tl.where(keep, ds, 0.0), axis=1)
            dsig_t += tl.sum(tl.where(keep, ds * t, 0.0), axis=1)
        ggo = tl.where(valid, beta / n_p * (st2 * wt - sig_t), zero)
        coef = g * beta * beta / n_p
        for k0 in range(0, KP, BLOCK_K):
            x, keep, cols = _load(pos_ptr, pm_ptr, rows, rmask, k0, KP, s_pb, s_pk, s_pmb, s_pmk, HAS_PM, BLOCK_K,
                                  acc_ty)
            t = tl.load(tp_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :], mask=keep, other=0.0).to(acc_ty)
            xs = c[:, None] - beta * x
            h = coef[:, None] * sigmoid(xs) * sigmoid(-xs) * (t - wt[:, None])
            tl.store(hp_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :], tl.where(keep, h, 0.0).to(hp_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (cols[None, :] < KP))
        k_0 = wt * dsig - dsig_t - st2 * wt
        for k0 in range(0, KN, BLOCK_K):
            x, keep, cols = _load(neg_ptr, nm_ptr, rows, rmask, k0, KN, s_nb, s_nk, s_nmb, s_nmk, HAS_NM, BLOCK_K,
                                  acc_ty)
            t = tl.load(tn_ptr + rows[:, None].to(tl.int64) * KN + cols[None, :], mask=keep, other=0.0).to(acc_ty)
            w = tl.exp(beta * x - st0[:, None] - st1[:, None])
            h = coef[:, None] * w * (st2[:, None] * t + k_0[:, None])
            tl.store(hn_ptr + rows[:, None].to(tl.int64) * KN + cols[None, :], tl.where(keep, h, 0.0).to(hn_ptr.dtype.element_ty),
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
        x, keep, _ = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        has_nan += tl.sum((keep & (x != x)).to(tl.int32), axis=1)
        ok = keep & (x == x)
        if MIN:
            new = tl.minimum(best, tl.min(tl.where(ok, x, limit), axis=1))
        else:
            new = tl.maximum(best, tl.max(tl.where(ok, x, limit), axis=1))
        ties = tl.where(best == new, ties, 0.0) + tl.sum((ok & (x == new[:, None])).to(acc_ty), axis=1)
        best = new
    nan = has_nan > 0
    return tl.where(nan, float("nan"), best), tl.where(nan, 1.0, ties)


@_tuned
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
        x, keep, cols = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        grad = tl.where(nan[:, None], float("nan"), tl.where(x == best[:, None], share[:, None], 0.0))
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], tl.where(keep, grad, 0.0).to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < K))


@_tuned
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
        x, keep, _ = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        d = SIGN * (x - sigma[:, None])
        total += tl.sum(tl.where(keep & ((d > 0) | (d != d)), d, 0.0), axis=1)
        count += tl.sum(keep.to(acc_ty), axis=1)
    return total / tl.maximum(count, 1.0), count


@_tuned
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
        _, keep, _ = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        count += tl.sum(keep.to(acc_ty), axis=1)
    share = SIGN * g / tl.maximum(count, 1.0)
    d_sigma = tl.zeros((BLOCK_B,), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        x, keep, cols = _load(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M, BLOCK_K, acc_ty)
        on = keep & (SIGN * (x - sigma[:, None]) > 0)
        grad = tl.where(on, share[:, None], 0.0)
        d_sigma -= tl.sum(grad, axis=1)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], grad.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < K))
    return d_sigma


@_tuned
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


# ---------------------------------------------------------------------------------------------- launchers
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Contraction of a·b + c into fused multiply-adds is off, as in the C++ and CUDA builds: the Hessian-vector
# product subtracts e'·t - Σ w·e'·t, which cancels exactly for a row dominated by one entry only when both
# products round alike (a fused one leaves about an ulp times β², 1e-3 relative in fp32). These kernels are
# memory-bound: the separate multiply costs no time.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def _run(kernel, B: int, device: torch.device, *args, **kwargs) -> None:
    """One program per BLOCK_B rows, on the tensors' device; no launch for an empty batch."""
    if B:
        launch(kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),), device, *args, **COMPILE_OPTIONS, **kwargs)


def _mask_args(mask, like):
    """(pointer tensor, row stride, column stride) of an optional bool mask, read as bytes."""
    if mask is None:
        return like, 0, 0
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1)


def _common_args(pos, neg, pos_mask, neg_mask):
    pm, s_pmb, s_pmk = _mask_args(pos_mask, pos)
    nm, s_nmb, s_nmk = _mask_args(neg_mask, neg)
    B, KP, KN = pos.shape[0], pos.shape[1], neg.shape[1]
    strides = (pos.stride(0), pos.stride(1), neg.stride(0), neg.stride(1), s_pmb, s_pmk, s_nmb, s_nmk)
    return pm, nm, B, KP, KN, strides


def _flags(pos_mask, neg_mask) -> dict:
    return dict(HAS_PM=pos_mask is not None, HAS_NM=neg_mask is not None)


def oucl_score_fwd(pos, neg, pos_mask, neg_mask, form, beta, gamma_pos, gamma_neg, margin, lam):
    """(rows [B], stats [B, 5]) in the accumulation dtype, as ``torch.ops.metaug_fast.oucl_score_fwd``."""
    acc = _acc_dtype(pos)
    pm, nm, B, KP, KN, strides = _common_args(pos, neg, pos_mask, neg_mask)
    rows = torch.empty(B, dtype=acc, device=pos.device)
    stats = torch.empty(B, 5, dtype=acc, device=pos.device)
    _run(_score_fwd_kernel, B, pos.device, pos, neg, pm, nm, *loss_args((form, beta, gamma_pos, gamma_neg, margin, lam)),
         rows, stats, B, KP, KN, *strides, FORM=form, **_flags(pos_mask, neg_mask))
    return rows, stats


def oucl_score_bwd(grad_rows, pos, neg, pos_mask, neg_mask, stats, form, beta, gamma_pos, gamma_neg, margin, lam):
    """(grad_pos [B, K⁺], grad_neg [B, K⁻]) in the input dtype."""
    pm, nm, B, KP, KN, strides = _common_args(pos, neg, pos_mask, neg_mask)
    gp, gn = torch.empty(B, KP, dtype=pos.dtype, device=pos.device), torch.empty(B, KN, dtype=neg.dtype, device=neg.device)
    _run(_score_bwd_kernel, B, pos.device, grad_rows.contiguous(), pos, neg, pm, nm,
         *loss_args((form, beta, gamma_pos, gamma_neg, margin, lam)), stats.contiguous(), gp, gn, B, KP, KN, *strides,
         FORM=form, **_flags(pos_mask, neg_mask))
    return gp, gn


def oucl_score_bwd_bwd(grad_rows, gg_pos, gg_neg, pos, neg, pos_mask, neg_mask, stats, form, beta, gamma_pos,
                       gamma_neg, margin, lam):
    """(grad of grad_rows [B], hv_pos [B, K⁺], hv_neg [B, K⁻]); not for the hinge form (zero Hessian)."""
    if form == 0:
        raise ValueError("the hinge form has a zero Hessian: its double backward needs no kernel")
    pm, nm, B, KP, KN, strides = _common_args(pos, neg, pos_mask, neg_mask)
    ggo = torch.empty(B, dtype=stats.dtype, device=pos.device)
    hp, hn = torch.empty(B, KP, dtype=pos.dtype, device=pos.device), torch.empty(B, KN, dtype=neg.dtype, device=neg.device)
    _run(_score_bwd_bwd_kernel, B, pos.device, grad_rows.contiguous(), gg_pos.contiguous(), gg_neg.contiguous(), pos,
         neg, pm, nm, *loss_args((form, beta, gamma_pos, gamma_neg, margin, lam)), stats.contiguous(), ggo, hp, hn, B,
         KP, KN, *strides, FORM=form, **_flags(pos_mask, neg_mask))
    return ggo, hp, hn


def margin_score_fwd(pos, neg, pos_mask, neg_mask):
    """stats [B, 5] = (p_min, n_max, ties_p, ties_n, valid) in the accumulation dtype."""
    pm, nm, B, KP, KN, strides = _common_args(pos, neg, pos_mask, neg_mask)
    stats = torch.empty(B, 5, dtype=_acc_dtype(pos), device=pos.device)
    _run(_margin_fwd_kernel, B, pos.device, pos, neg, pm, nm, stats, B, KP, KN, *strides, **_flags(pos_mask, neg_mask))
    return stats


def margin_score_bwd(grad, pos, neg, pos_mask, neg_mask, stats):
    """(grad_pos, grad_neg) from ``grad [B, 2]`` = (∂/∂p_min, ∂/∂n_max) per row."""
    pm, nm, B, KP, KN, strides = _common_args(pos, neg, pos_mask, neg_mask)
    gp, gn = torch.empty(B, KP, dtype=pos.dtype, device=pos.device), torch.empty(B, KN, dtype=neg.dtype, device=neg.device)
    _run(_margin_bwd_kernel, B, pos.device, grad.contiguous(), pos, neg, pm, nm, stats.contiguous(), gp, gn, B, KP, KN,
         *strides, **_flags(pos_mask, neg_mask))
    return gp, gn


def margin_injection_fwd(pos, neg, pos_mask, neg_mask, sigma_pos, sigma_neg):
    """Per-row R_σ ``[B]`` in the accumulation dtype."""
    pm, nm, B, KP, KN, strides = _common_args(pos, neg, pos_mask, neg_mask)
    rows = torch.empty(B, dtype=_acc_dtype(pos), device=pos.device)
    _run(_margin_injection_fwd_kernel, B, pos.device, pos, neg, pm, nm, sigma_pos.contiguous(), sigma_neg.contiguous(),
         rows, B, KP, KN, *strides, **_flags(pos_mask, neg_mask))
    return rows


def margin_injection_bwd(grad_rows, pos, neg, pos_mask, neg_mask, sigma_pos, sigma_neg):
    """(∂pos [B, K̂⁺], ∂neg [B, K̂⁻] in the input dtype, ∂σ⁺ [B], ∂σ⁻ [B] in the accumulation dtype)."""
    pm, nm, B, KP, KN, strides = _common_args(pos, neg, pos_mask, neg_mask)
    gp, gn = torch.empty(B, KP, dtype=pos.dtype, device=pos.device), torch.empty(B, KN, dtype=neg.dtype, device=neg.device)
    gsp, gsn = (torch.empty(B, dtype=_acc_dtype(pos), device=pos.device) for _ in range(2))
    _run(_margin_injection_bwd_kernel, B, pos.device, grad_rows.contiguous(), pos, neg, pm, nm, sigma_pos.contiguous(),
         sigma_neg.contiguous(), gp, gn, gsp, gsn, B, KP, KN, *strides, **_flags(pos_mask, neg_mask))
    return gp, gn, gsp, gsn
