"""Label-mode OUCL, InfoNCE and margin statistics in Triton, fused with the similarity: no B×M tensor.

Inputs are the raw embeddings ``e [B, D]``, ``r [M, D]`` (fp16/bf16/fp32/fp64) with their inverse norms
``iz [B]``, ``ir [M]`` (1/max(‖x‖, ε), accumulation dtype), so a tile of raw dot products P = e·rᵀ runs
on the tensor cores in the inputs' own dtype and cos = P·iz·ir is exact up to summation order; the
normalization's Jacobian reaches the embeddings through the gradients of iz and ir, which the backward
returns (autograd then differentiates iz = 1/max(‖e‖, ε)).

Forward: grid (row blocks, column splits). A program walks its column tiles, computes S = a·cos + b
(a, b: the similarity's affine map), splits positives and negatives by comparing labels (the pair
j = i + self_offset excluded when self_offset ≥ 0), and keeps per-row running statistics, written as a
partial state ``part [splits, B, 6]`` that :mod:`metaug_fast._ops.label_triton` merges per row:
OUCL forms (max⁺, Σ⁺, max⁻, Σ⁻, n⁺, n⁻) with Σ = Σ exp(e - max) (the online log-sum-exp); hinge
(0, Σs⁺, 0, Σs⁻, n⁺, n⁻); InfoNCE sweep 0 like the OUCL forms on the negatives only, sweep 1 (given C)
(Σ⁺ softplus(C - βs), Σ⁺ σ(C - βs), 0, 0, 0, 0); margins (min⁺, max⁻, ties⁺, ties⁻, NaN⁺, NaN⁻).

Backward: two kernels recompute the tiles into G = ∂(Σ g_i ℓ_i)/∂cos and accumulate, deterministically
(no atomics): per row block ∂e = iz·(G·ir)·r and ∂iz = Σ_j G·P·ir; per column block ∂r = ir·(G·iz)ᵀ·e and
∂ir = Σ_i G·P·iz. A grid axis over chunks of D keeps the accumulators small for wide embeddings.

``tl.dot`` precision is explicit: ``ieee`` for fp32 inputs (no silent TF32), native with fp32
accumulation for fp16/bf16 in the forward, and tf32 for the backward's G products on half inputs (G is
fp32; tf32 keeps 10 mantissa bits where a cast to the inputs' dtype would keep 7).
"""
import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (HINGE, INFONCE, MARGIN, N_PARTS, PT_0, PT_1, PT_2, PT_3, PT_4, PT_5, WEIGHTED, launch, load_cfg,
                      load_stats, loss_args, lse_pair_update, lse_update, side_terms, sigmoid, softplus_sigmoid)


