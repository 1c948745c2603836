"""Device functions shared by the Triton kernels: the OUCL exponents u(p), v(n) with their derivatives,
numerically careful softplus/sigmoid/log1p, and the online log-sum-exp update.

Form ids, the per-row state ``stats [B, N_STATS]`` and the label partials ``part [splits, B, N_PARTS]``
are the contracts of :mod:`metaug_fast.contract`, read from there as constexprs (InfoNCE runs on the
weighted form's negative side v(n) = β·n with β = 1/τ).

Loss parameters (β, 1/β, γ⁺, γ⁻, m, λ) are kernel arguments annotated fp64 (Triton would pass a Python
float as fp32) and cast to the accumulation dtype inside: no tensor is built from them per call, so a call
copies nothing from the host and never synchronizes the stream (CUDA graphs can capture it).

Offsets into [B, K], [B, M] or [N, D] tensors are computed in int64 on both axes (``rows.to(tl.int64) *
stride``, ``cols.to(tl.int64) * stride``): such tensors, or a strided view of one, can exceed 2^31 elements.

Every launch goes through :func:`launch`, which runs the kernel on its tensors' device (Triton launches on
the current device) and checks the grid against CUDA's limits.

The score-mode kernels (score.py, margins.py) share their row-block layout: the autotuning space
(:func:`tuned`), the block loader (:func:`load_rows`), the argument packing and the launcher
(:func:`run_rows`), which compiles without fused multiply-adds (:data:`COMPILE_OPTIONS`).
"""
import contextlib
import os
from typing import Callable, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch._library.triton import is_wrap_triton_enabled
from torch.library import triton_op, wrap_triton

from ..contract import N_PARTS as _N_PARTS
from ..contract import N_STATS as _N_STATS
from ..contract import Form, Part, Stat

# Module-level constants a kernel reads must be constexpr instances (an annotation is not enough).
HINGE, SQUARED, WEIGHTED, CIRCLE, INFONCE, MARGIN = (tl.constexpr(int(Form[name])) for name in (
    "HINGE", "SQUARED", "WEIGHTED", "CIRCLE", "INFONCE", "MARGIN"))
N_STATS = tl.constexpr(_N_STATS)
ST_0, ST_1, ST_2, ST_3 = (tl.constexpr(int(s)) for s in (Stat.POS_SHIFT, Stat.POS_LOG_SUM, Stat.NEG_SHIFT,
                                                         Stat.NEG_LOG_SUM))
ST_VALID = tl.constexpr(int(Stat.VALID))
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
N_PARTS = tl.constexpr(_N_PARTS)
PT_0, PT_1, PT_2, PT_3, PT_4, PT_5 = (tl.constexpr(int(p)) for p in (Part.POS_MAX, Part.POS_SUM, Part.NEG_MAX,
                                                                     Part.NEG_SUM, Part.NAN_POS, Part.NAN_NEG))


# CUDA's grid limits per axis (x, y, z).
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(grid: Sequence[int]) -> Tuple[int, ...]:
    """``grid`` as a tuple, or a ValueError naming the axis that exceeds CUDA's limit (a GPU would refuse
    the launch; Triton's interpreter has no limit, so the check is made here for both)."""
    grid = tuple(int(n) for n in grid)
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"grid axis {'xyz'[axis]} of {n} programs exceeds CUDA's limit of {limit}")
    return grid


def device_guard(device: torch.device):
    """Makes ``device`` current for a launch: Triton launches on the current CUDA device, which need not be
    the tensors' (tensors on cuda:1 without torch.cuda.set_device(1))."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid: Union[Sequence[int], Callable], device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``device``, with the grid checked (a callable grid, as autotuned
    kernels take, is checked when Triton evaluates it).

    Every launcher runs inside a ``torch.library.triton_op`` (:func:`op`). Called eagerly,
    the op launches the kernel. Traced (fake tensors, ``torch.compile``, AOT dispatch), the launch goes
    through ``wrap_triton`` and becomes a node of the graph; nothing runs, so no device is made current."""
    if callable(grid):
        make = grid
        grid = lambda meta: check_grid(make(meta))
    else:
        grid = check_grid(grid)
    traced = is_wrap_triton_enabled()
    with contextlib.nullcontext() if traced else device_guard(device):
        (wrap_triton(kernel) if traced else kernel)[grid](*args, **kwargs)


# The namespace of the Triton launchers as torch operators: torch.ops.metaug_fast_triton.<launcher>.
NAMESPACE = "metaug_fast_triton"


