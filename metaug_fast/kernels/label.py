"""Label-mode OUCL, InfoNCE and margin statistics in Triton, fused with the similarity: no B×M tensor.

Inputs are the raw embeddings ``e [B, D]``, ``r [M, D]`` (fp16/bf16/fp32/fp64) with their inverse norms
``iz [B]``, ``ir [M]`` (1/max(‖x‖, ε), accumulation dtype), so a tile of raw dot products P = e·rᵀ runs
on the tensor cores in the inputs' own dtype and cos = P·iz·ir is exact up to summation order; the
normalization's Jacobian reaches the embeddings through the gradients of iz and ir, which the backward
returns (autograd then differentiates iz = 1/max(‖e‖, ε)). Labels are int32 class ids (one compare per pair;
:func:`dense_labels`), and the positive and negative counts come from class
counts, not from the tiles. The label ops at the end of the module (``oucl_label_fwd``, ``oucl_label_bwd``,
``oucl_label_cross_fwd``, ``oucl_label_cross_bwd``) have the C++ ops' names and schemas: the one label
interface of every backend (metaug_fast/_ops/label.py).

What keeps the loop short (flash-attention's structure): for D <= 256 (RESIDENT) a program loads its own
block once (rows of e; in the column kernel, columns of r) and streams the other side, one tl.dot per tile;
only EDGE tiles, the ragged last one and those crossing the excluded pairs j = i + self_offset, pay for
bounds and exclusion masks (two loops per kernel, see _segments); exponents are kept in log2 units, β·log2(e)
folded into the scale, so each entry costs one exp2.

Forward: grid (row blocks, column splits). A program walks its column tiles, computes S = a·cos + b
(a, b: the similarity's affine map), splits positives and negatives by comparing labels, and keeps per-row
running statistics, written as a partial state ``part [splits, B, 6]`` that
:func:`oucl_label_fwd` merges per row: OUCL forms (max⁺, Σ⁺, max⁻, Σ⁻) with Σ = Σ exp(e - max)
(the online log-sum-exp; maxima stored in natural units); hinge (0, Σs⁺, 0, Σs⁻); InfoNCE like the OUCL
forms on the negatives only, then a second sweep given C (Σ⁺ softplus(C - βs), Σ⁺ σ(C - βs)) over the tiles
that hold positives only, rows and reference rows taken in class order (:func:`label_positive_sums`); margins
(min⁺, max⁻, ties⁺, ties⁻, NaN⁺, NaN⁻).

Backward: two kernels recompute the tiles into G = ∂(Σ g_i ℓ_i)/∂cos from per-row factors
(:func:`grad_factors`) and accumulate, deterministically (no atomics): per row block A = Σ_j G·ir·r, giving
∂e = iz·A and ∂iz = e·A; per column block A' = Σ_i G·iz·e, giving ∂r = ir·A' and ∂ir = r·A'. One program
covers all of D up to 256 (a grid axis over chunks of D beyond); the row kernel splits its columns when the
row blocks are few (a small batch against a bank), partials summed in split order.

``tl.dot`` precision is explicit: ``ieee`` for fp32 inputs (no silent TF32), native with fp32
accumulation for fp16/bf16 in the similarity, and for the backward's G products on half inputs G rounded to
the inputs' dtype (GPREC "input": tensor cores, fp32 accumulation).
"""
import contextlib
import os
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._numerics import merge_lse
from ..contract import N_STATS, Form, Part, Stat, label_self_mode, stats_of
from ._common import (
    HINGE,
    INFONCE,
    LN2,
    LOG2E,
    MARGIN,
    N_PARTS,
    PT_0,
    PT_1,
    PT_2,
    PT_3,
    PT_4,
    PT_5,
    WEIGHTED,
    extremum_update,
    launch,
    load_cfg,
    loss_args,
    lse_pair_update,
    lse_update,
    op,
    side_terms,
    softplus_sigmoid,
)


@triton.jit
def _block(x_ptr, idx, imask, D, s_xb, s_xd, BD: tl.constexpr, UPCAST: tl.constexpr):
    """x[idx, :BD] (zeros past D and where ``imask`` is false), the whole feature axis of a block held
    resident while the other side streams (D <= BD)."""
    d = tl.arange(0, BD)
    x = tl.load(x_ptr + idx[:, None].to(tl.int64) * s_xb + d[None, :].to(tl.int64) * s_xd,
                mask=imask[:, None] & (d[None, :] < D), other=0.0)
    return _upcast(x, UPCAST)


@triton.jit
def _upcast(x, UPCAST: tl.constexpr):
    """``x`` as :func:`_block` returns it: in fp32 under UPCAST (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _raw_dot(a_res, b_res, e_ptr, r_ptr, rows, cols, rmask, cmask, D, s_eb, s_ed, s_rb, s_rd, acc_ty: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             RESIDENT: tl.constexpr):
    """P = e[rows]·r[cols]ᵀ, ``[BM, BN]`` in the accumulation dtype. RESIDENT (D <= BD): one product, with
    whichever side the caller keeps resident (``a_res`` = e[rows] or ``b_res`` = r[cols], the other None)
    and the other loaded here; otherwise a loop over chunks of BD features."""
    if RESIDENT:
        a = _block(e_ptr, rows, rmask, D, s_eb, s_ed, BD, UPCAST) if a_res is None else a_res
        b = _block(r_ptr, cols, cmask, D, s_rb, s_rd, BD, UPCAST) if b_res is None else b_res
        return tl.dot(a, tl.trans(b), input_precision=PREC, out_dtype=acc_ty)
    acc = tl.zeros((BM, BN), acc_ty)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        a = tl.load(e_ptr + rows[:, None].to(tl.int64) * s_eb + d[None, :].to(tl.int64) * s_ed,
                    mask=rmask[:, None] & (d[None, :] < D), other=0.0)
        b = tl.load(r_ptr + cols[:, None].to(tl.int64) * s_rb + d[None, :].to(tl.int64) * s_rd,
                    mask=cmask[:, None] & (d[None, :] < D), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc=acc, input_precision=PREC, out_dtype=acc_ty)
    return acc


@triton.jit
def _scores(a_res, b_res, e_ptr, iz, r_ptr, ir_ptr, rows, rmask, t, M, D, s_eb, s_ed, s_rb, s_rd, SIM: tl.constexpr,
            acc_ty: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
            UPCAST: tl.constexpr, RESIDENT: tl.constexpr):
    """Column tile t: raw dots P and scores s ``[BM, BN]``, the column indices, their bounds mask and ir."""
    cols = t * BN + tl.arange(0, BN)
    cmask = cols < M
    ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
    P = _raw_dot(a_res, b_res, e_ptr, r_ptr, rows, cols, rmask, cmask, D, s_eb, s_ed, s_rb, s_rd, acc_ty, BM, BN,
                 BD, PREC, UPCAST, RESIDENT)
    cos = P * iz[:, None] * ir[None, :]
    s = 0.5 * cos + 0.5 if SIM == 0 else cos
    return P, s, cols, cmask, ir


@triton.jit
def _tile(a_res, b_res, e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, t, M, D, self_offset, s_eb, s_ed,
          s_rb, s_rd, SIM: tl.constexpr, acc_ty: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, RESIDENT: tl.constexpr, EDGE: tl.constexpr):
    """One tile: raw dots P, scores s, positive and negative masks, the column indices and ir. Only an EDGE
    tile (past the last full column tile, or crossing the excluded pairs j = i + self_offset) pays for the
    bounds and the exclusion; elsewhere every column is inside and a pair is positive or negative by its
    labels alone (rows past B are computed and never stored)."""
    P, s, cols, cmask, ir = _scores(a_res, b_res, e_ptr, iz, r_ptr, ir_ptr, rows, rmask, t, M, D, s_eb, s_ed, s_rb,
                                    s_rd, SIM, acc_ty, BM, BN, BD, PREC, UPCAST, RESIDENT)
    rlab = tl.load(rlab_ptr + cols, mask=cmask, other=0)
    same = lab_r[:, None] == rlab[None, :]
    if EDGE:
        inside = rmask[:, None] & cmask[None, :]
        pos = same & inside & (_excluded(rows, cols, self_offset) == 0)
        neg = (same == 0) & inside
    else:
        pos = same
        neg = same == 0
    return P, s, pos, neg, ir


@triton.jit
def _interior(k, t_begin, band_lo, band_hi):
    """The k-th interior tile: from t_begin on, over the band."""
    t = t_begin + k
    return tl.where(t >= band_lo, t + (band_hi - band_lo), t)


@triton.jit
def _nth_tile(k, t_begin, band_lo, band_hi, last, EDGE: tl.constexpr):
    """The k-th tile of a loop's EDGE tiles, or of its interior ones."""
    if EDGE:
        t = _edge(k, band_lo, band_hi, last)
    else:
        t = _interior(k, t_begin, band_lo, band_hi)
    return t


