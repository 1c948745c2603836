"""The label-mode second derivative in Triton, fused: the Hessian-vector product of the MetAug meta step with
no B×M tensor and no row chunk of scores.

Like every label op it takes the raw rows ``e [B, D]``, ``r [M, D]`` and their inverse norms ``iz``, ``ir``
(the rows the similarity takes are zn = e·iz, rn = r·ir, never formed: a tile scales its raw products by
iz_i·ir_j, so nothing is rounded twice and bf16 rows feed the tensor cores as they are). The backward of
label mode maps (g [B], zn, rn) to A = a·G·rn and B = a·Gᵀ·zn, G = ∂(Σ_i g_i ℓ_i)/∂S on the scores
S = a·zn·rnᵀ + b. Its vector-Jacobian product for cotangents (v_z on A, v_r on B) puts U = v_z·rnᵀ + zn·v_rᵀ
on the scores (U without its factor a, which scales the results instead) and asks, per row, for
d_g = ∂ℓ/∂S·U and W = g·H·U, H the row's Hessian; then ∂zn = a·(G·v_r + a·W·rn), ∂rn = a·(Gᵀ·v_z + a·Wᵀ·zn).
A row's H·U needs sums of U over its whole row, weighted by the row's softmax, before any entry of W: two
rounds, as the C++ CPU kernel takes them (csrc/cpu/label_hvp.h), here over tiles that are recomputed, never
stored:

1. :func:`_hvp_sums_kernel`, a program per block of rows, walks the column tiles, recomputes S and U
   (three ``tl.dot``: e·rᵀ, v_z·rᵀ, e·v_rᵀ) and adds each row's four sums (the OUCL forms: Σ⁺ w·u'·U and
   Σ⁻ w·v'·U, w the side's softmax; InfoNCE: Σ⁻ w·U, Σ⁺ σ·U, Σ⁺ σ', Σ⁺ σ'·U);
2. from those sums and the forward's stats, each row's constants (:func:`_row_lanes`, O(B) torch ops), and
   d_g;
3. :func:`_hvp_out_kernel` recomputes each tile of a row block into G and W and accumulates
   G·v_r + a·(W·ir)·r, and (BY_COLS) does the same by column blocks for Gᵀ·v_z + a·(W·iz)ᵀ·e (only when the
   reference rows need a gradient). Each output row belongs to one program: no atomics, a
   fixed order of summation, deterministic.

One exp per entry and pass (the entry's own side: a softmax weight, or InfoNCE's sigmoid from e^-|x|).
The forms are those with a Hessian (contract.HVP_FORMS); the hinge's is zero and the margins' are piecewise
linear, and _ops/label.py takes them apart. fp32 and fp64 rows take ``tl.dot`` at ``ieee`` precision (no
TF32: its 1e-3 relative error would be the whole tolerance of an fp32 Hessian-vector product); bf16 rows
(the meta step on bf16 embeddings) take every product on the tensor cores with fp32 accumulation, the
cotangents and each tile's G and W rounded to bf16 as operands, as the first-order backward rounds its G;
fp16 rows are taken in fp32 (their per-pair terms, about 1/N², would leave fp16's range).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import HVP_FORMS, Form, Stat
from . import label
from ._common import INFONCE, SQUARED, WEIGHTED, launch, load_cfg, loss_args, mul_rn, op, side_terms
from .label import _col_band, _excluded, _nth_tile, _row_band, _segments

# The rows' dtypes the kernels take: fp32 and fp64, and bf16 (fp32's exponent range: the per-pair terms of a
# large batch, about 1/N², stay normal, where fp16 would need the first-order backward's per-row scaling).
ROW_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# Per-row constants, the columns of ``lanes [B, N_LANES]`` (:func:`_row_lanes`), in this order: each side's
# log-sum-exp K = shift + log-sum of the forward (InfoNCE: Σσ, then the negatives' C), then round 2's coef, c1,
# sa, sb, and valid (1 or 0). The OUCL forms: coef = g/β·σ(y), c1 = coef·σ(-y)·(sa + sb), y the row's
# pre-softplus argument, sa and sb round 1's two sums. InfoNCE: coef = g/n⁺, c1 = g·β²/n⁺, sa = Σ⁻ w·U,
# sb = Σ⁻ w·U·Σσ' - Σσ'·U - Σσ·Σ⁻ w·U (csrc/cpu/label_hvp.h's HvpLanes, whose notation this follows). A weight
# is exp(e - K) with K rounded once: its error, about ulp(β), is far inside the second derivative's
# tolerance, and a column's lanes take two registers fewer per entry than the shift and log-sum apart.
N_LANES = tl.constexpr(7)
KP, KN, COEF, C1, SA, SB, VALID = (tl.constexpr(k) for k in range(7))


@triton.jit
def _lane(lanes_ptr, rows, rmask, k: tl.constexpr):
    """Lane ``k`` of the rows, ``[BM]``."""
    return tl.load(lanes_ptr + rows.to(tl.int64) * N_LANES + k, mask=rmask, other=0.0)


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b, ``a`` and ``b`` in the rows' dtype (bf16: tensor cores with fp32 accumulation; fp32 and fp64
    at PREC "ieee"); UPCAST: bf16 operands multiplied in fp32 (the interpreter's bf16 dot is wrong), the
    same rounded values."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc=acc, input_precision=PREC, out_dtype=acc.dtype)


@triton.jit
def _rows_of(ptr, idx, imask, d, D, MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows ``idx`` of a contiguous ``[n, D]`` operand at the features ``d``, masked by ``imask`` where MASK and
    by D unless EVEN_D (D a multiple of the chunk): an interior tile's loads carry no predicate."""
    at = ptr + idx[:, None].to(tl.int64) * D + d[None, :]
    if MASK:
        if EVEN_D:
            return tl.load(at, mask=imask[:, None], other=0.0)
        return tl.load(at, mask=imask[:, None] & (d[None, :] < D), other=0.0)
    if EVEN_D:
        return tl.load(at)
    return tl.load(at, mask=d[None, :] < D, other=0.0)