def op(launcher: Callable) -> Callable:
    """``launcher`` registered as the operator ``torch.ops.metaug_fast_triton.<its name>`` with
    ``torch.library.triton_op``, its schema inferred from its annotations. The launcher itself is the fake
    implementation (it allocates its outputs with torch ops and records its launches: :func:`launch`), and
    ``torch.compile`` sees each kernel it launches as a node of the graph, so ``fullgraph=True`` traces the
    Triton backend without a break. Outputs are new tensors: none aliases an input or another output."""
    return triton_op(f"{NAMESPACE}::{launcher.__name__}", launcher, mutates_args=())


def loss_args(params) -> Tuple[float, ...]:
    """The kernels' (β, 1/β, γ⁺, γ⁻, m, λ) from the ops' (form, β, γ⁺, γ⁻, m, λ)."""
    _, beta, gamma_pos, gamma_neg, margin, lam = params
    return float(beta), 1.0 / float(beta), float(gamma_pos), float(gamma_neg), float(margin), float(lam)


@triton.jit
def extremum_update(best, ties, nan, s, keep, MIN: tl.constexpr):
    """One more block of scores ``s [rows, cols]`` (``keep``: the entries that count) into each row's running
    extremum (min with ``MIN``, else max), its number of ``ties`` and its count of kept NaNs ``nan`` (int32):
    (best, ties, nan) updated. Ties restart when the extremum moves."""
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
def store_stats(stats_ptr, rows, rmask, s0, s1, s2, s3, valid):
    """A block of rows' state: the four per-form slots (``Stat``: for the log-sum-exp forms A's and C's
    (shift, log_sum); the other forms' aliases name the same slots) and the valid flag."""
    base = stats_ptr + rows.to(tl.int64) * N_STATS
    tl.store(base + ST_0, s0, mask=rmask)
    tl.store(base + ST_1, s1, mask=rmask)
    tl.store(base + ST_2, s2, mask=rmask)
    tl.store(base + ST_3, s3, mask=rmask)
    tl.store(base + ST_VALID, valid.to(s0.dtype), mask=rmask)


@triton.jit
def load_stats(stats_ptr, rows, rmask):
    """(s0, s1, s2, s3, valid) of a block of rows, as :func:`store_stats` wrote them (0 and invalid past B)."""
    base = stats_ptr + rows.to(tl.int64) * N_STATS
    return (tl.load(base + ST_0, mask=rmask, other=0.0), tl.load(base + ST_1, mask=rmask, other=0.0),
            tl.load(base + ST_2, mask=rmask, other=0.0), tl.load(base + ST_3, mask=rmask, other=0.0),
            tl.load(base + ST_VALID, mask=rmask, other=0.0) != 0)


@triton.jit
def load_cfg(beta, inv_beta, gamma_pos, gamma_neg, margin, lam, acc_ty: tl.constexpr):
    """The fp64 loss arguments in the accumulation dtype (``tl.full`` keeps them fp64 under the interpreter
    too, which would round a bare Python float to fp32)."""
    return (tl.full((), beta, acc_ty), tl.full((), inv_beta, acc_ty), tl.full((), gamma_pos, acc_ty),
            tl.full((), gamma_neg, acc_ty), tl.full((), margin, acc_ty), tl.full((), lam, acc_ty))


@triton.jit
def side_terms(x, FORM: tl.constexpr, POS: tl.constexpr, beta, gamma_pos, gamma_neg, margin):
    """(e, e', e'') of one side at scores ``x``: e = u(x) for positives, v(x) for negatives. The circle
    form's Γ weights are constants for differentiation (docs/mathematics.md#circle-weights), so its e'' is 0 like
    the weighted form's."""
    zero = tl.zeros_like(x)
    if FORM == SQUARED:
        if POS:
            d = x - 1.0
            e = beta * d * d
            d1 = 2.0 * beta * d
        else:
            e = beta * (x * x - 2.0 * margin * margin)
            d1 = 2.0 * beta * x
        d2 = zero + 2.0 * beta
    elif FORM == CIRCLE:
        if POS:
            g = tl.maximum(1.0 + margin - x, zero)
            e = -beta * g * (x - (1.0 - margin))
            d1 = -beta * g
        else:
            g = tl.maximum(x + margin, zero)
            e = beta * g * (x - margin)
            d1 = beta * g
        d2 = zero
    else:  # weighted (and InfoNCE's negatives, with γ⁻ = 0); any other id is refused when compiled
        tl.static_assert(FORM == WEIGHTED or FORM == INFONCE, "side_terms: not a smooth OUCL form id")
        if POS:
            e = -beta * (x - gamma_pos)
            d1 = zero - beta
        else:
            e = beta * (x - gamma_neg)
            d1 = zero + beta
        d2 = zero
    return e, d1, d2


