"""Label-mode OUCL and InfoNCE on the C++ and CUDA backends, fused: ``torch.ops.metaug_fast.oucl_label_{fwd,bwd}``
(csrc/oucl_cpu.cpp, csrc/cuda/oucl_cuda.cu) tile the similarity matrix through ATen GEMMs and never store
B×M. The Functions take the ops' namespace as ``ops``, so the same code also drives the CUDA kernels under
the SIMT emulator (``torch.ops.metaug_fast_simt``, tests/test_cuda_simt.py).

The L2 normalization stays in PyTorch (so autograd handles its Jacobian at every order); the fused
Function maps normalized ``zn [B,D]`` and ``rn [M,D]`` (or ``zn`` itself) to per-row losses. Its
backward runs the fused kernel; when a graph of the backward is requested (``create_graph=True``, the
MetAug meta step), the gradient is recomputed instead from the materialized scores through the fused
score-mode Function, exact at second order but with B×M memory for that call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import reference
from .margins import MARGIN_ID, sigmas
from .oucl_score import CPP_OPS, FORM_IDS, INFONCE_ID, _OUCLScore

SIMILARITY_IDS = {"shifted_cosine": 0, "cosine": 1}


def _label_masks(zn, rn, labels, ref_labels, self_offset=-1):
    """Positive and negative masks ``[B,M]``; the pair (i, i + offset) is neither (offset 0 without ``rn``)."""
    self_mode = rn is None
    pm = labels[:, None] == (labels if self_mode else ref_labels)[None, :]
    nm = ~pm
    offset = 0 if self_mode else self_offset
    if offset >= 0:
        rows = torch.arange(zn.shape[0], device=zn.device)
        pm = pm.clone()
        pm[rows, rows + offset] = False
    return pm, nm


def _rows_score_mode(zn, rn, labels, ref_labels, similarity, params, self_offset, ops):
    """Per-row losses from the materialized scores through the fused score-mode Function (whose double
    backward is the fused HVP kernel): the differentiable path for a gradient of the gradient, at the price
    of B×M memory for that call."""
    scores = reference._apply_similarity(zn @ (zn if rn is None else rn).T, similarity)
    pm, nm = _label_masks(zn, rn, labels, ref_labels, self_offset)
    return _OUCLScore.apply(scores, scores, pm, nm, params, ops)[0]


def _op_inputs(zn, rn, labels, ref_labels):
    """(zn, reference rows, labels, reference labels) as the label ops take them: without a reference set
    the reference is zn itself."""
    return (zn, zn, labels, labels) if rn is None else (zn, rn, labels, ref_labels)


def _needed_grads(ctx, outputs, grad_outputs, n_none):
    """Differentiable gradients of ``outputs`` w.r.t. the (zn, rn) inputs that need them, then ``n_none`` Nones."""
    zn, rn = ctx.saved_tensors[:2]
    needs = ctx.needs_input_grad[:2]
    wanted = [x for x, need in zip((zn, rn), needs) if need]
    grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True))
    return (*(next(grads) if need else None for need in needs),) + (None,) * n_none


def _normalized(emb, labels, ref_emb, ref_labels, ref_unit=False):
    """L2-normalized rows in the accumulation dtype (fp32 for fp16/bf16) and int64 labels; ``ref_unit``:
    the reference rows are unit vectors already and are used as they are (no M×D copy)."""
    acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
    zn = F.normalize(emb.to(acc), dim=1)
    rn = None if ref_emb is None else ref_emb.to(acc) if ref_unit else F.normalize(ref_emb.to(acc), dim=1)
    return zn, rn, labels.long(), None if ref_labels is None else ref_labels.long()


class _LabelLoss(torch.autograd.Function):
    """(zn [B,D], rn [M,D] or None) -> (per-row losses [B], valid rows [B]); ``params`` = (form id, β, γ⁺,
    γ⁻, m, λ) as the C++ ops take them (InfoNCE: id 4, β = 1/τ); ``ops``: the namespace of the label ops."""

    @staticmethod
    def forward(ctx, zn, rn, labels, ref_labels, similarity, params, self_offset, ops):
        offset = 0 if rn is None else self_offset
        rows, stats = ops.oucl_label_fwd(
            *_op_inputs(zn, rn, labels, ref_labels), offset, SIMILARITY_IDS[similarity], *params
        )
        ctx.save_for_backward(zn, rn, labels, ref_labels, stats)
        ctx.similarity, ctx.params, ctx.self_offset, ctx.ops = similarity, params, offset, ops
        valid = stats[:, 4] > 0
        ctx.mark_non_differentiable(valid)
        return rows, valid

    @staticmethod
    def backward(ctx, grad_rows, _grad_valid):
        zn, rn, labels, ref_labels, stats = ctx.saved_tensors
        if torch.is_grad_enabled():
            # A differentiable gradient was asked for: recompute it with PyTorch ops.
            rows = _rows_score_mode(zn, rn, labels, ref_labels, ctx.similarity, ctx.params, ctx.self_offset, ctx.ops)
            return _needed_grads(ctx, rows, grad_rows, 6)
        g_z, g_r = ctx.ops.oucl_label_bwd(
            grad_rows.contiguous(), *_op_inputs(zn, rn, labels, ref_labels), stats, ctx.self_offset,
            SIMILARITY_IDS[ctx.similarity], *ctx.params, _ref_grad(ctx, rn),
        )
        if rn is None:
            return g_z + g_r, None, None, None, None, None, None, None
        return g_z, g_r if ctx.needs_input_grad[1] else None, None, None, None, None, None, None


def _ref_grad(ctx, rn) -> bool:
    """Whether the backward needs ∂/∂(reference rows): without a reference set they are zn itself; a
    constant reference set (a memory bank) skips that half of the backward's GEMMs."""
    return rn is None or ctx.needs_input_grad[1]