@triton.jit
def _edge(k, band_lo, band_hi, last):
    """The k-th edge tile: the band's, then the ragged last one."""
    return tl.where(k < band_hi - band_lo, band_lo + k, last)


@triton.jit
def _fwd_tiles(a0, a1, a2, a3, n_p, n_n, n_tiles, t_begin, band_lo, band_hi, last, a_res, e_ptr, iz, r_ptr, ir_ptr,
               lab_r, rlab_ptr, rows, rmask, M, D, self_offset, s_eb, s_ed, s_rb, s_rd, beta, beta2, gamma_pos,
               gamma_neg, margin, FORM: tl.constexpr, SIM: tl.constexpr, acc_ty: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               RESIDENT: tl.constexpr, EDGE: tl.constexpr):
    """The forward's running statistics over ``n_tiles`` tiles, interior ones or EDGE ones (see _segments)."""
    for k in range(0, n_tiles):
        t = _nth_tile(k, t_begin, band_lo, band_hi, last, EDGE)
        P, s, pos, neg, ir = _tile(a_res, None, e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, t, M, D,
                                   self_offset, s_eb, s_ed, s_rb, s_rd, SIM, acc_ty, BM, BN, BD, PREC, UPCAST,
                                   RESIDENT, EDGE)
        if FORM == MARGIN:
            a0, a1, n_p = extremum_update(a0, a1, n_p, s, pos, True)
            a2, a3, n_n = extremum_update(a2, a3, n_n, s, neg, False)
        elif FORM == HINGE:
            a1 += tl.sum(tl.where(pos, s, 0.0), axis=1)
            a3 += tl.sum(tl.where(neg, s, 0.0), axis=1)
        elif FORM == INFONCE:
            v, _, _ = side_terms(s, WEIGHTED, False, beta2, gamma_pos, gamma_neg, margin)
            a2, a3 = lse_update(a2, a3, tl.where(neg, v, float("-inf")), True)
        else:
            u, _, _ = side_terms(s, FORM, True, beta2, gamma_pos, gamma_neg, margin)
            v, _, _ = side_terms(s, FORM, False, beta2, gamma_pos, gamma_neg, margin)
            a0, a1, a2, a3 = lse_pair_update(a0, a1, a2, a3, u, v, pos, neg)
    return a0, a1, a2, a3, n_p, n_n