@triton.jit
def log1p(x):
    """log(1 + x) accurate for small x (Goldberg: log(u)·x/(u - 1) with u = 1 + x); libdevice's log1p is
    not available to the interpreter."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def softplus(x):
    return tl.maximum(x, tl.zeros_like(x)) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def finite_or_zero(m):
    """A log-sum-exp shift must be finite: exp(-inf - 0) = 0 where exp(-inf - (-inf)) would be NaN, and an
    infinite maximum shifts by 0 so that +inf gives +inf (as torch.logsumexp)."""
    return tl.where(tl.abs(m) < float("inf"), m, tl.zeros_like(m))


@triton.jit
def exp_base(x, BASE2: tl.constexpr):
    """2^x for exponents kept in log2 units (β·log2(e) folded into the scale: the GPU's ex2 without the
    multiply that tl.exp adds), else e^x."""
    if BASE2:
        return tl.exp2(x)
    return tl.exp(x)


@triton.jit
def rescale(run_max, new_shift, BASE2: tl.constexpr):
    """The factor that moves a running sum from the shift ``finite_or_zero(run_max)`` to ``new_shift``: 0
    while the row is still empty (run_max = -inf), where exp(0 - new_shift) alone overflows for a first
    exponent below about -88 in fp32 (β·score at β ≥ 128) and the empty sum 0 times it would be NaN."""
    return tl.where(run_max == float("-inf"), 0.0, exp_base(finite_or_zero(run_max) - new_shift, BASE2))


@triton.jit
def lse_update(run_max, total, e, BASE2: tl.constexpr):
    """Merge a block of exponents ``e [R, K]`` (-inf where absent) into the per-row running maximum (which
    may be -inf) and sum Σ exp(e - finite_or_zero(run_max)), both ``[R]`` (BASE2: exponents and maximum in
    log2 units, Σ 2^(e - max), the same sum). The maximum is kept apart from the shift so that a row whose
    first blocks are empty still shifts by its true maximum later."""
    new_max = tl.maximum(run_max, tl.max(e, axis=1))
    new_shift = finite_or_zero(new_max)
    total = total * rescale(run_max, new_shift, BASE2) + tl.sum(exp_base(e - new_shift[:, None], BASE2), axis=1)
    return new_max, total


@triton.jit
def lse_pair_update(max_p, sum_p, max_n, sum_n, u, v, pos, neg):
    """Both running log-sum-exps of a tile whose entries are positives (exponent ``u``), negatives (``v``)
    or neither, exponents and maxima in log2 units, with one exp2 per entry: the exponential (the GPU's
    scarcest unit in this loop) is taken of the entry's own side only."""
    new_max_p = tl.maximum(max_p, tl.max(tl.where(pos, u, float("-inf")), axis=1))
    new_max_n = tl.maximum(max_n, tl.max(tl.where(neg, v, float("-inf")), axis=1))
    shift_p = finite_or_zero(new_max_p)
    shift_n = finite_or_zero(new_max_n)
    ex = tl.exp2(tl.where(pos, u - shift_p[:, None], tl.where(neg, v - shift_n[:, None], float("-inf"))))
    sum_p = sum_p * rescale(max_p, shift_p, True) + tl.sum(tl.where(pos, ex, 0.0), axis=1)
    sum_n = sum_n * rescale(max_n, shift_n, True) + tl.sum(tl.where(neg, ex, 0.0), axis=1)
    return new_max_p, sum_p, new_max_n, sum_n


@triton.jit
def softplus_sigmoid(x):
    """(softplus(x), σ(x)) from one exp: t = e^{-|x|}, softplus = max(x, 0) + log(1 + t),
    σ = 1/(1 + t) for x ≥ 0 and t/(1 + t) otherwise."""
    t = tl.exp(-tl.abs(x))
    return tl.maximum(x, tl.zeros_like(x)) + log1p(t), tl.where(x >= 0, 1.0, t) / (1.0 + t)