@triton.jit
def _tile(e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, rows, rmask, cols, cmask, D, a, b, acc_ty: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, WITH_R: tl.constexpr, PREC: tl.constexpr,
          UPCAST: tl.constexpr, MASK_R: tl.constexpr, MASK_C: tl.constexpr, EVEN_D: tl.constexpr):
    """(S, U, iz [BM], ir [BN]) of the tile ``[BM, BN]`` in the accumulation dtype, from the raw products e·rᵀ,
    v_z·rᵀ and (WITH_R) e·v_rᵀ over the features in chunks of BD: S = (a·iz_i)·ir_j·(e·rᵀ) + b (the similarity
    d = a·cos + b; a is 1 or 1/2, exact in iz),
    U = ir_j·(v_z·rᵀ) + iz_i·(e·v_rᵀ). Rows and cotangents are contiguous [n, D] in the rows' dtype; the rows
    and columns are masked by ``rmask`` and ``cmask`` where MASK_R and MASK_C (a full block needs none)."""
    p = tl.zeros((BM, BN), acc_ty)
    u = tl.zeros((BM, BN), acc_ty)
    w = tl.zeros((BM, BN), acc_ty)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        e = _rows_of(e_ptr, rows, rmask, d, D, MASK_R, EVEN_D)
        vz = _rows_of(vz_ptr, rows, rmask, d, D, MASK_R, EVEN_D)
        r = _rows_of(r_ptr, cols, cmask, d, D, MASK_C, EVEN_D)
        p = _mm(e, tl.trans(r), p, PREC, UPCAST)
        u = _mm(vz, tl.trans(r), u, PREC, UPCAST)
        if WITH_R:
            vr = _rows_of(vr_ptr, cols, cmask, d, D, MASK_C, EVEN_D)
            w = _mm(e, tl.trans(vr), w, PREC, UPCAST)
    iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
    ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
    u = u * ir[None, :]
    if WITH_R:
        u += w * iz[:, None]
    return p * (a * iz)[:, None] * ir[None, :] + b, u, iz, ir


@triton.jit
def _pairs(lab_ptr, rlab_ptr, rows, rmask, cols, cmask, self_offset, EDGE: tl.constexpr):
    """(positive, negative) masks of the tile: the labels decide, and the excluded pair j = i + self_offset is
    never a positive (still a negative when the labels differ, as reference.py). Only an EDGE tile (ragged, or
    crossing the excluded pairs) pays for the bounds and the exclusion: elsewhere every pair is one or the
    other by its labels alone (the rows or columns of a ragged block of the program's own are computed and
    never stored)."""
    lab = tl.load(lab_ptr + rows, mask=rmask, other=0)
    rlab = tl.load(rlab_ptr + cols, mask=cmask, other=0)
    same = lab[:, None] == rlab[None, :]
    if EDGE:
        inside = rmask[:, None] & cmask[None, :]
        return same & inside & (_excluded(rows, cols, self_offset) == 0), (same == 0) & inside
    return same, same == 0


