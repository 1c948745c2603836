"""The label-mode second derivative in Triton, fused: the Hessian-vector product of the MetAug meta step with
no B×M tensor and no row chunk of scores.

The backward of label mode maps (g [B], zn [B, D], rn [M, D]) to a·G·rn and a·Gᵀ·zn, G = ∂(Σ_i g_i ℓ_i)/∂S on
the scores S = a·zn·rnᵀ + b. Its vector-Jacobian product for cotangents (v_z, v_r) puts U = v_z·rnᵀ + zn·v_rᵀ
on the scores (U without its factor a, which scales the results instead) and asks, per row, for
d_g = ∂ℓ/∂S·U and W = g·H·U, H the row's Hessian; then ∂zn = a·(G·v_r + a·W·rn), ∂rn = a·(Gᵀ·v_z + a·Wᵀ·zn).
A row's H·U needs sums of U over its whole row, weighted by the row's softmax, before any entry of W: two
rounds, as the C++ CPU kernel takes them (csrc/cpu/label_hvp.h), here over tiles that are recomputed, never
stored:

1. :func:`_hvp_sums_kernel`, a program per block of rows, walks the column tiles, recomputes S and U
   (``tl.dot``) and adds each row's four sums (the OUCL forms: Σ⁺ w·u'·U and Σ⁻ w·v'·U, w the side's
   softmax; InfoNCE: Σ⁻ w·U, Σ⁺ σ·U, Σ⁺ σ', Σ⁺ σ'·U);
2. from those sums and the forward's stats, each row's constants (:func:`_row_lanes`, O(B) torch ops), and
   d_g;
3. :func:`_hvp_rows_kernel` recomputes each tile of a row block into G and W and accumulates
   G·v_r + a·W·rn; :func:`_hvp_cols_kernel` does the same by column blocks for Gᵀ·v_z + a·Wᵀ·zn (only when
   the reference rows need a gradient). Each output row belongs to one program: no atomics, a fixed order
   of summation, deterministic.

One exp per entry and pass (the entry's own side: a softmax weight, or InfoNCE's sigmoid from e^-|x|).
The forms are those with a Hessian (contract.HVP_FORMS); the hinge's is zero and the margins' are piecewise
linear, and _ops/label.py takes them apart. Rows are the normalized rows in their accumulation dtype, fp32 or
fp64; ``tl.dot`` runs at ``ieee`` precision (no TF32: its 1e-3 relative error would be the whole tolerance
of an fp32 Hessian-vector product).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import HVP_FORMS, Form, Stat
from . import label
from ._common import INFONCE, WEIGHTED, launch, load_cfg, loss_args, op, side_terms

# Per-row constants, the columns of ``lanes [B, N_LANES]`` (:func:`_row_lanes`), in this order: the forward's
# positive shift and log-sum (InfoNCE: Σσ and 0), its negative shift and log-sum, then round 2's coef, c1, sa,
# sb, and valid (1 or 0). The OUCL forms: coef = g/β·σ(y), c1 = coef·σ(-y)·(sa + sb), y the row's pre-softplus
# argument, sa and sb round 1's two sums. InfoNCE: coef = g/n⁺, c1 = g·β²/n⁺, sa = Σ⁻ w·U,
# sb = Σ⁻ w·U·Σσ' - Σσ'·U - Σσ·Σ⁻ w·U (csrc/cpu/label_hvp.h's HvpLanes, whose notation this follows).
N_LANES = tl.constexpr(9)
PS, PL, NS, NL, COEF, C1, SA, SB, VALID = (tl.constexpr(k) for k in range(9))
SIG_SUM = PS


@triton.jit
def _lane(lanes_ptr, rows, rmask, k: tl.constexpr):
    """Lane ``k`` of the rows, ``[BM]``."""
    return tl.load(lanes_ptr + rows.to(tl.int64) * N_LANES + k, mask=rmask, other=0.0)


@triton.jit
def _tile(zn_ptr, rn_ptr, vz_ptr, vr_ptr, rows, rmask, cols, cmask, D, acc_ty: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, BD: tl.constexpr, WITH_R: tl.constexpr):
    """(zn·rnᵀ, U) of the tile ``[BM, BN]``: U = v_z·rnᵀ (+ zn·v_rᵀ WITH_R), over the features in chunks of BD.
    Rows are contiguous [n, D]."""
    p = tl.zeros((BM, BN), acc_ty)
    u = tl.zeros((BM, BN), acc_ty)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dm = d[None, :] < D
        at_r = rows[:, None].to(tl.int64) * D + d[None, :]
        at_c = cols[:, None].to(tl.int64) * D + d[None, :]
        z = tl.load(zn_ptr + at_r, mask=rmask[:, None] & dm, other=0.0)
        vz = tl.load(vz_ptr + at_r, mask=rmask[:, None] & dm, other=0.0)
        r = tl.load(rn_ptr + at_c, mask=cmask[:, None] & dm, other=0.0)
        p = tl.dot(z, tl.trans(r), acc=p, input_precision="ieee", out_dtype=acc_ty)
        u = tl.dot(vz, tl.trans(r), acc=u, input_precision="ieee", out_dtype=acc_ty)
        if WITH_R:
            vr = tl.load(vr_ptr + at_c, mask=cmask[:, None] & dm, other=0.0)
            u = tl.dot(z, tl.trans(vr), acc=u, input_precision="ieee", out_dtype=acc_ty)
    return p, u


@triton.jit
def _pairs(lab_ptr, rlab_ptr, rows, rmask, cols, cmask, self_offset):
    """(positive, negative) masks of the tile: the labels decide, and the excluded pair j = i + self_offset is
    never a positive (still a negative when the labels differ, as reference.py)."""
    lab = tl.load(lab_ptr + rows, mask=rmask, other=0)
    rlab = tl.load(rlab_ptr + cols, mask=cmask, other=0)
    same = lab[:, None] == rlab[None, :]
    inside = rmask[:, None] & cmask[None, :]
    excluded = (self_offset >= 0) & (cols[None, :] == rows[:, None] + self_offset)
    return same & inside & (excluded == 0), (same == 0) & inside


@triton.jit
def _sig_pair(x):
    """(σ(x), σ(-x)) from one exp of -|x|, neither formed as 1 - the other (no cancellation)."""
    t = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + t)
    small = t / (1.0 + t)
    return tl.where(x >= 0, big, small), tl.where(x >= 0, small, big)


@triton.jit
def _weights(s, pos, neg, ps, pl, ns, nl, beta, gamma_pos, gamma_neg, margin, FORM: tl.constexpr):
    """Per entry of the scores ``s``, with the rows' lanes broadcast ``[BM, 1]``: the OUCL forms' (w, d1, d2),
    w the softmax weight of the entry within its side and d1, d2 the side's exponent derivatives; InfoNCE's
    (σ(C - βs), σ(βs - C)) on positives and (w, dv) on negatives, C = ns + nl. One exp per entry."""
    if FORM == INFONCE:
        ev, dv, _ = side_terms(s, WEIGHTED, False, beta, gamma_pos, gamma_neg, margin)
        sg, sg_neg = _sig_pair((ns + nl) - beta * s)
        w = tl.exp((ev - ns) - nl)
        return sg, sg_neg, w, dv
    u, du, d2u = side_terms(s, FORM, True, beta, gamma_pos, gamma_neg, margin)
    v, dv, d2v = side_terms(s, FORM, False, beta, gamma_pos, gamma_neg, margin)
    w = tl.exp(tl.where(pos, (u - ps) - pl, (v - ns) - nl))
    return w, tl.where(pos, du, dv), tl.where(pos, d2u, d2v), w


@triton.jit
def _hvp_sums_kernel(zn_ptr, rn_ptr, vz_ptr, vr_ptr, lab_ptr, rlab_ptr, lanes_ptr, beta: tl.float64,
                     inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                     lam: tl.float64, sums_ptr, B, M, D, self_offset, sim_a: tl.float64, sim_b: tl.float64,
                     FORM: tl.constexpr, WITH_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr):
    """Round 1: ``sums [B, 4]`` of each row over every column tile (zero for invalid rows)."""
    acc_ty = zn_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    a = tl.full((), sim_a, acc_ty)
    b = tl.full((), sim_b, acc_ty)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < B
    ps = _lane(lanes_ptr, rows, rmask, PS)[:, None]
    pl = _lane(lanes_ptr, rows, rmask, PL)[:, None]
    ns = _lane(lanes_ptr, rows, rmask, NS)[:, None]
    nl = _lane(lanes_ptr, rows, rmask, NL)[:, None]
    valid = _lane(lanes_ptr, rows, rmask, VALID) != 0
    s0 = tl.zeros((BM,), acc_ty)
    s1 = tl.zeros((BM,), acc_ty)
    s2 = tl.zeros((BM,), acc_ty)
    s3 = tl.zeros((BM,), acc_ty)
    for c0 in range(0, M, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < M
        p, t = _tile(zn_ptr, rn_ptr, vz_ptr, vr_ptr, rows, rmask, cols, cmask, D, acc_ty, BM, BN, BD, WITH_R)
        s = a * p + b
        pos, neg = _pairs(lab_ptr, rlab_ptr, rows, rmask, cols, cmask, self_offset)
        if FORM == INFONCE:
            sg, sg_neg, w, _ = _weights(s, pos, neg, ps, pl, ns, nl, beta, gamma_pos, gamma_neg, margin, FORM)
            ds = sg * sg_neg
            s0 += tl.sum(tl.where(neg, w * t, 0.0), axis=1)
            s1 += tl.sum(tl.where(pos, sg * t, 0.0), axis=1)
            s2 += tl.sum(tl.where(pos, ds, 0.0), axis=1)
            s3 += tl.sum(tl.where(pos, ds * t, 0.0), axis=1)
        else:
            w, d1, _, _ = _weights(s, pos, neg, ps, pl, ns, nl, beta, gamma_pos, gamma_neg, margin, FORM)
            wd = w * d1 * t
            s0 += tl.sum(tl.where(pos, wd, 0.0), axis=1)
            s1 += tl.sum(tl.where(neg, wd, 0.0), axis=1)
    out = sums_ptr + rows.to(tl.int64) * 4
    tl.store(out, tl.where(valid, s0, 0.0), mask=rmask)
    tl.store(out + 1, tl.where(valid, s1, 0.0), mask=rmask)
    tl.store(out + 2, tl.where(valid, s2, 0.0), mask=rmask)
    tl.store(out + 3, tl.where(valid, s3, 0.0), mask=rmask)


@triton.jit
def _second(zn_ptr, rn_ptr, vz_ptr, vr_ptr, lab_ptr, rlab_ptr, lanes_ptr, rows, rmask, cols, cmask, D, self_offset,
            a, b, beta, gamma_pos, gamma_neg, margin, acc_ty: tl.constexpr, FORM: tl.constexpr,
            WITH_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Round 2 on one tile: (G, a·W) ``[BM, BN]`` from the rows' whole sums in their lanes, zero off the pairs
    and on invalid rows (whose exponents may overflow)."""
    p, t = _tile(zn_ptr, rn_ptr, vz_ptr, vr_ptr, rows, rmask, cols, cmask, D, acc_ty, BM, BN, BD, WITH_R)
    s = a * p + b
    pos, neg = _pairs(lab_ptr, rlab_ptr, rows, rmask, cols, cmask, self_offset)
    ps = _lane(lanes_ptr, rows, rmask, PS)[:, None]
    pl = _lane(lanes_ptr, rows, rmask, PL)[:, None]
    ns = _lane(lanes_ptr, rows, rmask, NS)[:, None]
    nl = _lane(lanes_ptr, rows, rmask, NL)[:, None]
    coef = _lane(lanes_ptr, rows, rmask, COEF)[:, None]
    c1 = _lane(lanes_ptr, rows, rmask, C1)[:, None]
    sa = _lane(lanes_ptr, rows, rmask, SA)[:, None]
    sb = _lane(lanes_ptr, rows, rmask, SB)[:, None]
    on = (_lane(lanes_ptr, rows, rmask, VALID) != 0)[:, None]
    if FORM == INFONCE:
        sg, sg_neg, w, dv = _weights(s, pos, neg, ps, pl, ns, nl, beta, gamma_pos, gamma_neg, margin, FORM)
        sig_sum = _lane(lanes_ptr, rows, rmask, SIG_SUM)[:, None]
        g = tl.where(pos, -coef * beta * sg, coef * sig_sum * w * dv)
        h = tl.where(pos, c1 * sg * sg_neg * (t - sa), c1 * w * (sig_sum * t + sb))
    else:
        w, d1, d2, _ = _weights(s, pos, neg, ps, pl, ns, nl, beta, gamma_pos, gamma_neg, margin, FORM)
        g = coef * w * d1
        h = w * d1 * c1 + coef * w * (d1 * (d1 * t - tl.where(pos, sa, sb)) + d2 * t)
    keep = on & (pos | neg)
    return tl.where(keep, g, 0.0), tl.where(keep, a * h, 0.0)


