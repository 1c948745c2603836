"""Label mode and pairwise similarity on the Triton backend (kernels/oucl_label.py, kernels/similarity.py).

The autograd Function takes the raw embeddings and their inverse norms ``iz = 1/max(‖e‖, ε)`` (computed
here with PyTorch ops, so autograd differentiates the normalization at every order) and returns per-row
losses, or the row extrema for margin statistics. Its backward runs the fused backward kernels; when a
graph of the backward is requested (``create_graph=True``, the MetAug meta step) the same backward kernels
run inside the C++ path's _LabelBackward Function, whose backward (the second derivative) runs the Triton
score-mode kernels over row chunks of the scores: exact, and never B×M.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..chunked import _combine
from .margins import MARGIN_ID, sigmas
from .oucl_label import SIMILARITY_IDS, _LabelBackward
from .oucl_score import FORM_IDS, INFONCE_ID, TRITON_OPS

_EPS = 1e-12  # F.normalize's


def _merge_lse(run_max: Tensor, total: Tensor):
    """(shift, log_sum) ``[B]`` from per-split running maxima and sums ``[splits, B]`` (the same online
    log-sum-exp merge as the chunked reference path)."""
    shift, merged = _combine(run_max.T, total.T)
    return shift, torch.log(merged)


def _merge_extremum(best: Tensor, ties: Tensor, nan: Tensor, minimum: bool):
    value = best.amin(0) if minimum else best.amax(0)
    count = torch.where(best == value, ties, torch.zeros_like(ties)).sum(0)
    has_nan = nan.sum(0) > 0
    return torch.where(has_nan, torch.full_like(value, float("nan")), value), torch.where(has_nan, torch.ones_like(count), count)


def _forward(e, iz, r, ir, labels, ref_labels, params, sim_id, self_offset):
    """(output, stats [B, 5] in the C++ ops' layout): output = rows [B], or [B, 2] extrema for margins."""
    from ..kernels import oucl_label as K
    from ..kernels.oucl_score import cfg_tensor

    form = params[0]
    cfg = cfg_tensor(params, iz.dtype, e.device)
    B = e.shape[0]
    stats = torch.zeros(B, 5, dtype=iz.dtype, device=e.device)
    if B == 0:
        return (torch.zeros(B, 2) if form == MARGIN_ID else torch.zeros(B)).to(stats), stats
    part = K.label_partials(e, iz, r, ir, labels, ref_labels, cfg, self_offset, sim_id, form)
    if form == MARGIN_ID:
        p_min, ties_p = _merge_extremum(part[..., 0], part[..., 1], part[..., 4], True)
        n_max, ties_n = _merge_extremum(part[..., 2], part[..., 3], part[..., 5], False)
        stats = torch.stack([p_min, n_max, ties_p, ties_n, ((ties_p > 0) & (ties_n > 0)).to(p_min)], 1)
        return torch.stack([p_min, n_max], 1), stats
    n_pos, n_neg = part[..., 4].sum(0), part[..., 5].sum(0)
    valid = (n_pos > 0) & (n_neg > 0)
    zero = torch.zeros_like(n_pos)
    if form == FORM_IDS["hinge"]:
        arg = part[..., 3].sum(0) - part[..., 1].sum(0) + params[5]
        rows = torch.where(torch.isnan(arg) | (arg > 0), arg, zero)
        stats = torch.stack([arg, zero, zero, zero, valid.to(arg)], 1)
    elif form == INFONCE_ID:
        c_shift, c_log = _merge_lse(part[..., 2], part[..., 3])
        second = K.label_partials(e, iz, r, ir, labels, ref_labels, cfg, self_offset, sim_id, form, sweep=1,
                                  c=(c_shift + c_log).contiguous())
        rows = second[..., 0].sum(0) / n_pos.clamp(min=1)
        stats = torch.stack([c_shift, c_log, second[..., 1].sum(0), n_pos, valid.to(n_pos)], 1)
    else:
        a_shift, a_log = _merge_lse(part[..., 0], part[..., 1])
        c_shift, c_log = _merge_lse(part[..., 2], part[..., 3])
        rows = reference._softplus(a_shift + a_log + c_shift + c_log) / params[1]
        stats = torch.stack([a_shift, a_log, c_shift, c_log, valid.to(n_pos)], 1)
    return torch.where(valid, rows, zero), stats


def _normalized(x: Tensor, inv_norm: Tensor) -> Tensor:
    return x.to(inv_norm.dtype) * inv_norm[:, None]


class _TritonLabel(torch.autograd.Function):
    """(e [B,D], iz [B], r [M,D], ir [M]) -> (output, valid [B]); output = per-row losses [B], or
    (p_min, n_max) [B, 2] for margin statistics (``params[0] == MARGIN_ID``). Without a reference set
    the caller passes (e, iz) twice and ``self_offset = 0``: autograd sums the two gradient parts."""

    @staticmethod
    def forward(ctx, e, iz, r, ir, labels, ref_labels, params, sim_id, self_offset):
        out, stats = _forward(e, iz, r, ir, labels, ref_labels, params, sim_id, self_offset)
        ctx.save_for_backward(e, iz, r, ir, labels, ref_labels, stats)
        ctx.params, ctx.sim_id, ctx.self_offset = params, sim_id, self_offset
        ctx.self_mode = e is r
        valid = stats[:, 4] > 0
        ctx.mark_non_differentiable(valid)
        return out, valid

    @staticmethod
    def backward(ctx, grad_out, _grad_valid):
        e, iz, r, ir, labels, ref_labels, stats = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_grads(ctx, grad_out)
        from ..kernels import oucl_label as K
        from ..kernels.oucl_score import cfg_tensor

        cfg = cfg_tensor(ctx.params, iz.dtype, e.device)
        need_ref = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        de, diz, dr, dir_ = K.label_bwd(grad_out, stats, e, iz, r, ir, labels, ref_labels, cfg, ctx.self_offset,
                                        ctx.sim_id, ctx.params[0], need_ref)
        de = de.to(e.dtype)
        dr = None if dr is None else dr.to(r.dtype)
        return de, diz, dr, dir_, None, None, None, None, None


def _label_bwd_normalized(grad_rows, zn, rn, labels, ref_labels, stats, self_offset, sim_id, form, beta, gamma_pos,
                          gamma_neg, margin, lam, ref_grad):
    """The Triton label backward on normalized rows (inverse norms 1) under the C++ op's signature, so that
    the chunked second derivative of the C++ path (oucl_label._LabelBackward) drives it."""
    from ..kernels import oucl_label as K
    from ..kernels.oucl_score import cfg_tensor

    params = (form, beta, gamma_pos, gamma_neg, margin, lam)
    ones_z, ones_r = zn.new_ones(zn.shape[0]), rn.new_ones(rn.shape[0])
    if form == MARGIN_ID:
        # The backward finds the extrema's ties by equality with the forward's tiles: those came from the raw
        # rows and their inverse norms, so the extrema are found again from these inputs.
        _, stats = _forward(zn, ones_z, rn, ones_r, labels, ref_labels, params, sim_id, self_offset)
    dz, _, dr, _ = K.label_bwd(grad_rows, stats, zn, ones_z, rn, ones_r, labels, ref_labels,
                               cfg_tensor(params, zn.dtype, zn.device), self_offset, sim_id, form, ref_grad)
    return dz, dr if ref_grad else zn.new_zeros(0, zn.shape[1])


class _TritonLabelOps:
    """The Triton score-mode launchers plus the label backward on normalized rows: what the chunked second
    derivative needs, under the C++ ops' names."""

    oucl_label_bwd = staticmethod(_label_bwd_normalized)

    def __getattr__(self, name):
        return getattr(TRITON_OPS, name)


_SIMILARITY_NAMES = {v: k for k, v in SIMILARITY_IDS.items()}


def _differentiable_grads(ctx, grad_out):
    """The gradient as a Function that can be differentiated again (the MetAug meta step): the fused backward
    on the normalized rows en = e·iz, rn = r·ir, whose own backward runs the score-mode kernels over row
    chunks of the scores (never B×M). The chain to (e, iz) and (r, ir) is written out: iz depends on e, so
    asking autograd for ∂/∂e directly would also count the path through iz, which the caller adds itself."""
    e, iz, r, ir, labels, ref_labels, stats = ctx.saved_tensors
    en = _normalized(e, iz)
    rn = en if ctx.self_mode else _normalized(r, ir)
    ref_grad = ctx.self_mode or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    g_en, g_rn = _LabelBackward.apply(grad_out.contiguous(), en, rn, labels, ref_labels, stats,
                                      _SIMILARITY_NAMES[ctx.sim_id], ctx.params, ctx.self_offset, _TritonLabelOps(),
                                      ref_grad)
    if ctx.self_mode:
        # (e, iz) appear twice among the inputs: their whole gradient goes to the first pair.
        g_en = g_en + g_rn
        return g_en * iz[:, None], (g_en * e.to(iz.dtype)).sum(1), None, None, None, None, None, None, None
    r_grads = (g_rn * ir[:, None], (g_rn * r.to(ir.dtype)).sum(1)) if ref_grad else (None, None)
    return (g_en * iz[:, None], (g_en * e.to(iz.dtype)).sum(1)) + r_grads + (None,) * 5


def _inverse_norm(x: Tensor) -> Tensor:
    return 1.0 / torch.linalg.vector_norm(reference._acc(x), dim=1).clamp(min=_EPS)


def _run(emb, labels, ref_emb, ref_labels, params, similarity, self_offset):
    """(output, valid) of the Triton label Function for the public contract's arguments."""
    iz = _inverse_norm(emb)
    if ref_emb is None:
        r, ir, rl, offset = emb, iz, labels.long(), 0
    else:
        r, ir, rl, offset = ref_emb, _inverse_norm(ref_emb), ref_labels.long(), self_offset
    return _TritonLabel.apply(emb, iz, r, ir, labels.long(), rl, params, SIMILARITY_IDS[similarity], offset)


def oucl_embeddings_triton(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                           ref_labels: Optional[Tensor] = None, *, similarity: str, reduction: str, form: str,
                           beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                           self_offset: Optional[int] = None) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.oucl_embeddings`, fused in Triton."""
    params = (FORM_IDS[form], float(beta), float(gamma_pos), float(gamma_neg), float(margin), float(lam))
    rows, valid = _run(emb, labels, ref_emb, ref_labels, params, similarity, -1 if self_offset is None else self_offset)
    return reference.reduce_rows(rows, valid, reduction, emb.dtype)


def info_nce_embeddings_triton(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                               ref_labels: Optional[Tensor] = None, *, temperature: float, similarity: str,
                               reduction: str, self_offset: Optional[int] = None) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.info_nce_embeddings`, fused in Triton."""
    params = (INFONCE_ID, 1.0 / float(temperature), 0.0, 0.0, 0.0, 0.0)
    rows, valid = _run(emb, labels, ref_emb, ref_labels, params, similarity, -1 if self_offset is None else self_offset)
    return reference.reduce_rows(rows, valid, reduction, emb.dtype)


def margin_statistics_embeddings_triton(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                                        ref_labels: Optional[Tensor] = None, *, similarity: str):
    """Same contract as :func:`metaug_fast.reference.margin_statistics_embeddings`, fused in Triton."""
    extrema, valid = _run(emb, labels, ref_emb, ref_labels, (MARGIN_ID, 1.0, 0.0, 0.0, 0.0, 0.0), similarity, -1)
    return sigmas(extrema[:, 0], extrema[:, 1], valid, emb.dtype)


class _TritonSimilarity(torch.autograd.Function):
    """(e, iz, r, ir) -> d(e_i, r_j) ``[B, M]``; the backward is PyTorch GEMMs (differentiable again)."""

    @staticmethod
    def forward(ctx, e, iz, r, ir, sim_id, out_dtype):
        from ..kernels.similarity import pairwise_similarity

        ctx.save_for_backward(e, iz, r, ir)
        ctx.sim_id = sim_id
        return pairwise_similarity(e, iz, r, ir, sim_id, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        e, iz, r, ir = ctx.saved_tensors
        acc = iz.dtype
        g = grad.to(acc) * (0.5 if ctx.sim_id == 0 else 1.0)
        en, rn = e.to(acc) * iz[:, None], r.to(acc) * ir[:, None]
        d_en, d_rn = g @ rn, g.T @ en
        return ((d_en * iz[:, None]).to(e.dtype), (d_en * e.to(acc)).sum(1), (d_rn * ir[:, None]).to(r.dtype),
                (d_rn * r.to(acc)).sum(1), None, None)


def pairwise_similarity_triton(a: Tensor, b: Tensor, *, similarity: str) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.pairwise_similarity`: one Triton GEMM with the
    normalization and the affine map in its epilogue."""
    return _TritonSimilarity.apply(a, _inverse_norm(a), b, _inverse_norm(b), SIMILARITY_IDS[similarity], a.dtype)
