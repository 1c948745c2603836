"""Label mode and pairwise similarity on the Triton backend (metaug_fast/kernels/label.py, similarity.py).

The autograd Function takes the raw embeddings and their inverse norms ``iz = 1/max(‖e‖, ε)`` (computed
here with PyTorch ops, so autograd differentiates the normalization at every order) and returns per-row
losses, or the row extrema for margin statistics. Its backward runs the fused backward kernels; when a
graph of the backward is requested (``create_graph=True``, the MetAug meta step) the same backward kernels
run inside the C++ path's _LabelBackward Function, whose backward (the second derivative) runs the Triton
score-mode kernels over row chunks of the scores: exact, and never B×M.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..chunked import merge_lse
from ..contract import N_STATS, SIMILARITIES, Form, LossParams, OpArgs, Part, normalizes, stats_of
from .label import _LabelBackward, info_nce_setup, reduce_both, symmetric_setup, with_valid, with_valids
from .margins import sigmas
from .score import TRITON_OPS

_EPS = 1e-12  # F.normalize's


def _merge_lse(run_max: Tensor, total: Tensor):
    """(shift, log_sum) ``[B]`` from per-split running maxima and sums ``[splits, B]``."""
    return merge_lse(run_max.T, torch.log(total.T))


def _merge_extremum(best: Tensor, ties: Tensor, nan: Tensor, minimum: bool):
    value = best.amin(0) if minimum else best.amax(0)
    count = torch.where(best == value, ties, torch.zeros_like(ties)).sum(0)
    has_nan = nan.sum(0) > 0
    nan = torch.full_like(value, float("nan"))
    return torch.where(has_nan, nan, value), torch.where(has_nan, torch.ones_like(count), count)


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


def _forward(e, iz, r, ir, labels, ref_labels, params, sim_id, self_offset):
    """(output, stats [B, N_STATS] in the C++ ops' layout): output = rows [B], or [B, 2] extrema for margins.
    ``labels``, ``ref_labels``: int32 class ids (:func:`dense_labels`)."""
    from ..kernels import label as K

    form = params[0]
    B = e.shape[0]
    stats = torch.zeros(B, N_STATS, dtype=iz.dtype, device=e.device)
    if B == 0:
        return (torch.zeros(B, 2) if form == Form.MARGIN else torch.zeros(B)).to(stats), stats
    part = K.label_partials(e, iz, r, ir, labels, ref_labels, *params, self_offset, sim_id)
    if form == Form.MARGIN:
        p_min, ties_p = _merge_extremum(part[..., Part.P_MIN], part[..., Part.TIES_POS], part[..., Part.NAN_POS], True)
        n_max, ties_n = _merge_extremum(part[..., Part.N_MAX], part[..., Part.TIES_NEG], part[..., Part.NAN_NEG], False)
        stats = stats_of(p_min=p_min, n_max=n_max, ties_pos=ties_p, ties_neg=ties_n,
                         valid=((ties_p > 0) & (ties_n > 0)).to(p_min))
        return torch.stack([p_min, n_max], 1), stats
    n_pos, n_neg = _pair_counts(labels, ref_labels, self_offset, iz.dtype)
    valid = (n_pos > 0) & (n_neg > 0)
    zero = torch.zeros_like(n_pos)
    if form == Form.HINGE:
        arg = part[..., Part.NEG_SUM].sum(0) - part[..., Part.POS_SUM].sum(0) + params.lam
        rows = torch.where(torch.isnan(arg) | (arg > 0), arg, zero)
        stats = stats_of(hinge_arg=arg, valid=valid.to(arg))
    elif form == Form.INFONCE:
        c_shift, c_log = _merge_lse(part[..., Part.NEG_MAX], part[..., Part.NEG_SUM])
        softplus_sum, sigmoid_sum = K.label_positive_sums(e, iz, r, ir, labels, ref_labels, *params, self_offset,
                                                          sim_id, (c_shift + c_log).contiguous()).unbind(0)
        rows = softplus_sum / n_pos.clamp(min=1)
        stats = stats_of(nce_shift=c_shift, nce_log_sum=c_log, nce_sigmoid_sum=sigmoid_sum, nce_n_pos=n_pos,
                         valid=valid.to(n_pos))
    else:
        a_shift, a_log = _merge_lse(part[..., Part.POS_MAX], part[..., Part.POS_SUM])
        c_shift, c_log = _merge_lse(part[..., Part.NEG_MAX], part[..., Part.NEG_SUM])
        rows = reference._softplus(a_shift + a_log + c_shift + c_log) / params.beta
        stats = stats_of(pos_shift=a_shift, pos_log_sum=a_log, neg_shift=c_shift, neg_log_sum=c_log,
                         valid=valid.to(n_pos))
    return torch.where(valid, rows, zero), stats


def _normalized(x: Tensor, inv_norm: Tensor) -> Tensor:
    return x.to(inv_norm.dtype) * inv_norm[:, None]


class _TritonLabel(torch.autograd.Function):
    """(e [B,D], r [M,D] or None) -> (output, valid [B]); output = per-row losses [B], or (p_min, n_max)
    [B, 2] for margin statistics (``params[0] == Form.MARGIN``). Without a reference set (r None) the rows
    score against themselves with ``self_offset = 0``. The inverse norms are taken inside, and the gradient
    through them is added to the kernels' gradient in the accumulation dtype before the one cast to the
    input dtype: the two parts nearly cancel (the normalization removes the radial component), so casting
    each to fp16 first would lose most of the result's digits."""

    @staticmethod
    def forward(ctx, e, r, labels, ref_labels, params, sim_id, self_offset, unit, ref_unit):
        iz, ir = _inverse_norms(e, r, unit, ref_unit)
        out, stats = _forward(e, iz, e if r is None else r, ir, labels, ref_labels, params, sim_id, self_offset)
        ctx.save_for_backward(e, r, labels, ref_labels, stats, iz, ir)
        ctx.params, ctx.sim_id, ctx.self_offset = params, sim_id, self_offset
        ctx.unit, ctx.ref_unit = unit, ref_unit
        return with_valid(ctx, out, stats)

    @staticmethod
    def backward(ctx, grad_out, _grad_valid):
        if torch.is_grad_enabled():
            return _differentiable_grads(ctx, grad_out)
        from ..kernels import label as K

        e, r, labels, ref_labels, stats, iz, ir = ctx.saved_tensors
        self_mode = r is None
        need_ref = self_mode or ctx.needs_input_grad[1]
        de, diz, dr, dir_ = K.label_bwd(grad_out, stats, e, iz, e if self_mode else r, ir, labels, ref_labels,
                                        ctx.params, ctx.self_offset, ctx.sim_id, ctx.params[0], need_ref, self_mode)
        if self_mode:  # the rows are also the reference set: both parts belong to e
            if dr is not None:
                de, diz = de + dr, diz + dir_
            return (_through_norm(e, iz, de, diz, ctx.unit).to(e.dtype),) + (None,) * 8
        g_r = None
        if need_ref:
            g_r = _through_norm(r, ir, dr, dir_, ctx.ref_unit).to(r.dtype)
        return (_through_norm(e, iz, de, diz, ctx.unit).to(e.dtype), g_r) + (None,) * 7


def _through_norm(x: Tensor, inv: Tensor, d_direct: Tensor, d_inv: Tensor, unit: bool) -> Tensor:
    """∂L/∂x in the accumulation dtype from ∂L/∂x at fixed ``inv`` and ∂L/∂inv, ``inv = 1/max(‖x‖, ε)``:
    ∂inv/∂x = -inv³·x where the norm exceeds ε, 0 where the clamp holds it; ``unit``: inv is the constant 1
    (rows taken as they are). Differentiable (torch ops)."""
    if unit:
        return d_direct
    radial = torch.where(inv < 1.0 / _EPS, d_inv * inv**3, torch.zeros_like(inv))
    return d_direct - radial[:, None] * x.to(inv.dtype)


def _label_bwd_normalized(grad_rows, zn, rn, labels, ref_labels, stats, self_offset, sim_id, form, beta, gamma_pos,
                          gamma_neg, margin, lam, ref_grad):
    """The Triton label backward on normalized rows (inverse norms 1) under the C++ op's signature, so that
    the chunked second derivative of the C++ path (label._LabelBackward) drives it."""
    from ..kernels import label as K

    params = OpArgs(form, beta, gamma_pos, gamma_neg, margin, lam)
    ones_z, ones_r = zn.new_ones(zn.shape[0]), rn.new_ones(rn.shape[0])
    if form == Form.MARGIN:
        # The backward finds the extrema's ties by equality with the forward's tiles: those came from the raw
        # rows and their inverse norms, so the extrema are found again from these inputs.
        _, stats = _forward(zn, ones_z, rn, ones_r, labels, ref_labels, params, sim_id, self_offset)
    self_mode = rn is zn and self_offset == 0  # _differentiable_grads passes the same tensor
    dz, _, dr, _ = K.label_bwd(grad_rows, stats, zn, ones_z, rn, ones_r, labels, ref_labels,
                               params, self_offset, sim_id, form, ref_grad, self_mode)
    if not ref_grad:
        return dz, zn.new_zeros(0, zn.shape[1])
    return dz, torch.zeros_like(rn) if dr is None else dr  # self mode: the whole gradient is dz (the C++ contract)


class _TritonLabelOps:
    """The Triton score-mode launchers plus the label backward on normalized rows: what the chunked second
    derivative needs, under the C++ ops' names."""

    oucl_label_bwd = staticmethod(_label_bwd_normalized)

    def __getattr__(self, name):
        return getattr(TRITON_OPS, name)


# The op id's name for the chunked second derivative ("dot" shares the cosine's id and behaves alike there).
_SIMILARITY_NAMES = {int(v): k for k, v in reversed(list(SIMILARITIES.items()))}


def _differentiable_grads(ctx, grad_out):
    """The gradient as a Function that can be differentiated again (the MetAug meta step): the fused backward
    on the normalized rows en = e·iz, rn = r·ir, whose own backward runs the score-mode kernels over row
    chunks of the scores (never B×M), then the normalization's chain in torch ops (iz recomputed from e
    here, in grad mode, so that every order reaches it)."""
    e, r, labels, ref_labels, stats, _, _ = ctx.saved_tensors
    self_mode = r is None
    iz, ir = _inverse_norms(e, r, ctx.unit, ctx.ref_unit)
    en = _normalized(e, iz)
    rn = en if self_mode else _normalized(r, ir)
    ref_grad = self_mode or ctx.needs_input_grad[1]
    g_en, g_rn = _LabelBackward.apply(grad_out.contiguous(), en, rn, labels, ref_labels, stats,
                                      _SIMILARITY_NAMES[ctx.sim_id], ctx.params, ctx.self_offset, _TritonLabelOps(),
                                      ref_grad)
    if self_mode:
        g_en = g_en + g_rn
    g_e = _through_norm(e, iz, g_en * iz[:, None], (g_en * e.to(iz.dtype)).sum(1), ctx.unit).to(e.dtype)
    if self_mode or not ref_grad:
        return (g_e, None) + (None,) * 7
    g_r = _through_norm(r, ir, g_rn * ir[:, None], (g_rn * r.to(ir.dtype)).sum(1), ctx.ref_unit)
    return (g_e, g_r.to(r.dtype)) + (None,) * 7


def _inverse_norm(x: Tensor, unit: bool) -> Tensor:
    """1/max(‖x_i‖, ε) per row in the accumulation dtype, or ones for rows taken as they are (``unit``)."""
    if unit:
        return x.new_ones(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return 1.0 / torch.linalg.vector_norm(reference._acc(x), dim=1).clamp(min=_EPS)


def _inverse_norms(e: Tensor, r: Optional[Tensor], unit: bool, ref_unit: bool):
    """(iz [B], ir [M]) of the rows and the reference rows: ir is iz itself without a reference set; ones for
    rows taken as they are (``unit``: the rows; ``ref_unit``: the reference rows, unit vectors already, or
    the "dot" similarity). Torch ops: differentiable when grad mode is on."""
    iz = _inverse_norm(e, unit)
    return (iz, iz) if r is None else (iz, _inverse_norm(r, ref_unit))


def _run(emb, labels, ref_emb, ref_labels, params, similarity, self_offset, ref_unit=False, scale=None):
    """(output, valid) of the Triton label Function for the public contract's arguments; ``ref_unit``: the
    rows of ``ref_emb`` are unit vectors already (a memory bank), so their inverse norms are ones;
    ``scale``: the normalized rows times it, taken as they are (a temperature tensor,
    :func:`metaug_fast.reference.temperature_scale`)."""
    lab, rlab = dense_labels(labels, labels if ref_emb is None else ref_labels)
    offset = 0 if ref_emb is None else self_offset
    emb, ref_emb, similarity, unit = _scaled(emb, ref_emb, similarity, scale, ref_unit)
    return _TritonLabel.apply(emb, ref_emb, lab, rlab, params, SIMILARITIES[similarity], offset, unit,
                              ref_unit or unit)


def _scaled(emb, ref_emb, similarity: str, scale, ref_unit: bool = False):
    """(rows, reference rows, similarity, unit) as the Triton Functions take them: with a row ``scale``, the
    rows as the similarity takes them times it, under "dot" with unit inverse norms (``ref_unit``: the
    reference rows are unit vectors already); without, the inputs as they are, unit for "dot" only."""
    if scale is None:
        return emb, ref_emb, similarity, not normalizes(similarity)
    emb = reference._rows(emb, similarity) * scale
    if ref_emb is not None:
        ref_emb = (ref_emb.to(emb.dtype) if ref_unit else reference._rows(ref_emb, similarity)) * scale
    return emb, ref_emb, "dot", True


def oucl_embeddings_triton(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                           ref_labels: Optional[Tensor] = None, *, similarity: str, reduction: str, form: str,
                           beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                           self_offset: Optional[int] = None, ref_unit: bool = False) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.oucl_embeddings`, fused in Triton. ``ref_unit``: the rows
    of ``ref_emb`` are unit vectors already (a memory bank keeps them so)."""
    params = LossParams(form, beta, gamma_pos, gamma_neg, margin, lam).op_args()
    rows, valid = _run(emb, labels, ref_emb, ref_labels, params, similarity, -1 if self_offset is None else self_offset,
                       ref_unit)
    return reference.reduce_rows(rows, valid, reduction, emb.dtype)


def info_nce_embeddings_triton(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                               ref_labels: Optional[Tensor] = None, *, temperature, similarity: str,
                               reduction: str, average: str = "anchor", self_offset: Optional[int] = None) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.info_nce_embeddings`, fused in Triton."""
    params, scale, weights = info_nce_setup(temperature, similarity, average, labels, ref_labels, self_offset)
    rows, valid = _run(emb, labels, ref_emb, ref_labels, params, similarity, -1 if self_offset is None else self_offset,
                       scale=scale)
    return reference.reduce_rows(rows, valid, reduction, emb.dtype, weights)


class _TritonCross(torch.autograd.Function):
    """(e [B,D], r [M,D]) -> (rows [B], valid [B], rows' [M], valid' [M]): InfoNCE of each row of e against r
    and of each row of r against e (cross mode). The forward is one label-mode sweep per direction; the
    backward runs both directions at once (``label_cross_grads``: two recomputes of the tiles, not four).
    Under ``create_graph`` each direction takes its differentiable path (:func:`_differentiable_grads`)."""

    @staticmethod
    def forward(ctx, e, r, labels, ref_labels, params, sim_id, unit):
        iz, ir = _inverse_norms(e, r, unit, unit)
        rows_z, stats_z = _forward(e, iz, r, ir, labels, ref_labels, params, sim_id, -1)
        rows_r, stats_r = _forward(r, ir, e, iz, ref_labels, labels, params, sim_id, -1)
        ctx.save_for_backward(e, r, labels, ref_labels, stats_z, stats_r, iz, ir)
        ctx.params, ctx.sim_id, ctx.unit = params, sim_id, unit
        return with_valids(ctx, rows_z, stats_z, rows_r, stats_r)

    @staticmethod
    def backward(ctx, grad_z, _gvz, grad_r, _gvr):
        e, r, labels, ref_labels, stats_z, stats_r, iz, ir = ctx.saved_tensors
        if torch.is_grad_enabled():
            g_e, g_r = _differentiable_grads(_direction(ctx, e, r, labels, ref_labels, stats_z), grad_z)[:2]
            g_r2, g_e2 = _differentiable_grads(_direction(ctx, r, e, ref_labels, labels, stats_r), grad_r)[:2]
            return (g_e + g_e2, g_r + g_r2) + (None,) * 5
        from ..kernels import label as K

        de, diz, dr, dir_ = K.label_cross_grads(grad_z.contiguous(), stats_z, grad_r.contiguous(), stats_r, e, iz, r,
                                                ir, labels, ref_labels, *ctx.params, ctx.sim_id)
        g_e = _through_norm(e, iz, de, diz, ctx.unit).to(e.dtype)
        return (g_e, _through_norm(r, ir, dr, dir_, ctx.unit).to(r.dtype)) + (None,) * 5


def _direction(ctx, e, r, labels, ref_labels, stats):
    """The saved state of one direction of :class:`_TritonCross` as :func:`_differentiable_grads` reads a
    :class:`_TritonLabel` context (rows ``e`` against ``r``, both needing gradients)."""
    return SimpleNamespace(saved_tensors=(e, r, labels, ref_labels, stats, None, None), unit=ctx.unit,
                           ref_unit=ctx.unit, params=ctx.params, sim_id=ctx.sim_id, self_offset=-1,
                           needs_input_grad=(True, True))


def symmetric_info_nce_triton(emb: Tensor, ref_emb: Tensor, labels: Tensor, ref_labels: Tensor, *, temperature,
                              similarity: str, reduction: str, average: str = "anchor") -> Tensor:
    """Same contract as :func:`metaug_fast.reference.symmetric_info_nce`, in Triton: the two directions'
    backward in one pass of the backward kernels (:class:`_TritonCross`)."""
    params, scale, w_z, w_r = symmetric_setup(temperature, similarity, average, labels, ref_labels)
    lab, rlab = dense_labels(labels, ref_labels)
    dtype = emb.dtype
    emb, ref_emb, similarity, unit = _scaled(emb, ref_emb, similarity, scale)
    outputs = _TritonCross.apply(emb, ref_emb, lab, rlab, params, SIMILARITIES[similarity], unit)
    return reduce_both(*outputs, reduction, dtype, w_z, w_r)


def margin_statistics_embeddings_triton(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                                        ref_labels: Optional[Tensor] = None, *, similarity: str):
    """Same contract as :func:`metaug_fast.reference.margin_statistics_embeddings`, fused in Triton."""
    extrema, valid = _run(emb, labels, ref_emb, ref_labels, LossParams.margins(), similarity, -1)
    return sigmas(extrema[:, 0], extrema[:, 1], valid, emb.dtype)


class _TritonSimilarity(torch.autograd.Function):
    """(e, iz, r, ir) -> d(e_i, r_j) ``[B, M]``; the backward is the IEEE GEMM of kernels/matmul.py, which
    torch's TF32 flags do not change, differentiable again."""

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
        from ..kernels.matmul import mm

        d_en, d_rn = mm(g, rn, None, 1.0, 0.0), mm(g.T, en, None, 1.0, 0.0)
        return ((d_en * iz[:, None]).to(e.dtype), (d_en * e.to(acc)).sum(1), (d_rn * ir[:, None]).to(r.dtype),
                (d_rn * r.to(acc)).sum(1), None, None)


def pairwise_similarity_triton(a: Tensor, b: Tensor, *, similarity: str) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.pairwise_similarity`: one Triton GEMM with the
    normalization and the affine map in its epilogue."""
    unit = not normalizes(similarity)
    return _TritonSimilarity.apply(a, _inverse_norm(a, unit), b, _inverse_norm(b, unit), SIMILARITIES[similarity],
                                   a.dtype)
