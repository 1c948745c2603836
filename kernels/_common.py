"""Device functions shared by the Triton kernels: the OUCL exponents u(p), v(n) with their derivatives,
numerically careful softplus/sigmoid/log1p, and the online log-sum-exp update.

Form ids match csrc/oucl_common.h: 0 hinge, 1 squared, 2 weighted, 3 circle, 4 InfoNCE (β = 1/τ, whose
negative side is the weighted form's v(n) = β·n), 5 margin statistics. Loss parameters travel as a small
tensor ``cfg = (β, 1/β, γ⁺, γ⁻, m, λ)`` in the accumulation dtype, so fp64 runs keep fp64 parameters
(Triton would pass Python floats as fp32). Row offsets into [B, K], [B, M] or [N, D] tensors are computed in
int64 (``rows.to(tl.int64) * stride``): such tensors can exceed 2^31 elements on a large GPU.
"""
import triton
import triton.language as tl

# Module-level constants a kernel reads must be constexpr instances (an annotation is not enough).
HINGE = tl.constexpr(0)
SQUARED = tl.constexpr(1)
WEIGHTED = tl.constexpr(2)
CIRCLE = tl.constexpr(3)
INFONCE = tl.constexpr(4)
MARGIN = tl.constexpr(5)


@triton.jit
def load_cfg(cfg_ptr):
    """(β, 1/β, γ⁺, γ⁻, m, λ) from the parameter tensor."""
    return (tl.load(cfg_ptr), tl.load(cfg_ptr + 1), tl.load(cfg_ptr + 2), tl.load(cfg_ptr + 3),
            tl.load(cfg_ptr + 4), tl.load(cfg_ptr + 5))


@triton.jit
def side_terms(x, FORM: tl.constexpr, POS: tl.constexpr, beta, gamma_pos, gamma_neg, margin):
    """(e, e', e'') of one side at scores ``x``: e = u(x) for positives, v(x) for negatives. The circle
    form's Γ weights are constants for differentiation (SPEC.md), so its e'' is 0 like the weighted form's."""
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
    else:  # weighted (and InfoNCE's negatives, with γ⁻ = 0)
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
def lse_update(run_max, total, e):
    """Merge a block of exponents ``e [R, K]`` (-inf where absent) into the per-row running maximum (which
    may be -inf) and sum Σ exp(e - finite_or_zero(run_max)), both ``[R]``. The maximum is kept apart from
    the shift so that a row whose first blocks are empty still shifts by its true maximum later."""
    new_max = tl.maximum(run_max, tl.max(e, axis=1))
    new_shift = finite_or_zero(new_max)
    total = total * tl.exp(finite_or_zero(run_max) - new_shift) + tl.sum(tl.exp(e - new_shift[:, None]), axis=1)
    return new_max, total


@triton.jit
def lse_pair_update(max_p, sum_p, max_n, sum_n, u, v, pos, neg):
    """Both running log-sum-exps of a tile whose entries are positives (exponent ``u``), negatives (``v``)
    or neither, with one exp per entry: the exponential (the GPU's scarcest unit in this loop) is taken of
    the entry's own side only."""
    new_max_p = tl.maximum(max_p, tl.max(tl.where(pos, u, float("-inf")), axis=1))
    new_max_n = tl.maximum(max_n, tl.max(tl.where(neg, v, float("-inf")), axis=1))
    shift_p = finite_or_zero(new_max_p)
    shift_n = finite_or_zero(new_max_n)
    ex = tl.exp(tl.where(pos, u - shift_p[:, None], tl.where(neg, v - shift_n[:, None], float("-inf"))))
    sum_p = sum_p * tl.exp(finite_or_zero(max_p) - shift_p) + tl.sum(tl.where(pos, ex, 0.0), axis=1)
    sum_n = sum_n * tl.exp(finite_or_zero(max_n) - shift_n) + tl.sum(tl.where(neg, ex, 0.0), axis=1)
    return new_max_p, sum_p, new_max_n, sum_n


@triton.jit
def softplus_sigmoid(x):
    """(softplus(x), σ(x)) from one exp: t = e^{-|x|}, softplus = max(x, 0) + log(1 + t),
    σ = 1/(1 + t) for x ≥ 0 and t/(1 + t) otherwise."""
    t = tl.exp(-tl.abs(x))
    return tl.maximum(x, tl.zeros_like(x)) + log1p(t), tl.where(x >= 0, 1.0, t) / (1.0 + t)
