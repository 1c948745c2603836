"""pairwise_similarity in Triton: the raw GEMM e·rᵀ with the normalization (inverse norms) and the
similarity's affine map applied in the epilogue, written once in the output dtype. Its output is B×M by
definition; nothing else is."""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch, op
from .label import _raw_dot, config


@triton.jit
def _similarity_kernel(e_ptr, iz_ptr, r_ptr, ir_ptr, out_ptr, B, M, D, s_eb, s_ed, s_rb, s_rd, SIM: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                       UPCAST: tl.constexpr, RESIDENT: tl.constexpr):
    """One [BM, BN] output tile per program on a 1-D grid (row block major): grid axis y would cap the
    column blocks at 65,535, about 4M reference rows."""
    acc_ty = iz_ptr.dtype.element_ty
    col_blocks = tl.cdiv(M, BN)
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BM + tl.arange(0, BM)
    cols = (pid % col_blocks) * BN + tl.arange(0, BN)
    rmask, cmask = rows < B, cols < M
    P = _raw_dot(None, None, e_ptr, r_ptr, rows, cols, rmask, cmask, D, s_eb, s_ed, s_rb, s_rd, acc_ty, BM, BN, BD,
                 PREC, UPCAST, RESIDENT)
    iz = tl.load(iz_ptr + rows, mask=rmask, other=0.0)
    ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
    s = P * iz[:, None] * ir[None, :]
    if SIM == 0:
        s = 0.5 * s + 0.5
    tl.store(out_ptr + rows[:, None].to(tl.int64) * M + cols[None, :], s.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@op
def pairwise_similarity(e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, similarity: int,
                        out_dtype: torch.dtype) -> Tensor:
    """``[B, M]`` similarities of the rows of ``e`` and ``r`` given their inverse norms ``iz``, ``ir``."""
    B, D = e.shape
    M = r.shape[0]
    cfg = config(e, D)
    out = torch.empty(B, M, dtype=out_dtype, device=e.device)
    if B and M:
        launch(_similarity_kernel, (triton.cdiv(B, cfg.BM) * triton.cdiv(M, cfg.BN),), e.device, e, iz, r, ir, out, B,
               M, D, e.stride(0), e.stride(1), r.stride(0), r.stride(1), SIM=similarity, BM=cfg.BM, BN=cfg.BN,
               BD=cfg.BD, PREC=cfg.PREC, UPCAST=cfg.UPCAST, RESIDENT=cfg.RESIDENT, num_warps=cfg.num_warps,
               num_stages=cfg.num_stages)
    return out
