"""``offset + α·A·B (+ C)`` in Triton with IEEE fp32/fp64 products: the GEMMs of the label-mode second
derivative on CUDA (metaug_fast/_ops/label.py, ``_gemm``). ``torch.mm`` on CUDA fp32 tensors follows
``torch.backends.cuda.matmul.allow_tf32`` and ``torch.set_float32_matmul_precision("high")``, which training
scripts commonly set: TF32 keeps 10 mantissa bits, about 1e-3 relative, the whole tolerance of an fp32
Hessian-vector product. These dots say ``input_precision="ieee"``, so no global setting changes them (and
setting the flags ourselves is not an option: torch 2.14 refuses a script that then reads them through the
other API)."""
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch, op
from .label import _raw_dot


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, out_ptr, alpha: tl.float64, offset: tl.float64, M, N, K, s_am, s_ak, s_bk, s_bn,
               s_cm, s_cn, HAS_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One [BM, BN] tile of ``out [M, N]`` per program, on a 1-D grid (row block major: grid axis y would cap
    the column blocks at 65,535); K in steps of BK."""
    acc_ty = out_ptr.dtype.element_ty
    alpha, offset = tl.full((), alpha, acc_ty), tl.full((), offset, acc_ty)  # fp64 under the interpreter too
    col_blocks = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BM + tl.arange(0, BM)
    cols = (pid % col_blocks) * BN + tl.arange(0, BN)
    rmask, cmask = rows < M, cols < N
    # label.py's product loop, read with b's strides transposed: its [BN, BK] blocks of b are bᵀ's rows.
    acc = _raw_dot(None, None, a_ptr, b_ptr, rows, cols, rmask, cmask, K, s_am, s_ak, s_bn, s_bk, acc_ty, BM, BN, BK,
                   "ieee", False, False)
    out = offset + alpha * acc
    inside = rmask[:, None] & cmask[None, :]
    if HAS_C:
        out += tl.load(c_ptr + rows[:, None].to(tl.int64) * s_cm + cols[None, :].to(tl.int64) * s_cn, mask=inside,
                       other=0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], out, mask=inside)


def tiles(dtype: torch.dtype) -> dict:
    """(BM, BN, BK, warps) by dtype: fp32 and fp64 dots in IEEE precision run on the FMA units from
    registers; these compile for sm_90 without spilling (``make check-triton``). Small tiles under the
    interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return dict(BM=16, BN=16, BK=16, num_warps=4)
    if dtype == torch.float64:
        return dict(BM=32, BN=32, BK=16, num_warps=4)
    return dict(BM=64, BN=64, BK=16, num_warps=4)


@op
def mm(a: Tensor, b: Tensor, c: Optional[Tensor], alpha: float, offset: float) -> Tensor:
    """``offset + alpha·a·b (+ c)``, ``a [M, K]``, ``b [K, N]``, ``c [M, N]`` or None, all fp32 or all fp64
    (any strides); a new contiguous ``[M, N]`` tensor of their dtype."""
    if a.dtype not in (torch.float32, torch.float64) or b.dtype != a.dtype or (c is not None and c.dtype != a.dtype):
        raise TypeError(f"mm: a, b and c must share one dtype, float32 or float64; got {a.dtype}, {b.dtype}"
                        f"{'' if c is None else ', ' + str(c.dtype)}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"mm: a [M, K] and b [K, N] expected, got {tuple(a.shape)} and {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    if c is not None and tuple(c.shape) != (M, N):
        raise ValueError(f"mm: c must be [{M}, {N}], got {tuple(c.shape)}")
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M and N:
        t = tiles(a.dtype)
        cs = (0, 0) if c is None else c.stride()
        launch(_mm_kernel, (triton.cdiv(M, t["BM"]) * triton.cdiv(N, t["BN"]),), a.device, a, b,
               a if c is None else c, out, float(alpha), float(offset), M, N, K, *a.stride(), *b.stride(), *cs,
               HAS_C=c is not None, **t)
    return out


def _setup_context(ctx, inputs, output):
    a, b, c, alpha, _ = inputs
    ctx.save_for_backward(a, b)
    ctx.alpha, ctx.with_c = alpha, c is not None


def _backward(ctx, grad):
    """∂/∂a = α·g·bᵀ, ∂/∂b = α·aᵀ·g, ∂/∂c = g: through :func:`mm` again, so every order stays IEEE."""
    a, b = ctx.saved_tensors
    da = mm(grad, b.T, None, ctx.alpha, 0.0) if ctx.needs_input_grad[0] else None
    db = mm(a.T, grad, None, ctx.alpha, 0.0) if ctx.needs_input_grad[1] else None
    return da, db, grad if ctx.with_c else None, None, None


mm.register_autograd(_backward, setup_context=_setup_context)
