"""Pairwise similarity on the Triton backend (metaug_fast/kernels/similarity.py): one GEMM with the
normalization and the similarity's affine map in its epilogue, differentiable to any order."""
from __future__ import annotations

import torch
from torch import Tensor

from ..contract import SIMILARITIES, normalizes
from .label import inverse_norm


class _TritonSimilarity(torch.autograd.Function):
    """(e [B,D], iz [B], r [M,D], ir [M]) -> d(e_i, r_j) ``[B, M]``; the backward is the IEEE GEMM of
    kernels/matmul.py, which torch's TF32 flags do not change, differentiable again."""

    @staticmethod
    def forward(ctx, e, iz, r, ir, sim_id, out_dtype):
        from ..kernels.similarity import pairwise_similarity

        ctx.save_for_backward(e, iz, r, ir)
        ctx.sim_id = sim_id
        return pairwise_similarity(e, iz, r, ir, sim_id, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        from ..kernels.matmul import mm

        e, iz, r, ir = ctx.saved_tensors
        acc = iz.dtype
        g = grad.to(acc) * (0.5 if ctx.sim_id == SIMILARITIES["shifted_cosine"] else 1.0)
        en, rn = e.to(acc) * iz[:, None], r.to(acc) * ir[:, None]
        d_en, d_rn = mm(g, rn, None, 1.0, 0.0), mm(g.T, en, None, 1.0, 0.0)
        return ((d_en * iz[:, None]).to(e.dtype), (d_en * e.to(acc)).sum(1), (d_rn * ir[:, None]).to(r.dtype),
                (d_rn * r.to(acc)).sum(1), None, None)


def pairwise_similarity_triton(a: Tensor, b: Tensor, *, similarity: str) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.pairwise_similarity`: one Triton GEMM with the
    normalization and the affine map in its epilogue."""
    unit = not normalizes(similarity)
    return _TritonSimilarity.apply(a, inverse_norm(a, unit), b, inverse_norm(b, unit), SIMILARITIES[similarity],
                                   a.dtype)