@triton.jit
def _raw_dot(e_ptr, r_ptr, rows, cols, rmask, cmask, D, s_eb, s_ed, s_rb, s_rd, acc_ty: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """P = e[rows]·r[cols]ᵀ, ``[BM, BN]`` in the accumulation dtype."""
    acc = tl.zeros((BM, BN), acc_ty)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        a = tl.load(e_ptr + rows[:, None].to(tl.int64) * s_eb + d[None, :].to(tl.int64) * s_ed,
                    mask=rmask[:, None] & (d[None, :] < D), other=0.0)
        b = tl.load(r_ptr + cols[:, None].to(tl.int64) * s_rb + d[None, :].to(tl.int64) * s_rd,
                    mask=cmask[:, None] & (d[None, :] < D), other=0.0)
        if UPCAST:  # bf16 tl.dot is wrong in the interpreter: it runs in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc=acc, input_precision=PREC, out_dtype=acc_ty)
    return acc


@triton.jit
def _tile(e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, t, M, D, self_offset, s_eb, s_ed, s_rb, s_rd,
          SIM: tl.constexpr, acc_ty: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
          PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One tile: raw dots P, scores s, positive and negative masks, the column indices and ir."""
    cols = t * BN + tl.arange(0, BN)
    cmask = cols < M
    ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
    P = _raw_dot(e_ptr, r_ptr, rows, cols, rmask, cmask, D, s_eb, s_ed, s_rb, s_rd, acc_ty, BM, BN, BD, PREC, UPCAST)
    cos = P * iz[:, None] * ir[None, :]
    if SIM == 0:
        s = 0.5 * cos + 0.5
    else:
        s = cos
    rlab = tl.load(rlab_ptr + cols, mask=cmask, other=0)
    inside = rmask[:, None] & cmask[None, :]
    same = lab_r[:, None] == rlab[None, :]
    excluded = (self_offset >= 0) & (cols[None, :] == rows[:, None] + self_offset)
    pos = same & inside & (excluded == 0)
    neg = (same == 0) & inside
    return P, s, pos, neg, ir


@triton.jit
def _extremum_update(best, ties, nan, s, keep, MIN: tl.constexpr):
    limit = float("inf") if MIN else float("-inf")
    nan += tl.sum((keep & (s != s)).to(tl.int32), axis=1)
    ok = keep & (s == s)
    if MIN:
        new = tl.minimum(best, tl.min(tl.where(ok, s, limit), axis=1))
    else:
        new = tl.maximum(best, tl.max(tl.where(ok, s, limit), axis=1))
    ties = tl.where(best == new, ties, 0.0) + tl.sum((ok & (s == new[:, None])).to(ties.dtype), axis=1)
    return new, ties, nan


@triton.jit
def _label_fwd_kernel(e_ptr, iz_ptr, r_ptr, ir_ptr, lab_ptr, rlab_ptr, beta: tl.float64, inv_beta: tl.float64, gamma_pos: tl.float64,
                      gamma_neg: tl.float64, margin: tl.float64, lam: tl.float64, c_ptr, part_ptr, B, M, D,
                      self_offset, tiles_per_split, s_eb, s_ed, s_rb, s_rd,
                      FORM: tl.constexpr, SWEEP: tl.constexpr, SIM: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    acc_ty = iz_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    split = tl.program_id(1)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < B
    iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(M, BN))
    zero = tl.zeros((BM,), acc_ty)
    if FORM == MARGIN:
        a0 = tl.full((BM,), float("inf"), acc_ty)
        a2 = tl.full((BM,), float("-inf"), acc_ty)
    elif FORM == HINGE or (FORM == INFONCE and SWEEP == 1):
        a0 = zero
        a2 = zero
    else:
        a0 = tl.full((BM,), float("-inf"), acc_ty)
        a2 = tl.full((BM,), float("-inf"), acc_ty)
    a1 = zero
    a3 = zero
    n_p = tl.zeros((BM,), tl.int32)
    n_n = tl.zeros((BM,), tl.int32)
    if SWEEP == 1:
        c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
    for t in range(t_begin, t_end):
        P, s, pos, neg, ir = _tile(e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, t, M, D, self_offset,
                                   s_eb, s_ed, s_rb, s_rd, SIM, acc_ty, BM, BN, BD, PREC, UPCAST)
        if FORM == MARGIN:
            a0, a1, n_p = _extremum_update(a0, a1, n_p, s, pos, True)
            a2, a3, n_n = _extremum_update(a2, a3, n_n, s, neg, False)
        elif FORM == HINGE:
            a1 += tl.sum(tl.where(pos, s, 0.0), axis=1)
            a3 += tl.sum(tl.where(neg, s, 0.0), axis=1)
        elif FORM == INFONCE and SWEEP == 1:
            sp, sg = softplus_sigmoid(c[:, None] - beta * s)
            a0 += tl.sum(tl.where(pos, sp, 0.0), axis=1)
            a1 += tl.sum(tl.where(pos, sg, 0.0), axis=1)
        elif FORM == INFONCE:
            v, _, _ = side_terms(s, WEIGHTED, False, beta, gamma_pos, gamma_neg, margin)
            a2, a3 = lse_update(a2, a3, tl.where(neg, v, float("-inf")))
        else:
            u, _, _ = side_terms(s, FORM, True, beta, gamma_pos, gamma_neg, margin)
            v, _, _ = side_terms(s, FORM, False, beta, gamma_pos, gamma_neg, margin)
            a0, a1, a2, a3 = lse_pair_update(a0, a1, a2, a3, u, v, pos, neg)
        if FORM != MARGIN:
            n_p += tl.sum(pos.to(tl.int32), axis=1)
            n_n += tl.sum(neg.to(tl.int32), axis=1)
    base = part_ptr + (split * B + rows).to(tl.int64) * N_PARTS
    tl.store(base + PT_0, a0, mask=rmask)
    tl.store(base + PT_1, a1, mask=rmask)
    tl.store(base + PT_2, a2, mask=rmask)
    tl.store(base + PT_3, a3, mask=rmask)
    tl.store(base + PT_4, n_p.to(acc_ty), mask=rmask)
    tl.store(base + PT_5, n_n.to(acc_ty), mask=rmask)


@triton.jit
def _grad_tile(s, pos, neg, rows, rmask, g_ptr, stats_ptr, beta, inv_beta, gamma_pos, gamma_neg, margin,
               FORM: tl.constexpr, SIM: tl.constexpr, acc_ty: tl.constexpr):
    """∂(Σ_i g_i ℓ_i)/∂cos for one tile, from the merged per-row stats (the C++ ops' layout)."""
    st0, st1, st2, st3, valid = load_stats(stats_ptr, rows, rmask)
    if FORM == MARGIN:
        g_min = tl.where(valid, tl.load(g_ptr + rows * 2, mask=rmask, other=0.0).to(acc_ty) / tl.maximum(st2, 1.0), 0.0)
        g_max = tl.where(valid, tl.load(g_ptr + rows * 2 + 1, mask=rmask, other=0.0).to(acc_ty) / tl.maximum(st3, 1.0), 0.0)
        gp = tl.where((st0 != st0)[:, None], float("nan"), tl.where(s == st0[:, None], g_min[:, None], 0.0))
        gn = tl.where((st1 != st1)[:, None], float("nan"), tl.where(s == st1[:, None], g_max[:, None], 0.0))
    else:
        g = tl.where(valid, tl.load(g_ptr + rows, mask=rmask, other=0.0).to(acc_ty), 0.0)
        # One exp per entry, of the entry's own side.
        if FORM == HINGE:
            on = tl.where(st0 > 0, g, 0.0)
            gp = tl.zeros_like(s) - on[:, None]
            gn = tl.zeros_like(s) + on[:, None]
        elif FORM == INFONCE:
            coef = g / tl.maximum(st3, 1.0)
            c = (st0 + st1)[:, None]
            v, d1, _ = side_terms(s, WEIGHTED, False, beta, gamma_pos, gamma_neg, margin)
            ex = tl.exp(tl.where(pos, beta * s - c, v - c))  # positives: σ(C - βs) = 1/(1 + ex)
            gp = -coef[:, None] * beta / (1.0 + ex)
            gn = (coef * st2)[:, None] * ex * d1
        else:
            coef = g * inv_beta * sigmoid(st0 + st1 + st2 + st3)
            u, du, _ = side_terms(s, FORM, True, beta, gamma_pos, gamma_neg, margin)
            v, dv, _ = side_terms(s, FORM, False, beta, gamma_pos, gamma_neg, margin)
            ex = tl.exp(tl.where(pos, u - (st0 + st1)[:, None], v - (st2 + st3)[:, None]))
            gp = coef[:, None] * ex * du
            gn = coef[:, None] * ex * dv
    G = tl.where(pos, gp, tl.where(neg, gn, 0.0))
    if SIM == 0:
        G = 0.5 * G  # ∂s/∂cos of the shifted cosine
    return G


@triton.jit
def _label_bwd_rows_kernel(g_ptr, stats_ptr, e_ptr, iz_ptr, r_ptr, ir_ptr, lab_ptr, rlab_ptr, beta: tl.float64, inv_beta: tl.float64, gamma_pos: tl.float64,
                      gamma_neg: tl.float64, margin: tl.float64, lam: tl.float64, de_ptr,
                           diz_ptr, B, M, D, self_offset, s_eb, s_ed, s_rb, s_rd,
                           FORM: tl.constexpr, SIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
                           UPCAST: tl.constexpr):
    """∂e for a row block and one chunk of BDO features (and ∂iz from chunk 0), over every column tile."""
    acc_ty = iz_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < B
    dchunk = tl.program_id(1) * BDO + tl.arange(0, BDO)
    iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    acc = tl.zeros((BM, BDO), acc_ty)
    d_iz = tl.zeros((BM,), acc_ty)
    for t in range(0, tl.cdiv(M, BN)):
        P, s, pos, neg, ir = _tile(e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, t, M, D, self_offset,
                                   s_eb, s_ed, s_rb, s_rd, SIM, acc_ty, BM, BN, BD, PREC, UPCAST)
        G = _grad_tile(s, pos, neg, rows, rmask, g_ptr, stats_ptr, beta, inv_beta, gamma_pos, gamma_neg, margin,
                       FORM, SIM, acc_ty)
        Gr = G * ir[None, :]
        d_iz += tl.sum(Gr * P, axis=1)
        cols = t * BN + tl.arange(0, BN)
        r = tl.load(r_ptr + cols[:, None].to(tl.int64) * s_rb + dchunk[None, :].to(tl.int64) * s_rd,
                    mask=(cols[:, None] < M) & (dchunk[None, :] < D), other=0.0).to(acc_ty)
        acc = tl.dot(Gr, r, acc=acc, input_precision=GPREC, out_dtype=acc_ty)
    out_mask = rmask[:, None] & (dchunk[None, :] < D)
    tl.store(de_ptr + rows[:, None].to(tl.int64) * D + dchunk[None, :], acc * iz[:, None], mask=out_mask)
    if tl.program_id(1) == 0:
        tl.store(diz_ptr + rows, d_iz, mask=rmask)


@triton.jit
def _label_bwd_cols_kernel(g_ptr, stats_ptr, e_ptr, iz_ptr, r_ptr, ir_ptr, lab_ptr, rlab_ptr, beta: tl.float64, inv_beta: tl.float64, gamma_pos: tl.float64,
                      gamma_neg: tl.float64, margin: tl.float64, lam: tl.float64, dr_ptr,
                           dir_ptr, B, M, D, self_offset, s_eb, s_ed, s_rb, s_rd,
                           FORM: tl.constexpr, SIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
                           UPCAST: tl.constexpr):
    """∂r for a column block and one chunk of BDO features (and ∂ir from chunk 0), over every row block.
    The tiles are the forward's (same blocks, same order of the D loop), so ties of the margin
    statistics are recognized exactly."""
    acc_ty = iz_ptr.dtype.element_ty
    beta, inv_beta, gamma_pos, gamma_neg, margin, lam = load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam,
                                                                 acc_ty)
    t = tl.program_id(0)
    cols = t * BN + tl.arange(0, BN)
    cmask = cols < M
    dchunk = tl.program_id(1) * BDO + tl.arange(0, BDO)
    acc = tl.zeros((BN, BDO), acc_ty)
    d_ir = tl.zeros((BN,), acc_ty)
    for rb in range(0, tl.cdiv(B, BM)):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B
        iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
        lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
        P, s, pos, neg, ir = _tile(e_ptr, iz, r_ptr, ir_ptr, lab_r, rlab_ptr, rows, rmask, t, M, D, self_offset,
                                   s_eb, s_ed, s_rb, s_rd, SIM, acc_ty, BM, BN, BD, PREC, UPCAST)
        G = _grad_tile(s, pos, neg, rows, rmask, g_ptr, stats_ptr, beta, inv_beta, gamma_pos, gamma_neg, margin,
                       FORM, SIM, acc_ty)
        Gz = G * iz[:, None]
        d_ir += tl.sum(Gz * P, axis=0)
        e = tl.load(e_ptr + rows[:, None].to(tl.int64) * s_eb + dchunk[None, :].to(tl.int64) * s_ed,
                    mask=rmask[:, None] & (dchunk[None, :] < D), other=0.0).to(acc_ty)
        acc = tl.dot(tl.trans(Gz), e, acc=acc, input_precision=GPREC, out_dtype=acc_ty)
    ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
    tl.store(dr_ptr + cols[:, None].to(tl.int64) * D + dchunk[None, :], acc * ir[:, None], mask=cmask[:, None] & (dchunk[None, :] < D))
    if tl.program_id(1) == 0:
        tl.store(dir_ptr + cols, d_ir, mask=cmask)


# ---------------------------------------------------------------------------------------------- launchers
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Config(NamedTuple):
    """Tiles and dot precisions of the label kernels: BM rows × BN columns per tile, BD features per step
    of the similarity's K loop, BDO features per program of the backward's outputs, the dot precisions of
    the similarity (PREC) and of the backward's G products (GPREC), UPCAST (bf16 dots in fp32: the
    interpreter's bf16 dot is wrong), and the launch's warps and pipeline stages."""

    BM: int
    BN: int
    BD: int
    BDO: int
    PREC: str
    GPREC: str
    UPCAST: bool
    num_warps: int = 4
    num_stages: int = 2

    def meta(self) -> dict:
        return self._asdict()


_OVERRIDE: dict = {}


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
    upcast = e.dtype == torch.bfloat16 and _interpreting()
    bd = max(16, min(64, triton.next_power_of_2(D)))
    if _interpreting():
        cfg = Config(16, 16, bd, bd, "ieee", "ieee", upcast)
    elif half:
        cfg = Config(64, 32, bd, 64, prec, prec, upcast, num_warps=8)
    else:
        cfg = Config(32, 32, 16, 32 if e.dtype == torch.float32 else 16, "ieee", "ieee", False)
    return cfg._replace(**_OVERRIDE)


def _args(e, r):
    return e.stride(0), e.stride(1), r.stride(0), r.stride(1)


def label_partials(e, iz, r, ir, labels, ref_labels, params, self_offset, similarity, form, sweep=0, c=None):
    """``part [splits, B, 6]`` of one forward sweep (see the module docstring) in the accumulation dtype of
    ``iz``; ``params`` = the ops' (form, β, γ⁺, γ⁻, m, λ)."""
    B, D = e.shape
    M = r.shape[0]
    cfg = config(e, D)
    row_blocks, tiles = triton.cdiv(B, cfg.BM), max(triton.cdiv(M, cfg.BN), 1)
    # Enough programs to fill the device when B is small against M (a memory bank): split the columns.
    want = 4 if _interpreting() else 264
    splits = max(1, min(tiles, want // row_blocks))
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)
    part = torch.empty(splits, B, int(N_PARTS), dtype=iz.dtype, device=e.device)
    meta = {k: v for k, v in cfg.meta().items() if k not in ("BDO", "GPREC")}
    launch(_label_fwd_kernel, (row_blocks, splits), e.device, e, iz, r, ir, labels, ref_labels, *loss_args(params),
           iz if c is None else c, part, B, M, D, self_offset, per_split, *_args(e, r), FORM=form, SWEEP=sweep,
           SIM=similarity, **meta)
    return part


def label_bwd(grad_rows, stats, e, iz, r, ir, labels, ref_labels, params, self_offset, similarity, form, ref_grad):
    """(∂e [B, D], ∂iz [B], ∂r [M, D] or None, ∂ir [M] or None) in the accumulation dtype of ``iz``."""
    B, D = e.shape
    M = r.shape[0]
    cfg = config(e, D)
    acc = iz.dtype
    if B == 0 or M == 0 or D == 0:  # nothing to launch: every gradient is zero
        zeros = lambda *shape: torch.zeros(*shape, dtype=acc, device=e.device)  # noqa: E731
        return zeros(B, D), zeros(B), *((zeros(M, D), zeros(M)) if ref_grad else (None, None))
    de, diz = torch.empty(B, D, dtype=acc, device=e.device), torch.empty(B, dtype=acc, device=e.device)
    meta = dict(FORM=form, SIM=similarity, **cfg.meta())
    args = (grad_rows.contiguous(), stats.contiguous(), e, iz, r, ir, labels, ref_labels, *loss_args(params))
    d_chunks = triton.cdiv(D, cfg.BDO)
    launch(_label_bwd_rows_kernel, (triton.cdiv(B, cfg.BM), d_chunks), e.device, *args, de, diz, B, M, D, self_offset,
           *_args(e, r), **meta)
    if not ref_grad:
        return de, diz, None, None
    dr, dir_ = torch.empty(M, D, dtype=acc, device=e.device), torch.empty(M, dtype=acc, device=e.device)
    launch(_label_bwd_cols_kernel, (max(triton.cdiv(M, cfg.BN), 1), d_chunks), e.device, *args, dr, dir_, B, M, D,
           self_offset, *_args(e, r), **meta)
    return de, diz, dr, dir_