@triton.jit
def _sig_pair(x):
    """(σ(x), σ(-x)) from one exp of -|x|, neither formed as 1 - the other (no cancellation)."""
    t = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + t)
    small = t / (1.0 + t)
    return tl.where(x >= 0, big, small), tl.where(x >= 0, small, big)


@triton.jit
def _lanes(lanes_ptr, rows, rmask):
    """The lanes of a tile's ``rows`` that its entries take, broadcast over it ``[BM, 1]``: (KP, KN, COEF, C1,
    SA, SB)."""
    return (_lane(lanes_ptr, rows, rmask, KP)[:, None], _lane(lanes_ptr, rows, rmask, KN)[:, None],
            _lane(lanes_ptr, rows, rmask, COEF)[:, None], _lane(lanes_ptr, rows, rmask, C1)[:, None],
            _lane(lanes_ptr, rows, rmask, SA)[:, None], _lane(lanes_ptr, rows, rmask, SB)[:, None])


@triton.jit
def _weights(s, pos, neg, kp, kn, beta, gamma_pos, gamma_neg, margin, FORM: tl.constexpr):
    """Per entry of the scores ``s``, with an anchor's log-sum-exps broadcast over the tile: the OUCL forms'
    (w, d1, d2), w = exp(e - K) the softmax weight of the entry within its side and d1, d2 the side's exponent
    derivatives; InfoNCE's (σ(C - βs), σ(βs - C)) on positives and (w, dv) on negatives, C = kn. One exp per
    entry."""
    if FORM == INFONCE:
        ev, dv, _ = side_terms(s, WEIGHTED, False, beta, gamma_pos, gamma_neg, margin)
        sg, sg_neg = _sig_pair(kn - beta * s)
        w = tl.exp(ev - kn)
        return sg, sg_neg, w, dv
    u, du, d2u = side_terms(s, FORM, True, beta, gamma_pos, gamma_neg, margin)
    v, dv, d2v = side_terms(s, FORM, False, beta, gamma_pos, gamma_neg, margin)
    w = tl.exp(tl.where(pos, u - kp, v - kn))
    return w, tl.where(pos, du, dv), tl.where(pos, d2u, d2v), w


@triton.jit
def _consts(beta, inv_beta, gamma_pos, gamma_neg, margin, lam, sim_a, sim_b, acc_ty: tl.constexpr):
    """(β, γ⁺, γ⁻, m, a, b) in the accumulation dtype: the loss's and the similarity's (d = a·cos + b)."""
    beta, _, gamma_pos, gamma_neg, margin, _ = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam, acc_ty)
    return beta, gamma_pos, gamma_neg, margin, tl.full((), sim_a, acc_ty), tl.full((), sim_b, acc_ty)


@triton.jit
def _sums_tiles(s0, s1, s2, s3, n_tiles, band_lo, band_hi, last, e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr,
                lab_ptr, rlab_ptr, rows, rmask, kp, kn, M, D, self_offset, a, b, beta, gamma_pos, gamma_neg,
                margin, acc_ty: tl.constexpr, FORM: tl.constexpr, WITH_R: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
                SPLIT: tl.constexpr, EDGE: tl.constexpr):
    """Round 1's sums of the row block over ``n_tiles`` column tiles, interior or EDGE ones (label._segments)."""
    for k in range(0, n_tiles):
        cols = _which_tile(k, band_lo, band_hi, last, EDGE, SPLIT) * BN + tl.arange(0, BN)
        cmask = cols < M
        s, t, _, _ = _tile(e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, rows, rmask, cols, cmask, D, a, b, acc_ty,
                           BM, BN, BD, WITH_R, PREC, UPCAST, True, EDGE, EVEN_D)
        pos, neg = _pairs(lab_ptr, rlab_ptr, rows, rmask, cols, cmask, self_offset, EDGE)
        if FORM == INFONCE:
            sg, sg_neg, w, _ = _weights(s, pos, neg, kp, kn, beta, gamma_pos, gamma_neg, margin, FORM)
            ds = sg * sg_neg
            s0 += tl.sum(tl.where(neg, w * t, 0.0), axis=1)
            s1 += tl.sum(tl.where(pos, sg * t, 0.0), axis=1)
            s2 += tl.sum(tl.where(pos, ds, 0.0), axis=1)
            s3 += tl.sum(tl.where(pos, ds * t, 0.0), axis=1)
        else:
            w, d1, _, _ = _weights(s, pos, neg, kp, kn, beta, gamma_pos, gamma_neg, margin, FORM)
            wd = mul_rn(w * d1, t)  # rounded as round 2's d1·t, with which it cancels (see _side)
            s0 += tl.sum(tl.where(pos, wd, 0.0), axis=1)
            s1 += tl.sum(tl.where(neg, wd, 0.0), axis=1)
    return s0, s1, s2, s3