def _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, reduction, self_offset, ref_unit, ops):
    rows, valid = _LabelLoss.apply(*_normalized(emb, labels, ref_emb, ref_labels, ref_unit), similarity, params,
                                   self_offset, ops)
    return reference.reduce_rows(rows, valid, reduction, emb.dtype)


def oucl_embeddings_cpp(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                        ref_labels: Optional[Tensor] = None, *, similarity: str, reduction: str, form: str,
                        beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                        self_offset: Optional[int] = None, ref_unit: bool = False, ops=CPP_OPS) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.oucl_embeddings`, on the fused label ops of ``ops``
    (the C++ kernels, or the CUDA ones for CUDA tensors). ``ref_unit``: the rows of ``ref_emb`` are unit
    vectors already (a memory bank keeps them so) and are not copied normalized."""
    params = (FORM_IDS[form], float(beta), float(gamma_pos), float(gamma_neg), float(margin), float(lam))
    offset = -1 if self_offset is None else int(self_offset)
    return _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, reduction, offset, ref_unit, ops)


def info_nce_embeddings_cpp(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                            ref_labels: Optional[Tensor] = None, *, temperature: float, similarity: str,
                            reduction: str, self_offset: Optional[int] = None, ops=CPP_OPS) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.info_nce_embeddings`, on the fused label ops of ``ops``."""
    params = (INFONCE_ID, 1.0 / float(temperature), 0.0, 0.0, 0.0, 0.0)
    offset = -1 if self_offset is None else int(self_offset)
    return _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, reduction, offset, False, ops)


class _MarginLabel(torch.autograd.Function):
    """(zn [B,D], rn [M,D] or None) -> (p_min [B], n_max [B], valid [B]) over label-mode scores; the gradient
    goes to the entries attaining the extremum, shared equally among ties (as torch.amin/amax share it)."""

    @staticmethod
    def forward(ctx, zn, rn, labels, ref_labels, similarity, ops):
        _, stats = ops.oucl_label_fwd(
            *_op_inputs(zn, rn, labels, ref_labels), 0 if rn is None else -1, SIMILARITY_IDS[similarity],
            MARGIN_ID, 1.0, 0.0, 0.0, 0.0, 0.0,
        )
        ctx.save_for_backward(zn, rn, labels, ref_labels, stats)
        ctx.similarity, ctx.ops = similarity, ops
        valid = stats[:, 4] > 0
        ctx.mark_non_differentiable(valid)
        return stats[:, 0].clone(), stats[:, 1].clone(), valid

    @staticmethod
    def backward(ctx, g_min, g_max, _g_valid):
        zn, rn, labels, ref_labels, stats = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Differentiable path: amin/amax over the materialized scores (B×M memory for that call).
            scores = reference._apply_similarity(zn @ (zn if rn is None else rn).T, ctx.similarity)
            pm, nm = _label_masks(zn, rn, labels, ref_labels)
            inf = torch.full((), float("inf"), dtype=scores.dtype, device=scores.device)
            p_min = torch.where(pm, scores, inf).amin(1)
            n_max = torch.where(nm, scores, -inf).amax(1)
            valid = stats[:, 4] > 0
            outs = [torch.where(valid, p_min, 0 * p_min), torch.where(valid, n_max, 0 * n_max)]
            return _needed_grads(ctx, outs, (g_min, g_max), 4)
        g_z, g_r = ctx.ops.oucl_label_bwd(
            torch.stack([g_min, g_max], 1).contiguous(), *_op_inputs(zn, rn, labels, ref_labels), stats,
            0 if rn is None else -1, SIMILARITY_IDS[ctx.similarity], MARGIN_ID, 1.0, 0.0, 0.0, 0.0, 0.0,
            _ref_grad(ctx, rn),
        )
        if rn is None:
            return g_z + g_r, None, None, None, None, None
        return g_z, g_r if ctx.needs_input_grad[1] else None, None, None, None, None


def margin_statistics_embeddings_cpp(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                                     ref_labels: Optional[Tensor] = None, *, similarity: str, ops=CPP_OPS):
    """Same contract as :func:`metaug_fast.reference.margin_statistics_embeddings`, on the fused label ops
    of ``ops``."""
    p_min, n_max, valid = _MarginLabel.apply(*_normalized(emb, labels, ref_emb, ref_labels), similarity, ops)
    return sigmas(p_min, n_max, valid, emb.dtype)


def pairwise_similarity_cpp(a: Tensor, b: Tensor, *, similarity: str) -> Tensor:
    """d(a_i, b_j) ``[B,M]`` in ``a.dtype``: normalization, then one ATen GEMM with the similarity's affine
    map folded in (``addmm`` with α = 1/2 and a broadcast 1/2 for the shifted cosine). Differentiable to
    any order by autograd."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    zn, rn = F.normalize(a.to(acc), dim=1), F.normalize(b.to(acc), dim=1)
    if similarity == "cosine":
        return (zn @ rn.T).to(a.dtype)
    return torch.addmm(zn.new_full((), 0.5), zn, rn.T, alpha=0.5).to(a.dtype)