@triton.jit
def _hvp_rows_kernel(zn_ptr, rn_ptr, vz_ptr, vr_ptr, lab_ptr, rlab_ptr, lanes_ptr, beta: tl.float64,
                     inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                     lam: tl.float64, dz_ptr, B, M, D, self_offset, sim_a: tl.float64, sim_b: tl.float64,
                     FORM: tl.constexpr, WITH_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, BDO: tl.constexpr):
    """Round 2 by rows: ``dz [B, D]`` = a·Σ_j (G·v_r + a·W·rn) for a row block and a chunk of BDO features."""
    acc_ty = zn_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    a = tl.full((), sim_a, acc_ty)
    b = tl.full((), sim_b, acc_ty)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < B
    d = tl.program_id(1) * BDO + tl.arange(0, BDO)
    dm = d[None, :] < D
    acc = tl.zeros((BM, BDO), acc_ty)
    for c0 in range(0, M, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < M
        g, aw = _second(zn_ptr, rn_ptr, vz_ptr, vr_ptr, lab_ptr, rlab_ptr, lanes_ptr, rows, rmask, cols, cmask, D,
                        self_offset, a, b, beta, gamma_pos, gamma_neg, margin, acc_ty, FORM, WITH_R, BM, BN, BD)
        at_c = cols[:, None].to(tl.int64) * D + d[None, :]
        rn = tl.load(rn_ptr + at_c, mask=cmask[:, None] & dm, other=0.0)
        acc = tl.dot(aw, rn, acc=acc, input_precision="ieee", out_dtype=acc_ty)
        if WITH_R:
            vr = tl.load(vr_ptr + at_c, mask=cmask[:, None] & dm, other=0.0)
            acc = tl.dot(g, vr, acc=acc, input_precision="ieee", out_dtype=acc_ty)
    tl.store(dz_ptr + rows[:, None].to(tl.int64) * D + d[None, :], a * acc, mask=rmask[:, None] & dm)


@triton.jit
def _hvp_cols_kernel(zn_ptr, rn_ptr, vz_ptr, vr_ptr, lab_ptr, rlab_ptr, lanes_ptr, beta: tl.float64,
                     inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                     lam: tl.float64, dr_ptr, B, M, D, self_offset, sim_a: tl.float64, sim_b: tl.float64,
                     FORM: tl.constexpr, WITH_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, BDO: tl.constexpr):
    """Round 2 by columns: ``dr [M, D]`` = a·Σ_i (Gᵀ·v_z + a·Wᵀ·zn) for a column block and a chunk of BDO
    features, over the same tiles as the row kernel (each recomputed from its row block's lanes)."""
    acc_ty = zn_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    a = tl.full((), sim_a, acc_ty)
    b = tl.full((), sim_b, acc_ty)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < M
    d = tl.program_id(1) * BDO + tl.arange(0, BDO)
    dm = d[None, :] < D
    acc = tl.zeros((BN, BDO), acc_ty)
    for r0 in range(0, B, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < B
        g, aw = _second(zn_ptr, rn_ptr, vz_ptr, vr_ptr, lab_ptr, rlab_ptr, lanes_ptr, rows, rmask, cols, cmask, D,
                        self_offset, a, b, beta, gamma_pos, gamma_neg, margin, acc_ty, FORM, WITH_R, BM, BN, BD)
        at_r = rows[:, None].to(tl.int64) * D + d[None, :]
        z = tl.load(zn_ptr + at_r, mask=rmask[:, None] & dm, other=0.0)
        vz = tl.load(vz_ptr + at_r, mask=rmask[:, None] & dm, other=0.0)
        acc = tl.dot(tl.trans(aw), z, acc=acc, input_precision="ieee", out_dtype=acc_ty)
        acc = tl.dot(tl.trans(g), vz, acc=acc, input_precision="ieee", out_dtype=acc_ty)
    tl.store(dr_ptr + cols[:, None].to(tl.int64) * D + d[None, :], a * acc, mask=cmask[:, None] & dm)


def tiles(dtype: torch.dtype, D: int) -> dict:
    """The kernels' tile shape (BM × BN scores, BD features per step of the score products, BDO output
    features per program: the whole width up to 128, so that a tile is recomputed once per 128 features)
    and warps. fp32 and fp64 products run on FMA units from registers: 32 × 32 tiles with 8 warps (16 × 16
    with 4 in fp64) hold a tile of S, one of U and the [BM, 128] accumulator without spilling (fp32's row
    kernel took 180-214 registers; with 4 warps it sat at 255 and spilled; ``make check-triton`` checks
    every form). Small blocks under the interpreter."""
    out = min(128, max(16, triton.next_power_of_2(D)))
    if label.interpreting():
        bd = min(64, max(16, triton.next_power_of_2(D)))
        return dict(BM=16, BN=16, BD=bd, BDO=bd, num_warps=4)
    if dtype == torch.float64:
        return dict(BM=16, BN=16, BD=16, BDO=out, num_warps=4)
    return dict(BM=32, BN=32, BD=16, BDO=out, num_warps=8)


def _row_lanes(stats: Tensor, grad_rows: Tensor, sums: Tensor, form: int, beta: float) -> Tuple[Tensor, Tensor]:
    """(lanes [B, N_LANES] of round 2, d_g [B] = ∂ℓ/∂S·U without the slope) from the forward's ``stats``,
    the incoming ``grad_rows`` and round 1's ``sums [B, 4]``; every constant zero on invalid rows."""
    valid = stats[:, Stat.VALID] != 0
    g = torch.where(valid, grad_rows.to(stats.dtype), 0.0)
    zero = torch.zeros_like(g)
    sa, sb, sc, sd = sums.unbind(1)
    if form == Form.INFONCE:
        n_pos = stats[:, Stat.NCE_N_POS].clamp(min=1.0)
        s_sig = stats[:, Stat.NCE_SIGMOID_SUM]
        shifts = (s_sig, zero, stats[:, Stat.NCE_SHIFT], stats[:, Stat.NCE_LOG_SUM])
        consts = (g / n_pos, g * beta * beta / n_pos, sa, sa * sc - sd - s_sig * sa)
        d_g = beta / n_pos * (s_sig * sa - sb)
    else:
        shifts = tuple(stats[:, k] for k in (Stat.POS_SHIFT, Stat.POS_LOG_SUM, Stat.NEG_SHIFT, Stat.NEG_LOG_SUM))
        y = shifts[0] + shifts[1] + shifts[2] + shifts[3]
        coef = g / beta * torch.sigmoid(y)
        consts = (coef, coef * torch.sigmoid(-y) * (sa + sb), sa, sb)
        d_g = torch.sigmoid(y) / beta * (sa + sb)
    lanes = torch.stack([torch.where(valid, x, zero) for x in (*shifts, *consts)] + [valid.to(g)], 1)
    return lanes.contiguous(), torch.where(valid, d_g, zero)


@op
def oucl_label_hvp(grad_rows: Tensor, zn: Tensor, rn: Tensor, v_z: Tensor, v_r: Tensor, labels: Tensor,
                   ref_labels: Tensor, stats: Tensor, self_offset: int, similarity: int, form: int, beta: float,
                   gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                   ref_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The label-mode second derivative, fused: (d_g [B], d_z [B, D], d_r [M, D], or [0, D] without
    ``ref_grad``) for the normalized rows ``zn [B, D]``, ``rn [M, D]`` (fp32 or fp64, one dtype), the
    cotangents ``v_z [B, D]``, ``v_r [M, D]`` (``[0, D]``: the reference rows had no gradient), the forward's
    ``stats [B, N_STATS]`` and ``grad_rows [B]``; labels any integers. The similarity's slope is in all
    three. Forms with a Hessian only (contract.HVP_FORMS)."""
    if form not in HVP_FORMS:
        raise ValueError(f"oucl_label_hvp (triton): form {form} has no fused second derivative; "
                         f"forms: {[int(f) for f in HVP_FORMS]}")
    if zn.dtype not in (torch.float32, torch.float64) or rn.dtype != zn.dtype:
        raise TypeError(f"oucl_label_hvp (triton): zn and rn must be float32 or float64 of one dtype, got "
                        f"{zn.dtype} and {rn.dtype}")
    B, D = zn.shape
    M = rn.shape[0]
    with_r = v_r.shape[0] > 0
    d_r = zn.new_zeros(M if ref_grad else 0, D)
    if B == 0 or M == 0 or D == 0:
        return zn.new_zeros(B), zn.new_zeros(B, D), d_r
    zn, rn, v_z = zn.contiguous(), rn.contiguous(), v_z.to(zn.dtype).contiguous()
    v_r = v_r.to(zn.dtype).contiguous() if with_r else v_z
    lab, rlab = label.dense_labels(labels, ref_labels)
    stats = stats.to(zn.dtype)
    t = tiles(zn.dtype, D)
    sim_a, sim_b = (0.5, 0.5) if similarity == 0 else (1.0, 0.0)
    args = (zn, rn, v_z, v_r, lab, rlab)
    tail = dict(FORM=form, WITH_R=with_r, BM=t["BM"], BN=t["BN"], BD=t["BD"], num_warps=t["num_warps"])
    loss = loss_args((form, beta, gamma_pos, gamma_neg, margin, lam))
    blank, _ = _row_lanes(stats, grad_rows, stats.new_zeros(B, 4), form, beta)
    sums = torch.empty(B, 4, dtype=zn.dtype, device=zn.device)
    launch(_hvp_sums_kernel, (triton.cdiv(B, t["BM"]),), zn.device, *args, blank, *loss, sums, B, M, D, self_offset,
           sim_a, sim_b, **tail)
    lanes, d_g = _row_lanes(stats, grad_rows, sums, form, beta)
    d_z = torch.empty_like(zn)
    chunks = triton.cdiv(D, t["BDO"])
    launch(_hvp_rows_kernel, (triton.cdiv(B, t["BM"]), chunks), zn.device, *args, lanes, *loss, d_z, B, M, D,
           self_offset, sim_a, sim_b, BDO=t["BDO"], **tail)
    if ref_grad:
        launch(_hvp_cols_kernel, (triton.cdiv(M, t["BN"]), chunks), zn.device, *args, lanes, *loss, d_r, B, M, D,
               self_offset, sim_a, sim_b, BDO=t["BDO"], **tail)
    return sim_a * d_g, d_z, d_r