@triton.jit
def _hvp_sums_kernel(e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, lab_ptr, rlab_ptr, lanes_ptr, beta: tl.float64,
                     inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                     lam: tl.float64, sums_ptr, B, M, D, self_offset, sim_a: tl.float64, sim_b: tl.float64,
                     FORM: tl.constexpr, WITH_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
                     SPLIT: tl.constexpr):
    """Round 1: ``sums [B, 4]`` of each row over every column tile (zero for invalid rows)."""
    acc_ty = lanes_ptr.dtype.element_ty
    beta, gamma_pos, gamma_neg, margin, a, b = _consts(beta, inv_beta, gamma_pos, gamma_neg, margin, lam, sim_a,
                                                       sim_b, acc_ty)
    r0 = tl.program_id(0) * BM
    rows = r0 + tl.arange(0, BM)
    rmask = rows < B
    kp, kn, _, _, _, _ = _lanes(lanes_ptr, rows, rmask)
    s0 = tl.zeros((BM,), acc_ty)
    s1 = tl.zeros((BM,), acc_ty)
    s2 = tl.zeros((BM,), acc_ty)
    s3 = tl.zeros((BM,), acc_ty)
    band_lo, band_hi, last, n_inner, n_edge = _row_segments(r0, M, self_offset, BM, BN, SPLIT)
    if SPLIT:
        s0, s1, s2, s3 = _sums_tiles(s0, s1, s2, s3, n_inner, band_lo, band_hi, last, e_ptr, iz_ptr, r_ptr, ir_ptr,
                                     vz_ptr, vr_ptr, lab_ptr, rlab_ptr, rows, rmask, kp, kn, M, D, self_offset, a, b,
                                     beta, gamma_pos, gamma_neg, margin, acc_ty, FORM, WITH_R, BM, BN, BD, PREC,
                                     UPCAST, EVEN_D, SPLIT, False)
    s0, s1, s2, s3 = _sums_tiles(s0, s1, s2, s3, n_edge, band_lo, band_hi, last, e_ptr, iz_ptr, r_ptr, ir_ptr,
                                 vz_ptr, vr_ptr, lab_ptr, rlab_ptr, rows, rmask, kp, kn, M, D, self_offset, a,
                                 b, beta, gamma_pos, gamma_neg, margin, acc_ty, FORM, WITH_R, BM, BN, BD, PREC, UPCAST,
                                 EVEN_D, SPLIT, True)
    valid = _lane(lanes_ptr, rows, rmask, VALID) != 0
    out = sums_ptr + rows.to(tl.int64) * 4
    tl.store(out, tl.where(valid, s0, 0.0), mask=rmask)
    tl.store(out + 1, tl.where(valid, s1, 0.0), mask=rmask)
    tl.store(out + 2, tl.where(valid, s2, 0.0), mask=rmask)
    tl.store(out + 3, tl.where(valid, s3, 0.0), mask=rmask)


@triton.jit
def _tile_segments(lo, hi, n_tiles, full, SPLIT: tl.constexpr):
    """label._segments of a loop over ``n_tiles`` tiles whose band [lo, hi) crosses the excluded pairs and
    whose tiles from ``full`` on are ragged; without SPLIT every tile is an EDGE one (one loop: the FMA dtypes'
    kernels spill with two)."""
    if SPLIT:
        return _segments(lo, hi, 0, n_tiles, full)
    return 0, n_tiles, n_tiles, 0, n_tiles


@triton.jit
def _which_tile(k, band_lo, band_hi, last, EDGE: tl.constexpr, SPLIT: tl.constexpr):
    """The tile of a loop's k-th step: label._nth_tile of the SPLIT loops, or k itself."""
    if SPLIT:
        return _nth_tile(k, 0, band_lo, band_hi, last, EDGE)
    return k