@triton.jit
def _label_fwd_kernel(e_ptr, iz_ptr, r_ptr, ir_ptr, lab_ptr, rlab_ptr, beta: tl.float64, inv_beta: tl.float64,
                      gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64, lam: tl.float64,
                      part_ptr, B, M, D, self_offset, tiles_per_split, s_eb, s_ed, s_rb, s_rd,
                      FORM: tl.constexpr, SIM: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                      RESIDENT: tl.constexpr):
    acc_ty = iz_ptr.dtype.element_ty
    beta2 = tl.full((), beta * LOG2E, acc_ty)  # the exponents in log2 units: exp2 with no extra multiply
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    split = tl.program_id(1)
    r0 = tl.program_id(0) * BM
    rows = r0 + tl.arange(0, BM)
    rmask = rows < B
    iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(M, BN))
    zero = tl.zeros((BM,), acc_ty)
    if FORM == MARGIN:
        a0 = tl.full((BM,), float("inf"), acc_ty)
        a2 = tl.full((BM,), float("-inf"), acc_ty)
    elif FORM == HINGE:
        a0 = zero
        a2 = zero
    else:
        a0 = tl.full((BM,), float("-inf"), acc_ty)
        a2 = tl.full((BM,), float("-inf"), acc_ty)
    a1 = zero
    a3 = zero
    n_p = tl.zeros((BM,), tl.int32)  # margins only: NaN counts (the pair counts come from label counts)
    n_n = tl.zeros((BM,), tl.int32)
    a_res = _block(e_ptr, rows, rmask, D, s_eb, s_ed, BD, UPCAST) if RESIDENT else None
    lo, hi = _row_band(r0, self_offset, t_end, BM, BN)
    band_lo, band_hi, last, n_inner, n_edge = _segments(lo, hi, t_begin, t_end, M // BN)
    a0, a1, a2, a3, n_p, n_n = _fwd_tiles(a0, a1, a2, a3, n_p, n_n, n_inner, t_begin, band_lo, band_hi, last, a_res,
                                          e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, M, D, self_offset,
                                          s_eb, s_ed, s_rb, s_rd, beta, beta2, gamma_pos, gamma_neg, margin, FORM,
                                          SIM, acc_ty, BM, BN, BD, PREC, UPCAST, RESIDENT, False)
    a0, a1, a2, a3, n_p, n_n = _fwd_tiles(a0, a1, a2, a3, n_p, n_n, n_edge, t_begin, band_lo, band_hi, last, a_res,
                                          e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, M, D, self_offset,
                                          s_eb, s_ed, s_rb, s_rd, beta, beta2, gamma_pos, gamma_neg, margin, FORM,
                                          SIM, acc_ty, BM, BN, BD, PREC, UPCAST, RESIDENT, True)
    if FORM != MARGIN and FORM != HINGE:
        a0 = a0 * LN2  # maxima back to natural log units
        a2 = a2 * LN2
    base = part_ptr + (split * B + rows).to(tl.int64) * N_PARTS
    tl.store(base + PT_0, a0, mask=rmask)
    tl.store(base + PT_1, a1, mask=rmask)
    tl.store(base + PT_2, a2, mask=rmask)
    tl.store(base + PT_3, a3, mask=rmask)
    if FORM == MARGIN:
        tl.store(base + PT_4, n_p.to(acc_ty), mask=rmask)
        tl.store(base + PT_5, n_n.to(acc_ty), mask=rmask)


@triton.jit
def _label_positives_kernel(e_ptr, iz_ptr, r_ptr, ir_ptr, lab_ptr, rlab_ptr, beta: tl.float64, inv_beta: tl.float64,
                            gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64, lam: tl.float64, c_ptr,
                            tiles_ptr, excl_ptr, softplus_ptr, sigmoid_ptr, B, M, D, s_eb, s_ed, s_rb, s_rd,
                            SIM: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                            UPCAST: tl.constexpr, RESIDENT: tl.constexpr):
    """InfoNCE's second sweep, Σ⁺ softplus(C - βs) and Σ⁺ σ(C - βs) per row ``[B]``, on rows and
    reference rows sorted by class: a row block meets its positives in the column tiles
    [tiles[b, 0], tiles[b, 1]) only, and ``excl [B]`` names each row's excluded column (-1: none)."""
    acc_ty = iz_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < B
    iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
    excl = tl.load(excl_ptr + rows, mask=rmask, other=-1)
    a_res = _block(e_ptr, rows, rmask, D, s_eb, s_ed, BD, UPCAST) if RESIDENT else None
    sp_sum = tl.zeros((BM,), acc_ty)
    sg_sum = tl.zeros((BM,), acc_ty)
    for t in range(tl.load(tiles_ptr + 2 * pid), tl.load(tiles_ptr + 2 * pid + 1)):
        _, s, cols, cmask, _ = _scores(a_res, None, e_ptr, iz, r_ptr, ir_ptr, rows, rmask, t, M, D, s_eb, s_ed, s_rb,
                                       s_rd, SIM, acc_ty, BM, BN, BD, PREC, UPCAST, RESIDENT)
        rlab = tl.load(rlab_ptr + cols, mask=cmask, other=-1)
        pos = (lab_r[:, None] == rlab[None, :]) & rmask[:, None] & cmask[None, :] & (cols[None, :] != excl[:, None])
        sp, sg = softplus_sigmoid(c[:, None] - beta * s)
        sp_sum += tl.sum(tl.where(pos, sp, 0.0), axis=1)
        sg_sum += tl.sum(tl.where(pos, sg, 0.0), axis=1)
    tl.store(softplus_ptr + rows, sp_sum, mask=rmask)
    tl.store(sigmoid_ptr + rows, sg_sum, mask=rmask)


@triton.jit
def _load_factors(q_ptr, rows, rmask):
    """The rows' (q0, q1, q2, q3) ``[BM]`` of :func:`grad_factors`."""
    base = q_ptr + rows.to(tl.int64) * 4
    return (tl.load(base, mask=rmask, other=0.0), tl.load(base + 1, mask=rmask, other=0.0),
            tl.load(base + 2, mask=rmask, other=0.0), tl.load(base + 3, mask=rmask, other=0.0))


@triton.jit
def _grad_tile(s, pos, neg, q0, q1, q2, q3, beta2, gamma_pos, gamma_neg, margin, FORM: tl.constexpr):
    """G = ∂(Σ_i g_i ℓ_i)/∂cos of one tile from the :func:`grad_factors` of the rows whose losses it
    differentiates, shaped to broadcast over the tile (``[BM, 1]``: the tile's rows; ``[1, BN]``: its columns,
    the transposed tile's rows): one exp2 per entry, of the entry's own side (d1 of side_terms at β·log2e is
    log2e times the natural one: the ln2 is in q)."""
    if FORM == MARGIN:
        gp = tl.where((q0 != q0), float("nan"), tl.where(s == q0, q2, 0.0))
        gn = tl.where((q1 != q1), float("nan"), tl.where(s == q1, q3, 0.0))
    elif FORM == HINGE:
        gp = tl.zeros_like(s) - q0
        gn = tl.zeros_like(s) + q0
    elif FORM == INFONCE:
        v, d1, _ = side_terms(s, WEIGHTED, False, beta2, gamma_pos, gamma_neg, margin)
        ex = tl.exp2(tl.where(pos, beta2 * s, v) - q1)  # positives: σ(C - βs) = 1/(1 + ex)
        gp = -q0 / (1.0 + ex)
        gn = q2 * ex * d1
    else:
        u, du, _ = side_terms(s, FORM, True, beta2, gamma_pos, gamma_neg, margin)
        v, dv, _ = side_terms(s, FORM, False, beta2, gamma_pos, gamma_neg, margin)
        ex = tl.exp2(tl.where(pos, u - q1, v - q2))
        gp = q0 * ex * du
        gn = q0 * ex * dv
    return tl.where(pos, gp, tl.where(neg, gn, 0.0))


@triton.jit
def _pow2(k):
    """2^(k - 127) for integer ``k`` in [1, 254]: a normal fp32 power of two built from its exponent bits."""
    return (k << 23).to(tl.float32, bitcast=True)


@triton.jit
def _grad_dot(G, x, acc, k_run, acc_ty: tl.constexpr, GPREC: tl.constexpr, UPCAST: tl.constexpr):
    """(acc + G·x, k_run) with G in the accumulation dtype and x in the inputs' dtype. GPREC "input": G rounded
    to the inputs' dtype, a tensor-core product in it (fp32 accumulation); otherwise x upcast and the product
    at that tl.dot precision.

    fp16 (bf16 has fp32's exponent range) keeps each row's accumulator at a running scale 2^(k_run - 127),
    a power of two chosen so that the row's largest |G| seen so far lands in [2^14, 2^15) when G is scaled by
    it before the cast: entries keep fp16's 11 bits down to 2^-38 of that largest one. Unscaled, the per-pair
    entries of a large batch (about 1/N², 2.3e-10 at N = 65536) fall below fp16's smallest subnormal and
    become 0, and a row of tiny norm (G holds its inverse norm) overflows. When a tile needs a smaller scale,
    the accumulator is rescaled first, as flash-attention rescales its output; every factor is a power of two
    (exact), and :func:`_unscale` divides the scale out at the end. ``k_run`` starts at 253; other dtypes
    pass it through."""
    if GPREC == "input":
        if x.dtype == tl.float16:
            m = tl.max(tl.abs(G), axis=1).to(tl.float32)
            biased = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF  # 0 for a row of zeros: k stays, product 0
            k = tl.minimum(k_run, tl.minimum(tl.maximum(268 - biased, 1), 253))
            acc = acc * _pow2(tl.maximum(127 + k - k_run, 1))[:, None]
            out = tl.dot((G * _pow2(k)[:, None]).to(x.dtype), x, acc=acc, out_dtype=acc_ty)
            k_run = k
        elif UPCAST:  # the interpreter's bf16 dot is wrong: the same rounded operands, multiplied in fp32
            out = tl.dot(G.to(x.dtype).to(tl.float32), x.to(tl.float32), acc=acc, input_precision="ieee",
                         out_dtype=acc_ty)
        else:
            out = tl.dot(G.to(x.dtype), x, acc=acc, out_dtype=acc_ty)
    else:
        out = tl.dot(G, x.to(acc_ty), acc=acc, input_precision=GPREC, out_dtype=acc_ty)
    return out, k_run


@triton.jit
def _unscale(acc, k_run, x_ty: tl.constexpr, GPREC: tl.constexpr):
    """The accumulator of :func:`_grad_dot` without its running scale."""
    if GPREC == "input":
        if x_ty == tl.float16:
            acc = acc * _pow2(254 - k_run)[:, None]
    return acc


@triton.jit
def _row_band(r0, self_offset, none, BM: tl.constexpr, BN: tl.constexpr):
    """[lo, hi): the column tiles that rows r0 .. r0 + BM - 1 reach as their excluded pairs j = i + self_offset
    (lo = hi = ``none`` without them), the band of :func:`_segments` in a loop over column tiles."""
    lo = tl.where(self_offset >= 0, (r0 + self_offset) // BN, none)
    hi = tl.where(self_offset >= 0, (r0 + BM - 1 + self_offset) // BN + 1, none)
    return lo, hi


@triton.jit
def _col_band(c0, self_offset, none, BM: tl.constexpr, BN: tl.constexpr):
    """[lo, hi): the row blocks whose rows i pair with columns c0 .. c0 + BN - 1 as j = i + self_offset (lo = hi
    = ``none`` without them). A negative numerator divides toward zero here: the band can only grow by a
    block, never miss one."""
    lo = tl.where(self_offset >= 0, (c0 - self_offset) // BM, none)
    hi = tl.where(self_offset >= 0, (c0 + BN - 1 - self_offset) // BM + 1, none)
    return lo, hi


@triton.jit
def _excluded(rows, cols, self_offset):
    """``[BM, BN]``: the tile's excluded pairs j = i + self_offset (none when self_offset < 0)."""
    return (self_offset >= 0) & (cols[None, :] == rows[:, None] + self_offset)


@triton.jit
def _segments(lo, hi, t_begin, t_end, full):
    """How a loop over tiles [t_begin, t_end) splits into interior tiles and EDGE ones, for :func:`_interior`
    and :func:`_edge`: (band_lo, band_hi, last, n_inner, n_edge). The band [lo, hi) holds the tiles that
    cross the excluded pairs (lo = hi: none); tiles from ``full`` on are ragged (past the last full one)."""
    band_lo = tl.minimum(tl.maximum(lo, t_begin), t_end)
    band_hi = tl.minimum(tl.maximum(hi, t_begin), t_end)
    last = tl.maximum(full, t_begin)
    last = tl.where((last >= t_end) | ((band_lo <= last) & (last < band_hi)), t_end, last)
    f = tl.maximum(tl.minimum(t_end, full), t_begin)
    n_inner = (f - t_begin) - (tl.minimum(band_hi, f) - tl.minimum(band_lo, f))
    n_edge = (band_hi - band_lo) + (last < t_end).to(tl.int32)
    return band_lo, band_hi, last, n_inner, n_edge


@triton.jit
def _rows_tiles(acc, k_run, n_tiles, t_begin, band_lo, band_hi, last, qc_ptr, q0, q1, q2, q3, a_res, e_ptr, iz, r_ptr,
                ir_ptr, lab_r, rlab_ptr, rows, rmask, dchunk, M, D, self_offset, s_eb, s_ed, s_rb, s_rd, beta2,
                gamma_pos, gamma_neg, margin, FORM: tl.constexpr, SIM: tl.constexpr, acc_ty: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
                UPCAST: tl.constexpr, RESIDENT: tl.constexpr, TWO_WAY: tl.constexpr, EDGE: tl.constexpr,
                ONCE: tl.constexpr):
    """(acc + Σ_t (G·ir)·r[:, chunk], k_run) over ``n_tiles`` column tiles of the row block, interior or EDGE
    ones (``k_run``: :func:`_grad_dot`'s scale); TWO_WAY: H = G + the columns' own G at the same scores, from
    their factors ``qc`` (see the row kernel). ONCE (resident rows, one chunk of features): each column
    block is loaded once and feeds both the score product and the gradient product."""
    for k in range(0, n_tiles):
        t = _nth_tile(k, t_begin, band_lo, band_hi, last, EDGE)
        cols = t * BN + tl.arange(0, BN)
        if ONCE:
            r = _block(r_ptr, cols, cols < M, D, s_rb, s_rd, BD, False)
            b = _upcast(r, UPCAST)
        else:
            b = None
        _, s, pos, neg, ir = _tile(a_res, b, e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, t, M, D,
                                   self_offset, s_eb, s_ed, s_rb, s_rd, SIM, acc_ty, BM, BN, BD, PREC, UPCAST,
                                   RESIDENT, EDGE)
        if TWO_WAY:  # H = G + G': the columns' own losses at the same scores
            c0, c1, c2, c3 = _load_factors(qc_ptr, cols, cols < M)
            if FORM == HINGE:  # G is ±q0, linear in the factor: one tile of the summed factors
                G = _grad_tile(s, pos, neg, q0[:, None] + c0[None, :], q1[:, None], q2[:, None], q3[:, None], beta2,
                               gamma_pos, gamma_neg, margin, FORM)
            else:
                G = _grad_tile(s, pos, neg, q0[:, None], q1[:, None], q2[:, None], q3[:, None], beta2, gamma_pos,
                               gamma_neg, margin, FORM)
                G += _grad_tile(s, pos, neg, c0[None, :], c1[None, :], c2[None, :], c3[None, :], beta2, gamma_pos,
                                gamma_neg, margin, FORM)
        else:
            G = _grad_tile(s, pos, neg, q0[:, None], q1[:, None], q2[:, None], q3[:, None], beta2, gamma_pos,
                           gamma_neg, margin, FORM)
        Gr = G * ir[None, :]
        if not ONCE:
            r = tl.load(r_ptr + cols[:, None].to(tl.int64) * s_rb + dchunk[None, :].to(tl.int64) * s_rd,
                        mask=(cols[:, None] < M) & (dchunk[None, :] < D), other=0.0)
        acc, k_run = _grad_dot(Gr, r, acc, k_run, acc_ty, GPREC, UPCAST)
    return acc, k_run


@triton.jit
def _label_bwd_rows_kernel(q_ptr, qc_ptr, e_ptr, iz_ptr, r_ptr, ir_ptr, lab_ptr, rlab_ptr, beta: tl.float64,
                           inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                           lam: tl.float64, de_ptr, diz_ptr, B, M, D, self_offset, tiles_per_split, s_eb, s_ed, s_rb,
                           s_rd, FORM: tl.constexpr, SIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
                           UPCAST: tl.constexpr, RESIDENT: tl.constexpr, TWO_WAY: tl.constexpr):
    """∂e for a row block and one chunk of BDO features over the column tiles of split program_id(2), and
    that chunk's part of ∂iz: with A = Σ_j G_ij·ir_j·r_j (raw r), ∂e_i = iz_i·A_i and ∂iz_i = Σ_j G_ij·ir_j·P_ij
    = e_i·A_i. Partials ``de [splits, B, D]`` and ``diz [splits·chunks, B]``, summed by the launcher.

    TWO_WAY: the columns have losses of their own against the rows, at the same scores (S' = Sᵀ for the
    similarities here), with factors ``qc [M, 4]``; the rows' gradient takes H = G + G' in place of G, G'_ij
    the gradient of column j's loss at S_ij. Self mode (the rows are the reference set, self_offset 0,
    qc = q): H = G + Gᵀ is the whole gradient of e (A = Σ_j H_ij·iz_j·e_j), and no column kernel runs: one
    recompute and one product instead of two each. Cross mode (the rows of e against r and of r against e,
    :func:`label_cross_grads`): the column kernel takes the same H. Not for margins, whose ties need the
    forward's own tile orientation. Every tile, not only those on and
    above the diagonal as the C++ and CUDA backends take: there, a tile's transposed half belongs to another
    program's rows, and without atomics it would travel as a BN×D partial per tile pair, O(N²·D/BN) bytes
    (17 GB at N = 65536, BN = 64), more than the recompute it saves; the exp2 per entry and side, the
    epilogue's scarcest unit, is needed either way."""
    acc_ty = iz_ptr.dtype.element_ty
    beta2 = tl.full((), beta * LOG2E, acc_ty)
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    r0 = tl.program_id(0) * BM
    rows = r0 + tl.arange(0, BM)
    rmask = rows < B
    dchunk = tl.program_id(1) * BDO + tl.arange(0, BDO)
    split = tl.program_id(2)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(M, BN))
    iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    q0, q1, q2, q3 = _load_factors(q_ptr, rows, rmask)
    acc = tl.zeros((BM, BDO), acc_ty)
    a_res = _block(e_ptr, rows, rmask, D, s_eb, s_ed, BD, UPCAST) if RESIDENT else None
    lo, hi = _row_band(r0, self_offset, t_end, BM, BN)
    band_lo, band_hi, last, n_inner, n_edge = _segments(lo, hi, t_begin, t_end, M // BN)
    k_run = tl.full((BM,), 253, tl.int32)
    acc, k_run = _rows_tiles(acc, k_run, n_inner, t_begin, band_lo, band_hi, last, qc_ptr, q0, q1, q2, q3, a_res, e_ptr,
                             iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, dchunk, M, D, self_offset, s_eb, s_ed,
                             s_rb, s_rd, beta2, gamma_pos, gamma_neg, margin, FORM, SIM, acc_ty, BM, BN, BD, PREC,
                             GPREC, UPCAST, RESIDENT, TWO_WAY, False, RESIDENT and BDO == BD)
    acc, k_run = _rows_tiles(acc, k_run, n_edge, t_begin, band_lo, band_hi, last, qc_ptr, q0, q1, q2, q3, a_res, e_ptr,
                             iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, dchunk, M, D, self_offset, s_eb, s_ed,
                             s_rb, s_rd, beta2, gamma_pos, gamma_neg, margin, FORM, SIM, acc_ty, BM, BN, BD, PREC,
                             GPREC, UPCAST, RESIDENT, TWO_WAY, True, RESIDENT and BDO == BD)
    acc = _unscale(acc, k_run, e_ptr.dtype.element_ty, GPREC)
    inside = rmask[:, None] & (dchunk[None, :] < D)
    e = tl.load(e_ptr + rows[:, None].to(tl.int64) * s_eb + dchunk[None, :].to(tl.int64) * s_ed, mask=inside,
                other=0.0).to(acc_ty)
    tl.store(diz_ptr + (split * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * B + rows,
             tl.sum(acc * e, axis=1), mask=rmask)
    out = split.to(tl.int64) * B + rows
    tl.store(de_ptr + out[:, None] * D + dchunk[None, :], acc * iz[:, None], mask=inside)


@triton.jit
def _cols_tiles(acc, k_run, n_blocks, b_begin, band_lo, band_hi, last, b_res, e_ptr, iz_ptr, r_ptr, ir_ptr, lab_ptr,
                rlab_ptr, q_ptr, f0, f1, f2, f3, t, B, M, D, dchunk, self_offset, s_eb, s_ed, s_rb, s_rd, beta2,
                gamma_pos, gamma_neg, margin, FORM: tl.constexpr, SIM: tl.constexpr, acc_ty: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
                UPCAST: tl.constexpr, RESIDENT: tl.constexpr, TWO_WAY: tl.constexpr, EDGE: tl.constexpr,
                ONCE: tl.constexpr):
    """(acc + Σ_b (G·iz)ᵀ·e[:, chunk], k_run) over ``n_blocks`` row blocks of the column block, interior or
    EDGE ones; TWO_WAY: H = G + G' in place of G, G' from the columns' factors (f0, f1, f2, f3) ``[BN]``.
    ONCE: each row block is loaded once for both products (see :func:`_rows_tiles`)."""
    for k in range(0, n_blocks):
        rb = _nth_tile(k, b_begin, band_lo, band_hi, last, EDGE)
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B
        iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
        lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
        q0, q1, q2, q3 = _load_factors(q_ptr, rows, rmask)
        if ONCE:
            e = _block(e_ptr, rows, rmask, D, s_eb, s_ed, BD, False)
            a = _upcast(e, UPCAST)
        else:
            a = None
        _, s, pos, neg, _ = _tile(a, b_res, e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, t, M, D,
                                  self_offset, s_eb, s_ed, s_rb, s_rd, SIM, acc_ty, BM, BN, BD, PREC, UPCAST,
                                  RESIDENT, EDGE)
        G = _grad_tile(s, pos, neg, q0[:, None], q1[:, None], q2[:, None], q3[:, None], beta2, gamma_pos, gamma_neg,
                       margin, FORM)
        if TWO_WAY:
            G += _grad_tile(s, pos, neg, f0[None, :], f1[None, :], f2[None, :], f3[None, :], beta2, gamma_pos,
                            gamma_neg, margin, FORM)
        Gz = G * iz[:, None]
        if not ONCE:
            e = tl.load(e_ptr + rows[:, None].to(tl.int64) * s_eb + dchunk[None, :].to(tl.int64) * s_ed,
                        mask=rmask[:, None] & (dchunk[None, :] < D), other=0.0)
        acc, k_run = _grad_dot(tl.trans(Gz), e, acc, k_run, acc_ty, GPREC, UPCAST)
    return acc, k_run


@triton.jit
def _label_bwd_cols_kernel(q_ptr, qc_ptr, e_ptr, iz_ptr, r_ptr, ir_ptr, lab_ptr, rlab_ptr, beta: tl.float64,
                           inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                           lam: tl.float64, dr_ptr, dir_ptr, B, M, D, self_offset, s_eb, s_ed, s_rb, s_rd,
                           FORM: tl.constexpr, SIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
                           UPCAST: tl.constexpr, RESIDENT: tl.constexpr, TWO_WAY: tl.constexpr):
    """∂r for a column block and one chunk of BDO features over every row block, and that chunk's part of
    ∂ir (``dir [chunks, M]``), as the row kernel does by rows; TWO_WAY: with the row kernel's H (cross mode).
    The tiles are the forward's (same blocks, same order of the D loop), so ties of the margin statistics are
    recognized exactly."""
    acc_ty = iz_ptr.dtype.element_ty
    beta2 = tl.full((), beta * LOG2E, acc_ty)
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    t = tl.program_id(0)
    c0 = t * BN
    cols = c0 + tl.arange(0, BN)
    cmask = cols < M
    dchunk = tl.program_id(1) * BDO + tl.arange(0, BDO)
    acc = tl.zeros((BN, BDO), acc_ty)
    b_res = _block(r_ptr, cols, cmask, D, s_rb, s_rd, BD, UPCAST) if RESIDENT else None
    if TWO_WAY:
        f0, f1, f2, f3 = _load_factors(qc_ptr, cols, cmask)
    else:  # qc may have fewer rows than there are columns: not read
        f0 = tl.zeros((BN,), acc_ty)
        f1, f2, f3 = f0, f0, f0
    blocks = tl.cdiv(B, BM)
    lo, hi = _col_band(c0, self_offset, blocks, BM, BN)
    band_lo, band_hi, last, n_inner, n_edge = _segments(lo, hi, 0, blocks, B // BM)
    k_run = tl.full((BN,), 253, tl.int32)
    acc, k_run = _cols_tiles(acc, k_run, n_inner, 0, band_lo, band_hi, last, b_res, e_ptr, iz_ptr, r_ptr, ir_ptr,
                             lab_ptr, rlab_ptr, q_ptr, f0, f1, f2, f3, t, B, M, D, dchunk, self_offset, s_eb, s_ed,
                             s_rb, s_rd, beta2, gamma_pos, gamma_neg, margin, FORM, SIM, acc_ty, BM, BN, BD, PREC,
                             GPREC, UPCAST, RESIDENT, TWO_WAY, False, RESIDENT and BDO == BD)
    acc, k_run = _cols_tiles(acc, k_run, n_edge, 0, band_lo, band_hi, last, b_res, e_ptr, iz_ptr, r_ptr, ir_ptr,
                             lab_ptr, rlab_ptr, q_ptr, f0, f1, f2, f3, t, B, M, D, dchunk, self_offset, s_eb, s_ed,
                             s_rb, s_rd, beta2, gamma_pos, gamma_neg, margin, FORM, SIM, acc_ty, BM, BN, BD, PREC,
                             GPREC, UPCAST, RESIDENT, TWO_WAY, True, RESIDENT and BDO == BD)
    acc = _unscale(acc, k_run, e_ptr.dtype.element_ty, GPREC)
    inside = cmask[:, None] & (dchunk[None, :] < D)
    r = tl.load(r_ptr + cols[:, None].to(tl.int64) * s_rb + dchunk[None, :].to(tl.int64) * s_rd, mask=inside,
                other=0.0).to(acc_ty)
    tl.store(dir_ptr + tl.program_id(1).to(tl.int64) * M + cols, tl.sum(acc * r, axis=1), mask=cmask)
    ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
    tl.store(dr_ptr + cols[:, None].to(tl.int64) * D + dchunk[None, :], acc * ir[:, None], mask=inside)


# ---------------------------------------------------------------------------------------------- launchers
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Config(NamedTuple):
    """Tiles and dot precisions of the label kernels: BM rows × BN columns per tile, BD features per step
    of the similarity's K loop (RESIDENT: one step, BD >= D, the row block held in registers while the
    columns stream), BDO features per program of the backward's outputs, the dot precisions of the
    similarity (PREC) and of the backward's G products (GPREC: a tl.dot precision, or "input": G rounded to
    the inputs' fp16/bf16 for the tensor cores), UPCAST (bf16 dots in fp32: the interpreter's bf16 dot is
    wrong), and the launch's warps and pipeline stages."""

    BM: int
    BN: int
    BD: int
    BDO: int
    PREC: str
    GPREC: str
    UPCAST: bool
    RESIDENT: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def meta(self) -> dict:
        return self._asdict()

    def forward_meta(self) -> dict:
        """:meth:`meta` less the backward's own fields (BDO, GPREC): what the forward kernels take."""
        return {k: v for k, v in self._asdict().items() if k not in ("BDO", "GPREC")}


_OVERRIDE: dict = {}
# The tile shapes a GPU run times for fp16/bf16 (bench/gpu_kernels.py, through override): every one compiles
# for sm_90 without spilling; the first is bf16's default at D <= 128, the one with the fewest SASS
# instructions per score (tools/gpu_static.py); config() picks the others for fp16 and for D in (128, 256].
CANDIDATES = (dict(BM=128, BN=64, num_warps=8), dict(BM=128, BN=32, num_warps=8), dict(BM=64, BN=64, num_warps=4),
              dict(BM=64, BN=32, num_warps=8))
# The widest embedding whose row block stays resident in registers (RESIDENT: BD = D rounded up to a power of 2).
_RESIDENT_D = 256


@contextlib.contextmanager
def override(**fields):
    """Within the block, every label kernel launch uses these :class:`Config` fields (e.g. ``BM=128,
    num_warps=8``) instead of the defaults: how a GPU run sweeps tile configurations. BM, BN, BD and BDO
    must be powers of two (at least 16 for tl.dot)."""
    unknown = set(fields) - set(Config._fields)
    if unknown:
        raise ValueError(f"unknown label kernel configuration fields {sorted(unknown)}; known: {Config._fields}")
    for name in ("BM", "BN", "BD", "BDO"):
        if name in fields and (fields[name] < 16 or fields[name] & (fields[name] - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {fields[name]}")
    saved = dict(_OVERRIDE)
    _OVERRIDE.update(fields)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def config(e: torch.Tensor, D: int) -> Config:
    """One configuration per (dtype, D), the same for the forward and both backward kernels (the margin
    statistics' ties need bit-identical tiles), with any :func:`override` applied. On a GPU: the largest
    tiles whose kernels compile for sm_90 without spilling registers (``make check-triton`` checks it; 64×64
    tiles with 4 warps spilled 0.4-4.5 KiB per thread). Small blocks under the interpreter, which runs them
    on the CPU."""
    half = e.dtype in (torch.float16, torch.bfloat16)
    prec = "tf32" if half else "ieee"  # fp16/bf16 dots ignore it; fp32 must not silently become TF32
    upcast = e.dtype == torch.bfloat16 and interpreting()
    resident = D <= _RESIDENT_D
    bd = max(16, triton.next_power_of_2(D)) if resident else 64
    if interpreting():  # the GPU's precisions, G rounded to half inputs included (bf16 through UPCAST)
        cfg = Config(16, 16, bd, bd, "ieee", "input" if half else "ieee", upcast, resident)
    elif half:
        # D in (128, 256]: a resident row block and a [BM, D] accumulator; 128-row blocks spill there (76-172
        # bytes per thread), 64 × 32 tiles do not (fp16, whose per-row scaling of G in _grad_dot needs
        # registers, with its outputs in two chunks of 128 features: 64 bytes spilled under Triton 3.6
        # otherwise). At D <= 128 fp16 takes the narrower of the 128-row tiles for the same reason.
        # D > 256 (CLIP's 512, 768, 1024): the scores in 64-feature steps, recomputed once per 256 output
        # features (twice at D = 512, where 64-feature outputs recomputed them 8 times); 64 × 32 tiles hold
        # the [64, 256] accumulator without spilling (137-202 registers at D = 512).
        wide = 128 < D <= _RESIDENT_D
        fp16 = e.dtype == torch.float16
        tiles = CANDIDATES[3] if wide or not resident else CANDIDATES[1] if fp16 else CANDIDATES[0]
        if wide and fp16:  # its column kernel's [BN, 256] accumulator sat at 255 registers with 32 (Triton 3.6)
            tiles = dict(tiles, BN=16)
        bdo = 128 if wide and fp16 else bd if resident else 256
        cfg = Config(tiles["BM"], tiles["BN"], bd, bdo, prec, "input", upcast, resident, num_warps=tiles["num_warps"])
    else:  # fp32/fp64 dots run on FMA units from registers: a resident row block of 128 fp32 spills
        cfg = Config(32, 32, 16, 32 if e.dtype == torch.float32 else 16, "ieee", "ieee", False, False)
    cfg = cfg._replace(**_OVERRIDE)
    if cfg.RESIDENT and cfg.BD < D:
        raise ValueError(f"RESIDENT needs BD >= D = {D}, got BD = {cfg.BD}")
    return cfg


def rows_meta(cfg: Config, form: int, two_way: bool = False) -> dict:
    """The backward row kernel's constexprs and launch options. The hinge's G is constant per row and side, so
    its tiles need not match the forward's: it spilled registers with pipelined loads (one stage here), and
    with 128-row blocks (or 64 rows and 4 warps) it sat at the 255-register cap in fp16/bf16; 64 rows and
    8 warps take 169-226. The launcher sizes the grid from these BM and BN."""
    meta = dict(FORM=form, TWO_WAY=two_way, **cfg.meta())
    if form == Form.HINGE:
        meta["num_stages"] = 1
        if cfg.BM >= 64:
            meta.update(BM=64, num_warps=max(cfg.num_warps, 8))
    if two_way and cfg.GPREC == "ieee":
        # fp32/fp64 G products from registers, both directions' factors per entry: at 32 columns and 4 warps
        # fp32 spilled 8 bytes and fp64 took 251 registers (Triton 3.6), fp64 at 16 columns still spilled 8
        # bytes (3.8); 16 columns and 8 warps take 80 and 110-126 under both.
        meta.update(BN=max(16, cfg.BN // 2), num_warps=max(cfg.num_warps, 8))
    return meta


def cols_meta(cfg: Config, form: int, two_way: bool = False) -> dict:
    """The backward column kernel's constexprs and launch options: cross mode's (TWO_WAY), which takes both
    directions' factors and exponentials per entry, gets half as many columns per program. At full width it
    spilled 8 bytes per thread for bf16 at 128×64 with 8 warps (Triton 3.8), and for fp32 at 32×32 with
    feature chunks of 16 (Triton 3.6, the GPU machine's; 3.8 did not)."""
    meta = dict(FORM=form, TWO_WAY=two_way, **cfg.meta())
    if two_way:
        meta["BN"] = max(16, cfg.BN // 2)
    return meta


def _args(e, r):
    return e.stride(0), e.stride(1), r.stride(0), r.stride(1)


def _column_splits(tiles: int, programs: int, cap: int = 1 << 30):
    """(splits, tiles per split): enough programs to fill the device when the other grid axes give few (a
    small batch against a large bank), at most ``cap`` splits."""
    want = 4 if interpreting() else 264
    splits = max(1, min(tiles, want // max(programs, 1), cap))
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split


@op
def label_partials(e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, labels: Tensor, ref_labels: Tensor, form: int,
                   beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float, self_offset: int,
                   similarity: int) -> Tensor:
    """``part [splits, B, 6]`` of the forward sweep (see the module docstring) in the accumulation dtype of
    ``iz``; (form, β, γ⁺, γ⁻, m, λ) as the C++ ops take them; labels int32 class ids."""
    params = (form, beta, gamma_pos, gamma_neg, margin, lam)
    B, D = e.shape
    M = r.shape[0]
    cfg = config(e, D)
    row_blocks, tiles = triton.cdiv(B, cfg.BM), max(triton.cdiv(M, cfg.BN), 1)
    splits, per_split = _column_splits(tiles, row_blocks)
    part = torch.empty(splits, B, int(N_PARTS), dtype=iz.dtype, device=e.device)
    meta = cfg.forward_meta()
    launch(_label_fwd_kernel, (row_blocks, splits), e.device, e, iz, r, ir, labels, ref_labels, *loss_args(params),
           part, B, M, D, self_offset, per_split, *_args(e, r), FORM=form, SIM=similarity, **meta)
    return part


def positive_tiles(labels_sorted: torch.Tensor, ref_sorted: torch.Tensor, BM: int, BN: int) -> torch.Tensor:
    """``[row blocks, 2]`` int32: the column tiles [first, end) where each block of BM class-sorted rows meets
    the class-sorted reference rows of its classes (searchsorted on the device: nothing read back)."""
    B = labels_sorted.shape[0]
    first = labels_sorted[::BM].contiguous()
    last = labels_sorted[torch.clamp(torch.arange(BM - 1, B + BM - 1, BM, device=labels_sorted.device), max=B - 1)]
    lo = torch.searchsorted(ref_sorted, first, right=False)
    hi = torch.searchsorted(ref_sorted, last, right=True)
    return torch.stack([lo // BN, torch.maximum(lo // BN, (hi + BN - 1) // BN)], 1).to(torch.int32).contiguous()


@op
def label_positive_sums(e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, labels: Tensor, ref_labels: Tensor, form: int,
                        beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float, self_offset: int,
                        similarity: int, c: Tensor) -> Tensor:
    """``[2, B]``: (Σ⁺ softplus(C - βs), Σ⁺ σ(C - βs)) per row, InfoNCE's second sweep given each row's
    negative log-sum-exp ``c [B]``, over the tiles that hold positives only: the rows and the reference rows
    are taken in class order (permuted copies, O((B + M)·D)), so each block of rows finds its positives in one
    range of column tiles (:func:`positive_tiles`), a few tiles for single-positive batches instead of all."""
    params = (form, beta, gamma_pos, gamma_neg, margin, lam)
    B, D = e.shape
    M = r.shape[0]
    cfg = config(e, D)
    sums = torch.zeros(2, B, dtype=iz.dtype, device=e.device)
    if B == 0 or M == 0:
        return sums
    order_e, order_r = torch.argsort(labels, stable=True), torch.argsort(ref_labels, stable=True)
    lab_s, rlab_s = labels[order_e].contiguous(), ref_labels[order_r].contiguous()
    excl = torch.full((B,), -1, dtype=torch.int32, device=e.device)
    if self_offset >= 0:  # the excluded pair (i, i + self_offset), in sorted positions
        where_r = torch.empty_like(order_r).scatter_(0, order_r, torch.arange(M, device=e.device))
        excl = where_r[order_e + self_offset].to(torch.int32)
    sorted_sums = torch.empty(2, B, dtype=iz.dtype, device=e.device)
    e_s, r_s = e[order_e], r[order_r]
    meta = cfg.forward_meta()
    launch(_label_positives_kernel, (triton.cdiv(B, cfg.BM),), e.device, e_s, iz[order_e].contiguous(), r_s,
           ir[order_r].contiguous(), lab_s, rlab_s, *loss_args(params), c[order_e].contiguous(),
           positive_tiles(lab_s, rlab_s, cfg.BM, cfg.BN), excl, sorted_sums[0], sorted_sums[1], B, M, D,
           *_args(e_s, r_s), SIM=similarity, **meta)
    sums[:, order_e] = sorted_sums
    return sums


# The most the backward's per-split ∂e partials may take.
_PARTIAL_BYTES = 1 << 28


_LOG2E, _LN2 = LOG2E.value, LN2.value


def grad_factors(stats: torch.Tensor, grad_rows: torch.Tensor, form: int, beta: float, similarity: int):
    """``q [B, 4]`` per row, in the dtype of ``stats``: what the backward kernels need of each row's merged stats
    and incoming gradient g, with ∂s/∂cos folded in and shifts in log2 units like the tiles' exponents.
    Margins: (p_min, n_max, g⁺/ties⁺, g⁻/ties⁻); hinge: (g where active); InfoNCE: (g·β/n⁺, C·log2e,
    g·Σσ/n⁺·ln2); the OUCL forms: (g/β·σ(A + C)·ln2, A·log2e, C·log2e)."""
    slope = 0.5 if similarity == 0 else 1.0
    valid = stats[:, Stat.VALID] != 0
    st = {k: stats[:, k] for k in Stat}
    zero = torch.zeros_like(valid, dtype=stats.dtype)
    g = torch.where(valid[:, None] if form == Form.MARGIN else valid, grad_rows.to(stats.dtype), 0.0)
    if form == Form.MARGIN:
        g_min = g[:, 0] / st[Stat.TIES_POS].clamp(min=1.0)
        g_max = g[:, 1] / st[Stat.TIES_NEG].clamp(min=1.0)
        q = (st[Stat.P_MIN], st[Stat.N_MAX], slope * g_min, slope * g_max)
    elif form == Form.HINGE:
        on = slope * torch.where(st[Stat.HINGE_ARG] > 0, g, zero)
        q = (on, zero, zero, zero)
    elif form == Form.INFONCE:
        coef = slope * g / st[Stat.NCE_N_POS].clamp(min=1.0)
        q = (coef * beta, (st[Stat.NCE_SHIFT] + st[Stat.NCE_LOG_SUM]) * _LOG2E, coef * st[Stat.NCE_SIGMOID_SUM] * _LN2,
             zero)
    else:
        a = st[Stat.POS_SHIFT] + st[Stat.POS_LOG_SUM]
        c = st[Stat.NEG_SHIFT] + st[Stat.NEG_LOG_SUM]
        q = (slope * g / beta * torch.sigmoid(a + c) * _LN2, a * _LOG2E, c * _LOG2E, zero)
    return torch.stack(q, 1).contiguous()


def _reference_parts(form: int, ref_grad: bool, self_mode: bool) -> bool:
    """Whether the backward computes the reference rows' parts (the column kernel): only with ``ref_grad``,
    and in self mode only for the margins (the other forms take the whole gradient in the row kernel)."""
    return ref_grad and not (self_mode and form != Form.MARGIN)


@op
def label_grads(grad_rows: Tensor, stats: Tensor, e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, labels: Tensor,
                ref_labels: Tensor, form: int, beta: float, gamma_pos: float, gamma_neg: float, margin: float,
                lam: float, self_offset: int, similarity: int, ref_grad: bool,
                self_mode: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂e [B, D], ∂iz [B], ∂r [M, D], ∂ir [M]) in the accumulation dtype of ``iz``. The row kernel splits the
    columns when the row blocks are few; partials are summed in split order (deterministic). ``self_mode``
    (r is e, ir is iz, the same labels, self_offset 0): every form but the margins returns the whole gradient
    of e in (∂e, ∂iz) from the row kernel's H = G + Gᵀ. The reference's parts are empty ([0, D], [0]) when
    not computed: without ``ref_grad``, and in self mode but for the margins."""
    params = (form, beta, gamma_pos, gamma_neg, margin, lam)
    q = grad_factors(stats, grad_rows, form, beta, similarity) if e.numel() and r.numel() else None
    return _grads(q, q, e, iz, r, ir, labels, ref_labels, params, self_offset, similarity,
                  self_mode and form != Form.MARGIN, _reference_parts(form, ref_grad, self_mode))


@op
def label_cross_grads(grad_z: Tensor, stats_z: Tensor, grad_r: Tensor, stats_r: Tensor, e: Tensor, iz: Tensor,
                      r: Tensor, ir: Tensor, labels: Tensor, ref_labels: Tensor, form: int, beta: float,
                      gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                      similarity: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cross mode's backward: (∂e [B, D], ∂iz [B], ∂r [M, D], ∂ir [M]) of Σ_i g_i ℓ_i + Σ_j g'_j ℓ'_j, ℓ the
    losses of the rows of e against r (``grad_z``, ``stats_z``) and ℓ' those of the rows of r against e
    (``grad_r``, ``stats_r``), each score S_ij shared by ℓ_i and ℓ'_j. One recompute per kernel for both
    directions: the row and column kernels take H = G + G' (TWO_WAY), where one label-mode backward per
    direction would recompute every tile four times. Not for margins (their ties need each direction's own
    tiles)."""
    if form == Form.MARGIN:
        raise ValueError("label_cross_grads: margin statistics have no cross mode")
    params = (form, beta, gamma_pos, gamma_neg, margin, lam)
    q = qc = None
    if e.numel() and r.numel():
        q = grad_factors(stats_z, grad_z, form, beta, similarity)
        qc = grad_factors(stats_r, grad_r, form, beta, similarity)
    return _grads(q, qc, e, iz, r, ir, labels, ref_labels, params, -1, similarity, True, True)


def _grads(q, qc, e, iz, r, ir, labels, ref_labels, params, self_offset: int, similarity: int, two_way: bool,
           columns: bool):
    """The backward kernels' (∂e, ∂iz, ∂r, ∂ir) for the rows' factors ``q`` and the columns' ``qc`` (used when
    ``two_way``); ``columns``: run the column kernel, else the reference's parts are empty."""
    form = params[0]
    B, D = e.shape
    M = r.shape[0]
    cfg = config(e, D)
    acc = iz.dtype
    zeros = lambda *shape: torch.zeros(*shape, dtype=acc, device=e.device)
    if q is None:  # nothing to launch: every gradient is zero
        return zeros(B, D), zeros(B), *((zeros(M, D), zeros(M)) if columns else (zeros(0, D), zeros(0)))
    args = (q, qc, e, iz, r, ir, labels, ref_labels, *loss_args(params))
    meta = rows_meta(cfg, form, two_way)
    d_chunks, row_blocks = triton.cdiv(D, cfg.BDO), triton.cdiv(B, meta["BM"])
    cap = max(1, _PARTIAL_BYTES // (B * D * iz.element_size()))
    splits, per_split = _column_splits(triton.cdiv(M, meta["BN"]), row_blocks * d_chunks, cap)
    de = torch.empty(splits, B, D, dtype=acc, device=e.device)
    diz = torch.empty(splits * d_chunks, B, dtype=acc, device=e.device)
    launch(_label_bwd_rows_kernel, (row_blocks, d_chunks, splits), e.device, *args, de, diz, B, M, D, self_offset,
           per_split, *_args(e, r), SIM=similarity, **meta)
    de, diz = (de[0], diz[0]) if splits * d_chunks == 1 else (de.sum(0), diz.sum(0))
    if not columns:
        return de, diz, zeros(0, D), zeros(0)
    dr = torch.empty(M, D, dtype=acc, device=e.device)
    dir_ = torch.empty(d_chunks, M, dtype=acc, device=e.device)
    meta = cols_meta(cfg, form, two_way)
    launch(_label_bwd_cols_kernel, (max(triton.cdiv(M, meta["BN"]), 1), d_chunks), e.device, *args, dr, dir_, B, M,
           D, self_offset, *_args(e, r), SIM=similarity, **meta)
    return de, diz, dr, dir_.sum(0)


def dense_labels(labels: Tensor, ref_labels: Tensor):
    """(labels [B], ref_labels [M]) as int32 class ids in [0, B + M) (equal ids exactly where the labels are
    equal: the kernels compare one 32-bit word per pair). A sort and a scan: nothing is read back to the host
    (torch.unique would synchronize)."""
    B = labels.shape[0]
    both = torch.cat([labels.long(), ref_labels.long()])
    values, order = torch.sort(both)
    starts = (torch.diff(values, prepend=values[:1]) != 0).to(torch.int32)  # 1 where a new label begins
    ids = torch.empty_like(starts).scatter_(0, order, torch.cumsum(starts, 0, dtype=torch.int32))
    return ids[:B].contiguous(), ids[B:].contiguous()


def _pair_counts(labels: Tensor, ref_labels: Tensor, self_offset: int, acc: torch.dtype):
    """(positives [B], negatives [B]) per row of :func:`dense_labels` ids, from the reference rows of each class:
    a row's positives are those of its class less the excluded pair j = i + self_offset when it shares the
    label (the reference's rule: the excluded pair leaves the positives only), its negatives the others."""
    B, M = labels.shape[0], ref_labels.shape[0]
    counts = torch.zeros(B + M, dtype=torch.int32, device=labels.device)
    counts.scatter_add_(0, ref_labels.long(), torch.ones_like(ref_labels))
    same = counts[labels.long()]
    n_neg = M - same
    if self_offset >= 0 and B:
        same = same - (ref_labels[self_offset:self_offset + B] == labels).to(same.dtype)
    return same.to(acc), n_neg.to(acc)


def _merge_partials(run_max: Tensor, total: Tensor):
    """(shift, log_sum) ``[B]`` from the column splits' running maxima and sums ``[splits, B]``."""
    return merge_lse(run_max.T, torch.log(total.T))


def _merge_extremum(best: Tensor, ties: Tensor, nan: Tensor, minimum: bool):
    """(extremum, ties) ``[B]`` from the column splits' ``[splits, B]``; a NaN in any split makes the row's
    extremum NaN with one tie."""
    value = best.amin(0) if minimum else best.amax(0)
    count = torch.where(best == value, ties, torch.zeros_like(ties)).sum(0)
    has_nan = nan.sum(0) > 0
    nan_value = torch.full_like(value, float("nan"))
    return torch.where(has_nan, nan_value, value), torch.where(has_nan, torch.ones_like(count), count)


def _forward(e, iz, r, ir, labels, ref_labels, params, similarity: int, self_offset: int):
    """(rows [B], stats [B, N_STATS]) in the accumulation dtype, the stats in the C++ ops' layout (margins:
    rows are zeros, the extrema are in the stats). ``labels``, ``ref_labels``: :func:`dense_labels` ids."""
    form = params[0]
    B = e.shape[0]
    stats = torch.zeros(B, N_STATS, dtype=iz.dtype, device=e.device)
    zero = torch.zeros(B, dtype=iz.dtype, device=e.device)
    if B == 0:
        return zero, stats
    part = label_partials(e, iz, r, ir, labels, ref_labels, *params, self_offset, similarity)
    if form == Form.MARGIN:
        p_min, ties_p = _merge_extremum(part[..., Part.P_MIN], part[..., Part.TIES_POS], part[..., Part.NAN_POS], True)
        n_max, ties_n = _merge_extremum(part[..., Part.N_MAX], part[..., Part.TIES_NEG], part[..., Part.NAN_NEG], False)
        return zero, stats_of(p_min=p_min, n_max=n_max, ties_pos=ties_p, ties_neg=ties_n,
                              valid=((ties_p > 0) & (ties_n > 0)).to(p_min))
    n_pos, n_neg = _pair_counts(labels, ref_labels, self_offset, iz.dtype)
    valid = (n_pos > 0) & (n_neg > 0)
    if form == Form.HINGE:
        arg = part[..., Part.NEG_SUM].sum(0) - part[..., Part.POS_SUM].sum(0) + params[5]
        rows = torch.where(torch.isnan(arg) | (arg > 0), arg, zero)
        stats = stats_of(hinge_arg=arg, valid=valid.to(arg))
    elif form == Form.INFONCE:
        c_shift, c_log = _merge_partials(part[..., Part.NEG_MAX], part[..., Part.NEG_SUM])
        softplus_sum, sigmoid_sum = label_positive_sums(e, iz, r, ir, labels, ref_labels, *params, self_offset,
                                                        similarity, (c_shift + c_log).contiguous()).unbind(0)
        rows = softplus_sum / n_pos.clamp(min=1)
        stats = stats_of(nce_shift=c_shift, nce_log_sum=c_log, nce_sigmoid_sum=sigmoid_sum, nce_n_pos=n_pos,
                         valid=valid.to(n_pos))
    else:
        a_shift, a_log = _merge_partials(part[..., Part.POS_MAX], part[..., Part.POS_SUM])
        c_shift, c_log = _merge_partials(part[..., Part.NEG_MAX], part[..., Part.NEG_SUM])
        total = a_shift + a_log + c_shift + c_log
        rows = torch.logaddexp(total, torch.zeros_like(total)) / params[1]
        stats = stats_of(pos_shift=a_shift, pos_log_sum=a_log, neg_shift=c_shift, neg_log_sum=c_log,
                         valid=valid.to(n_pos))
    return torch.where(valid, rows, zero), stats


# The label ops, under the names and schemas of the C++ and CUDA backends' (csrc/op_schemas.h): the one label
# interface every backend implements (metaug_fast/_ops/label.py). Labels are any integers; the kernels take
# them as dense int32 class ids.


@op
def oucl_label_fwd(e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, labels: Tensor, ref_labels: Tensor,
                   self_offset: int, similarity: int, form: int, beta: float, gamma_pos: float, gamma_neg: float,
                   margin: float, lam: float) -> Tuple[Tensor, Tensor]:
    """(rows [B], stats [B, N_STATS]) in the accumulation dtype of ``iz``, as the C++ op."""
    lab, rlab = dense_labels(labels, ref_labels)
    return _forward(e, iz, r, ir, lab, rlab, (form, beta, gamma_pos, gamma_neg, margin, lam), similarity,
                    self_offset)


@op
def oucl_label_bwd(grad_rows: Tensor, e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, labels: Tensor,
                   ref_labels: Tensor, stats: Tensor, self_offset: int, similarity: int, form: int, beta: float,
                   gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                   ref_grad: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂e [B, D], ∂iz [B], ∂r [M, D], ∂ir [M]) in the accumulation dtype of ``iz``, as the C++ op: in self
    mode (e is r, iz is ir, self_offset 0) the whole gradient is in (∂e, ∂iz) and the reference's parts are
    empty, as they are without ``ref_grad``."""
    lab, rlab = dense_labels(labels, ref_labels)
    self_mode = label_self_mode(e, iz, r, ir, self_offset)
    de, diz, dr, dir_ = label_grads(grad_rows, stats, e, iz, r, ir, lab, rlab, form, beta, gamma_pos, gamma_neg,
                                    margin, lam, self_offset, similarity, ref_grad or self_mode, self_mode)
    if self_mode and dr.shape[0]:  # margins: the columns' part is computed apart
        de, diz = de + dr, diz + dir_
    if self_mode or not ref_grad:
        return de, diz, dr.new_zeros(0, e.shape[1]), dir_.new_zeros(0)
    return de, diz, dr, dir_


@op
def oucl_label_cross_fwd(e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, labels: Tensor, ref_labels: Tensor,
                         similarity: int, form: int, beta: float, gamma_pos: float, gamma_neg: float, margin: float,
                         lam: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rows [B], stats [B, N_STATS], rows' [M], stats' [M, N_STATS]): InfoNCE of each row of e against r
    and of each row of r against e, as the C++ op (one label-mode sweep per direction)."""
    if form != Form.INFONCE:
        raise ValueError(f"oucl_label_cross (triton): cross mode runs InfoNCE (form {int(Form.INFONCE)}), got {form}")
    params = (form, beta, gamma_pos, gamma_neg, margin, lam)
    lab, rlab = dense_labels(labels, ref_labels)
    return (*_forward(e, iz, r, ir, lab, rlab, params, similarity, -1),
            *_forward(r, ir, e, iz, rlab, lab, params, similarity, -1))


@op
def oucl_label_cross_bwd(grad_z: Tensor, grad_r: Tensor, e: Tensor, iz: Tensor, r: Tensor, ir: Tensor,
                         labels: Tensor, ref_labels: Tensor, stats_z: Tensor, stats_r: Tensor, similarity: int,
                         form: int, beta: float, gamma_pos: float, gamma_neg: float, margin: float,
                         lam: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂e, ∂iz, ∂r, ∂ir) of both directions at once (:func:`label_cross_grads`), as the C++ op."""
    lab, rlab = dense_labels(labels, ref_labels)
    return label_cross_grads(grad_z.contiguous(), stats_z, grad_r.contiguous(), stats_r, e, iz, r, ir, lab, rlab,
                             form, beta, gamma_pos, gamma_neg, margin, lam, similarity)