# ------------------------------------------------------------------ score mode: blocks of rows, streamed
def row_configs(space: Sequence[Tuple[int, int, int]]) -> list:
    """Autotuning configurations from a ``space`` of (rows per program, columns per step, warps); one small
    configuration under the interpreter, where timing them would only cost time."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_B": 16, "BLOCK_K": 64})]
    return [triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w) for bb, bk, w in space]


def _shape(config) -> Tuple[int, int, int]:
    return config.kwargs["BLOCK_B"], config.kwargs["BLOCK_K"], config.num_warps


def tuned(*space: Tuple[int, int, int], fp64: Sequence[Tuple[int, int, int]] = ()):
    """Decorator: the kernel autotuned per (K⁺, K⁻, dtype) over ``space``, or over ``fp64`` (default: the
    same) when its tensors are fp64. Each space holds only shapes that compile without spilling registers in
    its dtypes and every form, under this project's Triton and the GPU machine's (``make check-triton`` and
    ``make check-triton-gpu-stack`` compile them all and fail on a spill: 16 rows × 512 columns spilled
    0.2-7 KiB per thread; the compilers disagree on small shapes, whence fp64's own spaces). Under
    ``METAUG_TRITON_ONE_CONFIG=1``, a switch for tests, only the space's first (the GPU check sets it: its
    correctness runs would otherwise spend most of their time compiling and timing every configuration).
    The spaces are kept as the kernel's ``space`` and ``space_fp64`` for the compile check."""
    fp64 = tuple(fp64) or space

    def prune(configs, named_args, **_):
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return configs
        wide = any(getattr(arg, "dtype", None) == torch.float64 for arg in named_args.values())
        keep = [c for shape in (fp64 if wide else space) for c in configs if _shape(c) == shape]
        return keep[:1] if os.environ.get("METAUG_TRITON_ONE_CONFIG", "0") == "1" else keep

    def wrap(kernel):
        tuner = triton.autotune(configs=row_configs(list(dict.fromkeys(space + fp64))), key=["KP", "KN"],
                                prune_configs_by={"early_config_prune": prune})(kernel)
        tuner.space, tuner.space_fp64 = space, fp64
        return tuner
    return wrap


@triton.jit
def load_rows(x_ptr, m_ptr, rows, rmask, k0, K, s_xb, s_xk, s_mb, s_mk, HAS_M: tl.constexpr, BLOCK_K: tl.constexpr,
              acc_ty: tl.constexpr):
    """A ``[BLOCK_B, BLOCK_K]`` block of one side, columns ``k0 + arange(BLOCK_K)``: scores in the accumulation
    dtype and which entries count. A kernel that stores at those columns computes them itself: torch's
    analysis of what a kernel writes (``torch.compile``) follows a store's address back through the calls
    it comes from, so columns returned from here would count the scores as written."""
    cols = k0 + tl.arange(0, BLOCK_K)
    inb = rmask[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xb + cols[None, :].to(tl.int64) * s_xk, mask=inb,
                other=0.0).to(acc_ty)
    keep = inb
    if HAS_M:
        offsets = rows[:, None].to(tl.int64) * s_mb + cols[None, :].to(tl.int64) * s_mk
        keep = keep & (tl.load(m_ptr + offsets, mask=inb, other=0) != 0)
    return x, keep


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Contraction of a·b + c into fused multiply-adds is off, as in the C++ and CUDA builds: the Hessian-vector
# product subtracts e'·t - Σ w·e'·t, which cancels exactly for a row dominated by one entry only when both
# products round alike (a fused one leaves about an ulp times β², 1e-3 relative in fp32). These kernels are
# memory-bound: the separate multiply costs no time.
COMPILE_OPTIONS = {"enable_fp_fusion": False}

# A launch option is not enough where the cancellation happens: torch.compile before torch 2.14 (Inductor's
# launch of a traced kernel) drops it and compiles with contraction on. Those products go through mul_rn, a
# PTX mul.rn in inline assembly, which neither LLVM nor ptxas fuses into an add (libdevice's mul_rn does not
# survive: LLVM turns it into a plain multiply, which it then contracts). The interpreter runs no assembly,
# and numpy rounds every product anyway.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    @triton.jit
    def mul_rn(a, b):
        """a·b, rounded to the operands' fp32/fp64."""
        return a * b
else:
    @triton.jit
    def mul_rn(a, b):
        """a·b, rounded to the operands' fp32/fp64 and never fused into an add."""
        if a.dtype == tl.float64:
            return tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=l,l,l", [a, b], dtype=tl.float64,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)


def run_rows(kernel, B: int, device: torch.device, *args, **kwargs) -> None:
    """One program per BLOCK_B rows, on the tensors' device; no launch for an empty batch."""
    if B:
        launch(kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),), device, *args, **COMPILE_OPTIONS, **kwargs)


def mask_args(mask, like):
    """(pointer tensor, row stride, column stride) of an optional bool mask, read as bytes."""
    if mask is None:
        return like, 0, 0
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1)


def score_args(pos, neg, pos_mask, neg_mask):
    pm, s_pmb, s_pmk = mask_args(pos_mask, pos)
    nm, s_nmb, s_nmk = mask_args(neg_mask, neg)
    B, KP, KN = pos.shape[0], pos.shape[1], neg.shape[1]
    strides = (pos.stride(0), pos.stride(1), neg.stride(0), neg.stride(1), s_pmb, s_pmk, s_nmb, s_nmk)
    return pm, nm, B, KP, KN, strides


def mask_flags(pos_mask, neg_mask) -> dict:
    return dict(HAS_PM=pos_mask is not None, HAS_NM=neg_mask is not None)