@triton.jit
def _row_segments(r0, M, self_offset, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    """_tile_segments of a row block's column tiles: the band holds the tiles whose columns pair with these
    rows as j = i + self_offset."""
    n_tiles = tl.cdiv(M, BN)
    lo, hi = _row_band(r0, self_offset, n_tiles, BM, BN)
    return _tile_segments(lo, hi, n_tiles, M // BN, SPLIT)


@triton.jit
def _side(s, t, pos, neg, lanes, beta, gamma_pos, gamma_neg, margin, FORM: tl.constexpr, EDGE: tl.constexpr):
    """(G, W) of the tile's entries from its rows' ``lanes`` (:func:`_lanes`); zero on an invalid row (its
    sides are +∞) and, in an EDGE tile, off the pairs."""
    kp, kn, coef, c1, sa, sb = lanes
    if FORM == INFONCE:
        sg, sg_neg, w, dv = _weights(s, pos, neg, kp, kn, beta, gamma_pos, gamma_neg, margin, FORM)
        sig_sum = kp  # InfoNCE keeps Σσ in lane KP
        g = tl.where(pos, -coef * beta * sg, coef * sig_sum * w * dv)
        h = tl.where(pos, c1 * sg * sg_neg * (t - sa), c1 * w * (sig_sum * t + sb))
    else:
        w, d1, d2, _ = _weights(s, pos, neg, kp, kn, beta, gamma_pos, gamma_neg, margin, FORM)
        g = coef * w * d1
        # d1·t - Σ w·d1·t cancels exactly for a row dominated by one entry only when both products round
        # alike: mul_rn keeps them out of fused multiply-adds (as the score-mode double backward, _common.mul_rn)
        dev = d1 * (mul_rn(d1, t) - tl.where(pos, sa, sb))
        if FORM == SQUARED:  # the only form whose exponents have a second derivative (side_terms)
            dev += d2 * t
        h = w * d1 * c1 + coef * w * dev
    if EDGE:
        keep = pos | neg
        g = tl.where(keep, g, 0.0)
        h = tl.where(keep, h, 0.0)
    return g, h


@triton.jit
def _out_tiles(acc, n_tiles, band_lo, band_hi, last, e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, lab_ptr,
               rlab_ptr, lanes_ptr, own, omask, own_lanes, d, n_other, D, self_offset, a, b, beta, gamma_pos,
               gamma_neg, margin, acc_ty: tl.constexpr, FORM: tl.constexpr, WITH_R: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               EVEN_D: tl.constexpr, SPLIT: tl.constexpr, BY_COLS: tl.constexpr, EDGE: tl.constexpr):
    """Round 2's accumulator of the program's own rows (columns: BY_COLS) over ``n_tiles`` tiles of the other
    side, interior or EDGE ones, each tile's G and W from its rows' lanes."""
    x_ty = e_ptr.dtype.element_ty
    STEP: tl.constexpr = BM if BY_COLS else BN
    for k in range(0, n_tiles):
        other = _which_tile(k, band_lo, band_hi, last, EDGE, SPLIT) * STEP + tl.arange(0, STEP)
        xmask = other < n_other
        if BY_COLS:
            s, t, iz, _ = _tile(e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, other, xmask, own, omask, D, a, b,
                                acc_ty, BM, BN, BD, WITH_R, PREC, UPCAST, EDGE, True, EVEN_D)
            pos, neg = _pairs(lab_ptr, rlab_ptr, other, xmask, own, omask, self_offset, EDGE)
            g, h = _side(s, t, pos, neg, _lanes(lanes_ptr, other, xmask), beta, gamma_pos, gamma_neg, margin,
                         FORM, EDGE)
            e = _rows_of(e_ptr, other, xmask, d, D, EDGE, EVEN_D)
            vz = _rows_of(vz_ptr, other, xmask, d, D, EDGE, EVEN_D)
            acc = _mm(tl.trans((h * (a * iz)[:, None]).to(x_ty)), e, acc, PREC, UPCAST)
            acc = _mm(tl.trans(g.to(x_ty)), vz, acc, PREC, UPCAST)
        else:
            s, t, _, ir = _tile(e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, own, omask, other, xmask, D, a, b,
                                acc_ty, BM, BN, BD, WITH_R, PREC, UPCAST, True, EDGE, EVEN_D)
            pos, neg = _pairs(lab_ptr, rlab_ptr, own, omask, other, xmask, self_offset, EDGE)
            g, h = _side(s, t, pos, neg, own_lanes, beta, gamma_pos, gamma_neg, margin, FORM, EDGE)
            r = _rows_of(r_ptr, other, xmask, d, D, EDGE, EVEN_D)
            acc = _mm((h * (a * ir)[None, :]).to(x_ty), r, acc, PREC, UPCAST)
            if WITH_R:
                vr = _rows_of(vr_ptr, other, xmask, d, D, EDGE, EVEN_D)
                acc = _mm(g.to(x_ty), vr, acc, PREC, UPCAST)
    return acc


@triton.jit
def _hvp_out_kernel(e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, lab_ptr, rlab_ptr, lanes_ptr, beta: tl.float64,
                    inv_beta: tl.float64, gamma_pos: tl.float64, gamma_neg: tl.float64, margin: tl.float64,
                    lam: tl.float64, out_ptr, B, M, D, self_offset, sim_a: tl.float64, sim_b: tl.float64,
                    FORM: tl.constexpr, WITH_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    BDO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
                    SPLIT: tl.constexpr, BY_COLS: tl.constexpr):
    """Round 2 for a block of rows and a chunk of BDO features, ``∂zn [B, D]`` = a·Σ_j (G·v_r + a·(W·ir)·r);
    BY_COLS, for a block of columns, ``∂rn [M, D]`` = a·Σ_i (Gᵀ·v_z + a·(W·iz)ᵀ·e), over the same tiles (each
    recomputed from its row block's lanes). G and W·ir (W·iz) are rounded to the rows' dtype as the products'
    operands."""
    acc_ty = lanes_ptr.dtype.element_ty
    beta, gamma_pos, gamma_neg, margin, a, b = _consts(beta, inv_beta, gamma_pos, gamma_neg, margin, lam, sim_a,
                                                       sim_b, acc_ty)
    OWN: tl.constexpr = BN if BY_COLS else BM
    n_own = M if BY_COLS else B
    o0 = tl.program_id(0) * OWN
    own = o0 + tl.arange(0, OWN)
    omask = own < n_own
    d = tl.program_id(1) * BDO + tl.arange(0, BDO)
    acc = tl.zeros((OWN, BDO), acc_ty)
    if BY_COLS:
        blocks = tl.cdiv(B, BM)
        lo, hi = _col_band(o0, self_offset, blocks, BM, BN)
        band_lo, band_hi, last, n_inner, n_edge = _tile_segments(lo, hi, blocks, B // BM, SPLIT)
        own_lanes = None
        n_other = B
    else:
        band_lo, band_hi, last, n_inner, n_edge = _row_segments(o0, M, self_offset, BM, BN, SPLIT)
        own_lanes = _lanes(lanes_ptr, own, omask)
        n_other = M
    if SPLIT:
        acc = _out_tiles(acc, n_inner, band_lo, band_hi, last, e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, lab_ptr,
                         rlab_ptr, lanes_ptr, own, omask, own_lanes, d, n_other, D, self_offset, a, b, beta, gamma_pos,
                         gamma_neg, margin, acc_ty, FORM, WITH_R, BM, BN, BD, BDO, PREC, UPCAST, EVEN_D, SPLIT, BY_COLS,
                         False)
    acc = _out_tiles(acc, n_edge, band_lo, band_hi, last, e_ptr, iz_ptr, r_ptr, ir_ptr, vz_ptr, vr_ptr, lab_ptr,
                     rlab_ptr, lanes_ptr, own, omask, own_lanes, d, n_other, D, self_offset, a, b, beta, gamma_pos,
                     gamma_neg, margin, acc_ty, FORM, WITH_R, BM, BN, BD, BDO, PREC, UPCAST, EVEN_D, SPLIT, BY_COLS,
                     True)
    dm = d[None, :] < D
    tl.store(out_ptr + own[:, None].to(tl.int64) * D + d[None, :], a * acc, mask=omask[:, None] & dm)


def tiles(dtype: torch.dtype, D: int) -> dict:
    """The kernels' tile shape (BM × BN scores, BD features per step of the score products, BDO output
    features per program: the whole width up to 128, so that a tile is recomputed once per 128 features)
    and warps. bf16 products run on the tensor cores: 64 × 64 tiles in 32-feature steps with 8 warps (4
    warps spilled 52-320 bytes; a resident 64 × 128 row block spilled at 64 × 64 and, at 64 × 32, issued
    1.7× the instructions per score: bench/perf_model.py). fp32 and fp64 products run on FMA units from
    registers, in 16-feature steps: 32 × 32 tiles with 8 warps (16 × 16 in fp64) hold a tile of S, two of
    U's products and the [BM, 128] accumulator without spilling (with 4 warps fp32's row kernel sat at 255
    registers, fp64's spilled; fp64 takes 64 output features per program: at 128, Triton 3.6 sat at 255);
    their sums kernels run 4 warps over narrower tiles (sums_BN columns: ptxas holds fp32's to 168 registers
    at 4 warps and 128 at 8, and 32 × 32 spilled 4-24 bytes in one form or another). ``make check-triton``
    checks every form, under this venv's Triton and the GPU machine's. SPLIT: interior tiles in a loop of
    their own, without masks, and (D a multiple of the chunks) no feature masks either (bf16; the FMA dtypes'
    sums kernels spilled 4-48 bytes with two loops or with unmasked loads). Small blocks under the
    interpreter, with SPLIT."""
    out = min(128, max(16, triton.next_power_of_2(D)))
    if label.interpreting():
        bd = min(64, max(16, triton.next_power_of_2(D)))
        return dict(BM=16, BN=16, BD=bd, BDO=bd, num_warps=4, sums_warps=4, sums_BN=16, SPLIT=True)
    if dtype == torch.bfloat16:
        return dict(BM=64, BN=64, BD=32, BDO=out, num_warps=8, sums_warps=8, sums_BN=64, SPLIT=True)
    if dtype == torch.float64:
        return dict(BM=16, BN=16, BD=16, BDO=min(64, out), num_warps=8, sums_warps=4, sums_BN=8, SPLIT=False)
    return dict(BM=32, BN=32, BD=16, BDO=out, num_warps=8, sums_warps=4, sums_BN=16, SPLIT=False)


def _row_lanes(stats: Tensor, grad_rows: Tensor, sums: Tensor, form: int, beta: float) -> Tuple[Tensor, Tensor]:
    """(lanes [B, N_LANES] of round 2, d_g [B] = ∂ℓ/∂S·U without the slope) from the forward's ``stats``,
    the incoming ``grad_rows`` and round 1's ``sums [B, 4]``; on invalid rows every constant is zero and the
    shifts of the sides +∞."""
    valid = stats[:, Stat.VALID] != 0
    g = torch.where(valid, grad_rows.to(stats.dtype), 0.0)
    zero = torch.zeros_like(g)
    sa, sb, sc, sd = sums.unbind(1)
    if form == Form.INFONCE:
        n_pos = stats[:, Stat.NCE_N_POS].clamp(min=1.0)
        s_sig = stats[:, Stat.NCE_SIGMOID_SUM]
        sides = (s_sig, stats[:, Stat.NCE_SHIFT] + stats[:, Stat.NCE_LOG_SUM])
        consts = (g / n_pos, g * beta * beta / n_pos, sa, sa * sc - sd - s_sig * sa)
        d_g = beta / n_pos * (s_sig * sa - sb)
    else:
        sides = (stats[:, Stat.POS_SHIFT] + stats[:, Stat.POS_LOG_SUM],
                 stats[:, Stat.NEG_SHIFT] + stats[:, Stat.NEG_LOG_SUM])
        y = sides[0] + sides[1]
        coef = g / beta * torch.sigmoid(y)
        consts = (coef, coef * torch.sigmoid(-y) * (sa + sb), sa, sb)
        d_g = torch.sigmoid(y) / beta * (sa + sb)
    # An invalid row's sides are K = +∞: its every weight is exp(-∞) = 0, and its G and W vanish with no
    # select per entry (its constants are zero; InfoNCE's σ(C - βs) is 1 there, times coef = 0).
    inf = torch.full_like(g, float("inf"))
    off = ((zero, inf) if form == Form.INFONCE else (inf, inf)) + (zero,) * 4
    lanes = torch.stack([torch.where(valid, x, o) for x, o in zip((*sides, *consts), off)] + [valid.to(g)], 1)
    return lanes.contiguous(), torch.where(valid, d_g, zero)


@op
def oucl_label_hvp(grad_rows: Tensor, e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, v_z: Tensor, v_r: Tensor,
                   labels: Tensor, ref_labels: Tensor, stats: Tensor, self_offset: int, similarity: int, form: int,
                   beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                   ref_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The label-mode second derivative, fused: (d_g [B], ∂zn [B, D], ∂rn [M, D], or [0, D] without
    ``ref_grad``) in the accumulation dtype of ``iz``, for the raw rows ``e [B, D]``, ``r [M, D]`` (one
    floating dtype; bf16 runs every product on the tensor cores) with their inverse norms ``iz [B]``, ``ir [M]``
    (the label ops' interface: zn = e·iz, rn = r·ir), the cotangents ``v_z [B, D]`` on ∂L/∂zn and ``v_r [M, D]``
    on ∂L/∂rn (``[0, D]``: the reference rows had no gradient), the forward's ``stats [B, N_STATS]`` and
    ``grad_rows [B]``; labels any integers. The similarity's slope is in all three. Forms with a Hessian
    only (contract.HVP_FORMS)."""
    if form not in HVP_FORMS:
        raise ValueError(f"oucl_label_hvp (triton): form {form} has no fused second derivative; "
                         f"forms: {[int(f) for f in HVP_FORMS]}")
    if not (e.is_floating_point() and r.dtype == e.dtype):
        raise TypeError(f"oucl_label_hvp (triton): e and r must be of one floating dtype, got {e.dtype} and {r.dtype}")
    acc = iz.dtype
    B, D = e.shape
    M = r.shape[0]
    with_r = v_r.shape[0] > 0
    d_r = e.new_zeros(M if ref_grad else 0, D, dtype=acc)
    if B == 0 or M == 0 or D == 0:
        return e.new_zeros(B, dtype=acc), e.new_zeros(B, D, dtype=acc), d_r
    rows = e.dtype if e.dtype in ROW_DTYPES else acc
    # The rows and the cotangents in the kernels' dtype: bf16 rounds the cotangents once here, as the tensor
    # cores take them; fp16 rows are taken in fp32 (ROW_DTYPES).
    e, r = e.to(rows).contiguous(), r.to(rows).contiguous()
    v_z = v_z.to(rows).contiguous()
    v_r = v_r.to(rows).contiguous() if with_r else v_z
    lab, rlab = label.dense_labels(labels, ref_labels)
    stats = stats.to(acc)
    t = tiles(rows, D)
    sim_a, sim_b = (0.5, 0.5) if similarity == 0 else (1.0, 0.0)
    args = (e, iz.contiguous(), r, ir.contiguous(), v_z, v_r, lab, rlab)
    half = rows == torch.bfloat16
    tail = dict(FORM=form, WITH_R=with_r, BM=t["BM"], BN=t["BN"], BD=t["BD"], PREC="tf32" if half else "ieee",
                UPCAST=half and label.interpreting(), SPLIT=t["SPLIT"],
                EVEN_D=t["SPLIT"] and D % t["BD"] == 0 and D % t["BDO"] == 0)
    loss = loss_args((form, beta, gamma_pos, gamma_neg, margin, lam))
    blank, _ = _row_lanes(stats, grad_rows, stats.new_zeros(B, 4), form, beta)
    sums = torch.empty(B, 4, dtype=acc, device=e.device)
    launch(_hvp_sums_kernel, (triton.cdiv(B, t["BM"]),), e.device, *args, blank, *loss, sums, B, M, D, self_offset,
           sim_a, sim_b, num_warps=t["sums_warps"], **{**tail, "BN": t["sums_BN"]})
    lanes, d_g = _row_lanes(stats, grad_rows, sums, form, beta)
    d_z = torch.empty(B, D, dtype=acc, device=e.device)
    chunks = triton.cdiv(D, t["BDO"])
    launch(_hvp_out_kernel, (triton.cdiv(B, t["BM"]), chunks), e.device, *args, lanes, *loss, d_z, B, M, D,
           self_offset, sim_a, sim_b, BDO=t["BDO"], BY_COLS=False, num_warps=t["num_warps"], **tail)
    if ref_grad:
        launch(_hvp_out_kernel, (triton.cdiv(M, t["BN"]), chunks), e.device, *args, lanes, *loss, d_r, B, M, D,
               self_offset, sim_a, sim_b, BDO=t["BDO"], BY_COLS=True, num_warps=t["num_warps"], **tail)
    return sim_a * d_g, d_z, d_r
