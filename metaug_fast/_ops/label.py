"""Label-mode OUCL and InfoNCE on the C++ and CUDA backends, fused: ``torch.ops.metaug_fast.oucl_label_{fwd,bwd}``
(csrc/cpu/label.cpp, csrc/cuda/label.cu) tile the similarity matrix through ATen GEMMs and never store
B×M. The Functions take the ops' namespace as ``ops``, so the same code also drives the CUDA kernels under
the SIMT emulator (``torch.ops.metaug_fast_simt``, tests/test_cuda_simt.py).

The L2 normalization stays in PyTorch (so autograd handles its Jacobian at every order); the fused
Function maps normalized ``zn [B,D]`` and ``rn [M,D]`` (or ``zn`` itself) to per-row losses. Its
backward runs the fused backward op; when a graph of the backward is requested (``create_graph=True``, the
MetAug meta step), that op is wrapped in a Function of its own whose backward, the second derivative, runs
the score-mode backward and double-backward ops over row chunks of the scores: exact, and B×M is never
stored (one chunk of about a million scores at a time). The C++ backend takes one label-aware kernel over
the chunks instead, and in self mode the symmetric tiles (oucl_label_self_bwd_bwd).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import reference
from ..contract import SIMILARITIES, Form, LossParams, Stat, normalizes, slope
from .margins import sigmas
from .score import CPP_OPS, hinge_grad_grad_rows, third_order_error

# The forms of torch.ops.metaug_fast.oucl_label_rows_bwd_bwd (the hinge's Hessian is zero, margins are
# piecewise linear: both keep the score-mode path).
_ROW_HVP_FORMS = (Form.SQUARED, Form.WEIGHTED, Form.CIRCLE, Form.INFONCE)


def _label_masks(labels, ref_labels, self_offset, row0):
    """Positive and negative masks ``[c,M]`` of rows ``row0 .. row0 + c`` (``labels`` holds those rows' labels);
    with ``self_offset >= 0`` the pair (i, i + self_offset) is neither."""
    pm = labels[:, None] == ref_labels[None, :]
    nm = ~pm
    if self_offset >= 0:
        rows = torch.arange(labels.shape[0], device=labels.device)
        pm[rows, rows + row0 + self_offset] = False
    return pm, nm


# Scores per chunk of rows in the second-derivative path. On the CPU about 8 MiB per [rows, M] buffer in
# fp64; a GPU takes 1/512 of its memory per buffer, up to _GPU_CHUNK_SCORES, so that each chunk's GEMMs and
# kernels fill it (a chunk holds about six such buffers).
_CHUNK_SCORES = 1 << 20
_GPU_CHUNK_SCORES = 1 << 26


def chunk_scores(device: torch.device) -> int:
    """Scores per row chunk of the second-derivative path on ``device`` (read without synchronizing)."""
    if device.type != "cuda":
        return _CHUNK_SCORES
    total = torch.cuda.get_device_properties(device).total_memory
    return max(_CHUNK_SCORES, min(_GPU_CHUNK_SCORES, total // 512))


def _is_self(zn, rn, labels, ref_labels, self_offset) -> bool:
    """Whether the label ops see self mode (as csrc/oucl_host.h's is_self): the reference rows and labels are
    the anchors' own tensors and each anchor's own pair is excluded."""
    return (self_offset == 0 and zn.data_ptr() == rn.data_ptr() and zn.shape == rn.shape
            and labels.data_ptr() == ref_labels.data_ptr())


def _score_chunks(zn, rn, labels, ref_labels, similarity, self_offset, masks=True, mm=None):
    """(rows, S [c,M], pos mask, neg mask) for consecutive chunks of rows of the label-mode scores, about
    chunk_scores(device) at a time: a row's loss depends on its own row of S only, so row chunks are exact
    and only one chunk of the B×M scores exists at a time. ``rn``/``ref_labels`` are the op inputs (zn and
    labels themselves without a reference set, with ``self_offset`` 0); ``masks`` False: the masks are None;
    ``mm``: the GEMM (:func:`_gemm`). Nothing here waits for the device: the chunks are cut from the shapes."""
    B, M = zn.shape[0], rn.shape[0]
    step = max(1, chunk_scores(zn.device) // max(M, 1))
    for r0 in range(0, B, step):
        rows = slice(r0, min(B, r0 + step))
        S = _similarities(zn[rows], rn, similarity, mm)
        pm, nm = _label_masks(labels[rows], ref_labels, self_offset, r0) if masks else (None, None)
        yield rows, S, pm, nm


def _similarities(z: Tensor, rn: Tensor, similarity: str, mm=None) -> Tensor:
    """d(z_i, rn_j) ``[c, M]`` of rows as the similarity takes them, its affine map folded into the GEMM
    (no pass of its own over the chunk); ``mm``: the GEMM (:func:`_gemm`), torch's by default."""
    shifted = similarity == "shifted_cosine"
    return (mm or _torch_mm)(z, rn.T, None, 0.5 if shifted else 1.0, 0.5 if shifted else 0.0)


def _torch_mm(a: Tensor, b: Tensor, c: Optional[Tensor] = None, alpha: float = 1.0, offset: float = 0.0) -> Tensor:
    """``offset + alpha·a·b (+ c)`` by torch: the CPU's GEMM, whose fp32 stays IEEE under torch's matmul
    precision flags unless the CPU has bf16 matrix units and the precision is set to "medium"."""
    if c is None and offset == 0.0:
        return a @ b if alpha == 1.0 else torch.mm(a, b).mul_(alpha)
    base = a.new_full((), offset) if c is None else c if offset == 0.0 else c + offset
    return torch.addmm(base, a, b, alpha=alpha)


def _gemm(ops, device: torch.device):
    """The GEMM of the second derivative's chunks, as ``mm(a, b, c, alpha, offset)``: in IEEE fp32/fp64
    whatever torch's global flags say. On CUDA, for every backend, Triton's (kernels/matmul.py): torch.mm
    there follows allow_tf32 / set_float32_matmul_precision("high"), whose TF32 error (1e-3 relative) is the
    whole tolerance of an fp32 Hessian-vector product. The Triton ops take it on the CPU too (the
    interpreter's tests); the C++ ops there take torch's."""
    if device.type == "cuda" or getattr(ops, "triton_gemm", False):
        from ..kernels.matmul import mm

        return mm
    return _torch_mm


def _op_inputs(zn, rn, labels, ref_labels):
    """(zn, reference rows, labels, reference labels) as the label ops take them: without a reference set
    the reference is zn itself."""
    return (zn, zn, labels, labels) if rn is None else (zn, rn, labels, ref_labels)


def _normalized(emb, labels, ref_emb, ref_labels, similarity, ref_unit=False, scale=None):
    """The rows the similarity takes (L2-normalized, or as given for "dot") in the accumulation dtype (fp32
    for fp16/bf16), times ``scale`` when given, and int64 labels; ``ref_unit``: the reference rows are unit
    vectors already and are used as they are (no M×D copy)."""
    acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
    unit = not normalizes(similarity)
    zn = emb.to(acc) if unit else F.normalize(emb.to(acc), dim=1)
    rn = None if ref_emb is None else ref_emb.to(acc) if ref_unit or unit else F.normalize(ref_emb.to(acc), dim=1)
    if scale is not None:
        zn, rn = zn * scale, None if rn is None else rn * scale
    return zn, rn, labels.long(), None if ref_labels is None else ref_labels.long()


MARGIN_PARAMS = LossParams.margins()


class _LabelDoubleBackward(torch.autograd.Function):
    """The second derivative of label mode. The backward maps (grad_rows, zn, rn) to g_z = a·G·rn and
    g_r = a·Gᵀ·zn, where G = ∂(Σ_i grad_i ℓ_i)/∂S and a is the similarity's slope; this is its
    vector-Jacobian product for cotangents (v_z, v_r). With U = a·(v_z·rnᵀ + zn·v_rᵀ), the change of S along
    the cotangents: ∂/∂grad_i = Σ_j ∂ℓ_i/∂S_ij · U_ij, and with W = ∂⟨G, U⟩/∂S (each row's Hessian applied to
    its row of U, the score-mode double-backward op) ∂/∂zn = a·(W·rn + G·v_r), ∂/∂rn = a·(Wᵀ·zn + Gᵀ·v_z).
    Computed over row chunks of S and U, or, in self mode on the C++ backend, over the symmetric tiles of
    both (oucl_label_self_bwd_bwd): never B×M. A third derivative raises."""

    @staticmethod
    def forward(ctx, grad_rows, zn, rn, v_z, v_r, labels, ref_labels, stats, similarity, params, self_offset, ops):
        with torch.autocast(zn.device.type, enabled=False):  # the chunks' GEMMs in the rows' fp32/fp64
            return _LabelDoubleBackward._vjp(grad_rows, zn, rn, v_z, v_r, labels, ref_labels, stats, similarity,
                                             params, self_offset, ops)

    @staticmethod
    def _vjp(grad_rows, zn, rn, v_z, v_r, labels, ref_labels, stats, similarity, params, self_offset, ops):
        # The C++ backend's label-aware kernels: G, W and d_g in one op, no masks.
        by_labels = ops is CPP_OPS and zn.device.type == "cpu" and params[0] in _ROW_HVP_FORMS
        if by_labels and _is_self(zn, rn, labels, ref_labels, self_offset):
            # The backward op returned the whole gradient a·(G + Gᵀ)·zn as ∂/∂zn and zeros as ∂/∂rn, so v_r
            # meets nothing; the symmetric tiles take five GEMM-equivalents where the row chunks below take seven.
            d_g, d_z = ops.oucl_label_self_bwd_bwd(grad_rows, zn, v_z, labels, stats, SIMILARITIES[similarity],
                                                   *params)
            return d_g, d_z, torch.zeros_like(rn)
        a = slope(similarity)
        with_r = v_r.numel() > 0  # a constant reference set gave no ∂/∂rn, so it has no cotangent
        d_g, d_z, d_r = torch.empty_like(grad_rows), torch.empty_like(zn), torch.zeros_like(rn)
        mm = _gemm(ops, zn.device)
        # U = v_z·rnᵀ + zn·v_rᵀ as one GEMM over 2D features ([v_z | zn]·[rn | v_r]ᵀ): no second [c, M] pass.
        right = torch.cat([rn, v_r], 1).T if with_r else rn.T
        # U is taken without its factor a: d_g and W are linear in it, so a scales them afterwards instead of
        # costing a pass over each chunk.
        for rows, S, pm, nm in _score_chunks(zn, rn, labels, ref_labels, similarity, self_offset, not by_labels, mm):
            z, g, st = zn[rows], grad_rows[rows], stats[rows]
            U = mm(torch.cat([v_z[rows], z], 1) if with_r else v_z[rows], right, None, 1.0, 0.0)
            if by_labels:
                d_g[rows], G, W = ops.oucl_label_rows_bwd_bwd(g, U, S, labels[rows], ref_labels, st, rows.start,
                                                              self_offset, *params)
            elif params[0] == Form.MARGIN:
                # Piecewise linear (no Hessian): G shares grad_rows among each extremum's ties, found again
                # in this chunk's scores (they may differ from the fused op's tiles in the last bit).
                st = ops.margin_score_fwd(S, S, pm, nm)
                share_p, share_n = ops.margin_score_bwd(torch.ones_like(g), S, S, pm, nm, st)
                d_g[rows] = torch.stack([(share_p * U).sum(1), (share_n * U).sum(1)], 1)
                G, W = share_p * g[:, :1] + share_n * g[:, 1:], None
            else:
                gp, gn = ops.oucl_score_bwd(g, S, S, pm, nm, st, *params)
                G = gp + gn  # the masks are disjoint
                if params[0] == Form.HINGE:
                    d_g[rows], W = hinge_grad_grad_rows(st, U, U, pm, nm), None
                else:
                    d_g[rows], hp, hn = ops.oucl_score_bwd_bwd(g, U, U, S, S, pm, nm, st, *params)
                    W = hp + hn
            if a != 1.0:
                d_g[rows] *= a
            dz = mm(G, v_r, None, 1.0, 0.0) if with_r else None
            dr = mm(G.T, v_z[rows], None, 1.0, 0.0)
            if W is not None:
                dz = mm(W, rn, dz, a, 0.0)
                dr = mm(W.T, z, dr, a, 0.0)
            if dz is None:
                dz = torch.zeros_like(z)
            d_z[rows] = a * dz
            d_r.add_(dr, alpha=a)
        return d_g, d_z, d_r

    @staticmethod
    def backward(ctx, *grads):
        raise third_order_error("the label-mode ops")


class _LabelBackward(torch.autograd.Function):
    """(grad_rows, zn, rn) -> (∂/∂zn, ∂/∂rn) of Σ_i grad_i ℓ_i by the fused backward op, differentiable once
    more through _LabelDoubleBackward: the path of a gradient taken with ``create_graph=True`` (the MetAug
    meta step), O(chunk·M + (B + M)·D) memory."""

    @staticmethod
    def forward(ctx, grad_rows, zn, rn, labels, ref_labels, stats, similarity, params, self_offset, ops, ref_grad):
        ctx.save_for_backward(grad_rows, zn, rn, labels, ref_labels, stats)
        ctx.args = (similarity, params, self_offset, ops)
        return ops.oucl_label_bwd(grad_rows, zn, rn, labels, ref_labels, stats, self_offset,
                                  SIMILARITIES[similarity], *params, ref_grad)

    @staticmethod
    def backward(ctx, v_z, v_r):
        grad_rows, zn, rn, labels, ref_labels, stats = ctx.saved_tensors
        d_g, d_z, d_r = _LabelDoubleBackward.apply(grad_rows, zn, rn, v_z, v_r, labels, ref_labels, stats, *ctx.args)
        return (d_g, d_z, d_r) + (None,) * 8


def _label_grads(ctx, grad_rows, params, self_offset):
    """(∂/∂zn, ∂/∂rn or None) from the label backward op: differentiable when a graph is being built."""
    zn, rn, labels, ref_labels, stats = ctx.saved_tensors[:5]
    args = (grad_rows.contiguous(), *_op_inputs(zn, rn, labels, ref_labels), stats)
    if torch.is_grad_enabled():
        g_z, g_r = _LabelBackward.apply(*args, ctx.similarity, params, self_offset, ctx.ops, _ref_grad(ctx, rn))
    else:
        g_z, g_r = ctx.ops.oucl_label_bwd(*args, self_offset, SIMILARITIES[ctx.similarity], *params,
                                          _ref_grad(ctx, rn))
    if rn is None:
        return g_z + g_r, None
    return g_z, g_r if ctx.needs_input_grad[1] else None


class _LabelLoss(torch.autograd.Function):
    """(zn [B,D], rn [M,D] or None) -> (per-row losses [B], valid rows [B]); ``params`` = (form id, β, γ⁺,
    γ⁻, m, λ) as the C++ ops take them (InfoNCE: id 4, β = 1/τ); ``ops``: the namespace of the label ops."""

    @staticmethod
    def forward(ctx, zn, rn, labels, ref_labels, similarity, params, self_offset, ops):
        offset = 0 if rn is None else self_offset
        args = (*_op_inputs(zn, rn, labels, ref_labels), offset, SIMILARITIES[similarity], *params)
        # A constant reference set on the CPU: the gradient comes with the forward (in one sweep while the
        # score rows fit the caches, see oucl_label_fwd_grad), and the backward only scales it.
        grad_with_forward = (rn is not None and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
                             and ops is CPP_OPS and zn.device.type == "cpu")
        if grad_with_forward:
            rows, stats, dz = ops.oucl_label_fwd_grad(*args)
        else:
            (rows, stats), dz = ops.oucl_label_fwd(*args), None
        ctx.save_for_backward(zn, rn, labels, ref_labels, stats, dz)
        ctx.similarity, ctx.params, ctx.self_offset, ctx.ops = similarity, params, offset, ops
        return with_valid(ctx, rows, stats)

    @staticmethod
    def backward(ctx, grad_rows, _grad_valid):
        dz = ctx.saved_tensors[5]
        if dz is not None and not torch.is_grad_enabled():  # a graph of the backward takes the exact op path
            return (grad_rows[:, None] * dz, None) + (None,) * 6
        return _label_grads(ctx, grad_rows, ctx.params, ctx.self_offset) + (None,) * 6


def with_valid(ctx, rows: Tensor, stats: Tensor):
    """A label Function's outputs: ``(rows, valid [B] bool)``, valid read from the stats and marked
    non-differentiable."""
    valid = stats[:, Stat.VALID] > 0
    ctx.mark_non_differentiable(valid)
    return rows, valid


def with_valids(ctx, rows_z: Tensor, stats_z: Tensor, rows_r: Tensor, stats_r: Tensor):
    """A cross-mode Function's outputs: ``(rows_z, valid_z, rows_r, valid_r)``, both valid masks marked
    non-differentiable in one call (a second call would replace the first)."""
    valid_z, valid_r = stats_z[:, Stat.VALID] > 0, stats_r[:, Stat.VALID] > 0
    ctx.mark_non_differentiable(valid_z, valid_r)
    return rows_z, valid_z, rows_r, valid_r


def _ref_grad(ctx, rn) -> bool:
    """Whether the backward needs ∂/∂(reference rows): without a reference set they are zn itself; a
    constant reference set (a memory bank) skips that half of the backward's GEMMs."""
    return rn is None or ctx.needs_input_grad[1]


def _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, reduction, self_offset, ref_unit, ops,
                scale=None, weights=None):
    """The reduced loss; ``scale``: the rows are multiplied by it after the normalization and the op sees
    their plain inner products (a temperature tensor, :func:`metaug_fast.reference.temperature_scale`)."""
    inputs = _normalized(emb, labels, ref_emb, ref_labels, similarity, ref_unit, scale)
    rows, valid = _LabelLoss.apply(*inputs, "dot" if scale is not None else similarity, params, self_offset, ops)
    return reference.reduce_rows(rows, valid, reduction, emb.dtype, weights)


def oucl_embeddings_fused(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                        ref_labels: Optional[Tensor] = None, *, similarity: str, reduction: str, form: str,
                        beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                        self_offset: Optional[int] = None, ref_unit: bool = False, ops=CPP_OPS) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.oucl_embeddings`, on the fused label ops of ``ops``
    (the C++ kernels, or the CUDA ones for CUDA tensors). ``ref_unit``: the rows of ``ref_emb`` are unit
    vectors already (a memory bank keeps them so) and are not copied normalized."""
    params = LossParams(form, beta, gamma_pos, gamma_neg, margin, lam).op_args()
    offset = -1 if self_offset is None else int(self_offset)
    return _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, reduction, offset, ref_unit, ops)


def info_nce_setup(temperature, similarity: str, average: str, labels: Tensor, ref_labels: Optional[Tensor],
                   self_offset: Optional[int]):
    """(op arguments, row scale or None, row weights or None) of label-mode InfoNCE on a fused backend: a
    temperature tensor becomes a scale of the rows and the kernels run at τ = 1
    (:func:`metaug_fast.reference.temperature_scale`); ``average="pair"`` weights each row by its positives."""
    scale = None
    if isinstance(temperature, Tensor):
        scale, temperature = reference.temperature_scale(temperature, similarity), 1.0
    weights = None if average == "anchor" else reference.positive_counts(labels, ref_labels, self_offset)
    return LossParams.info_nce(temperature), scale, weights


def info_nce_embeddings_fused(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                            ref_labels: Optional[Tensor] = None, *, temperature, similarity: str,
                            reduction: str, average: str = "anchor", self_offset: Optional[int] = None,
                            ops=CPP_OPS) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.info_nce_embeddings`, on the fused label ops of ``ops``."""
    params, scale, weights = info_nce_setup(temperature, similarity, average, labels, ref_labels, self_offset)
    offset = -1 if self_offset is None else int(self_offset)
    return _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, reduction, offset, False, ops, scale,
                       weights)


class _CrossLoss(torch.autograd.Function):
    """(zn [B,D], rn [M,D]) -> (rows [B], valid [B]) of each row of zn against rn, then (rows [M], valid [M])
    of each row of rn against zn, by the cross-mode ops (one tile sweep for both directions). Under
    ``create_graph`` the backward is each direction's differentiable label backward (_LabelBackward), so
    second derivatives stay exact."""

    @staticmethod
    def forward(ctx, zn, rn, labels, ref_labels, similarity, params, ops):
        rows_z, stats_z, rows_r, stats_r = ops.oucl_label_cross_fwd(zn, rn, labels, ref_labels,
                                                                    SIMILARITIES[similarity], *params)
        ctx.save_for_backward(zn, rn, labels, ref_labels, stats_z, stats_r)
        ctx.similarity, ctx.params, ctx.ops = similarity, params, ops
        return with_valids(ctx, rows_z, stats_z, rows_r, stats_r)

    @staticmethod
    def backward(ctx, grad_z, _gvz, grad_r, _gvr):
        zn, rn, labels, ref_labels, stats_z, stats_r = ctx.saved_tensors
        grad_z, grad_r = grad_z.contiguous(), grad_r.contiguous()
        if torch.is_grad_enabled():
            args = (ctx.similarity, ctx.params, -1, ctx.ops, True)
            gz, gr = _LabelBackward.apply(grad_z, zn, rn, labels, ref_labels, stats_z, *args)
            gr_t, gz_t = _LabelBackward.apply(grad_r, rn, zn, ref_labels, labels, stats_r, *args)
            gz, gr = gz + gz_t, gr + gr_t
        else:
            gz, gr = ctx.ops.oucl_label_cross_bwd(grad_z, grad_r, zn, rn, labels, ref_labels, stats_z, stats_r,
                                                  SIMILARITIES[ctx.similarity], *ctx.params)
        return gz, gr if ctx.needs_input_grad[1] else None, None, None, None, None, None


def symmetric_info_nce_fused(emb: Tensor, ref_emb: Tensor, labels: Tensor, ref_labels: Tensor, *, temperature,
                             similarity: str, reduction: str, average: str = "anchor", ops=CPP_OPS) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.symmetric_info_nce`, both directions in one sweep of the
    cross-mode ops of ``ops``."""
    params, scale, w_z, w_r = symmetric_setup(temperature, similarity, average, labels, ref_labels)
    zn, rn, lab, rlab = _normalized(emb, labels, ref_emb, ref_labels, similarity, scale=scale)
    outputs = _CrossLoss.apply(zn, rn, lab, rlab, "dot" if scale is not None else similarity, params, ops)
    return reduce_both(*outputs, reduction, emb.dtype, w_z, w_r)


def symmetric_setup(temperature, similarity: str, average: str, labels: Tensor, ref_labels: Tensor):
    """:func:`info_nce_setup` for both directions of cross mode: (op arguments, row scale or None, weights of
    the rows of emb, weights of the rows of ref_emb), the weights None but for ``average="pair"``."""
    params, scale, w_z = info_nce_setup(temperature, similarity, average, labels, ref_labels, None)
    return params, scale, w_z, None if w_z is None else reference.positive_counts(ref_labels, labels)


def reduce_both(rows_z: Tensor, valid_z: Tensor, rows_r: Tensor, valid_r: Tensor, reduction: str,
                dtype: torch.dtype, w_z: Optional[Tensor], w_r: Optional[Tensor]) -> Tensor:
    """The mean of the two directions' reduced losses (:func:`metaug_fast.reference.reduce_rows` each)."""
    return (reference.reduce_rows(rows_z, valid_z, reduction, dtype, w_z)
            + reference.reduce_rows(rows_r, valid_r, reduction, dtype, w_r)) / 2


class _MarginLabel(torch.autograd.Function):
    """(zn [B,D], rn [M,D] or None) -> (p_min [B], n_max [B], valid [B]) over label-mode scores; the gradient
    goes to the entries attaining the extremum, shared equally among ties (as torch.amin/amax share it)."""

    @staticmethod
    def forward(ctx, zn, rn, labels, ref_labels, similarity, ops):
        _, stats = ops.oucl_label_fwd(
            *_op_inputs(zn, rn, labels, ref_labels), 0 if rn is None else -1, SIMILARITIES[similarity],
            *MARGIN_PARAMS,
        )
        ctx.save_for_backward(zn, rn, labels, ref_labels, stats)
        ctx.similarity, ctx.ops = similarity, ops
        valid = stats[:, Stat.VALID] > 0
        ctx.mark_non_differentiable(valid)
        return stats[:, Stat.P_MIN].clone(), stats[:, Stat.N_MAX].clone(), valid

    @staticmethod
    def backward(ctx, g_min, g_max, _g_valid):
        offset = 0 if ctx.saved_tensors[1] is None else -1
        return _label_grads(ctx, torch.stack([g_min, g_max], 1), MARGIN_PARAMS, offset) + (None,) * 4


def margin_statistics_embeddings_fused(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                                     ref_labels: Optional[Tensor] = None, *, similarity: str, ops=CPP_OPS):
    """Same contract as :func:`metaug_fast.reference.margin_statistics_embeddings`, on the fused label ops
    of ``ops``."""
    p_min, n_max, valid = _MarginLabel.apply(*_normalized(emb, labels, ref_emb, ref_labels, similarity), similarity,
                                             ops)
    return sigmas(p_min, n_max, valid, emb.dtype)


def pairwise_similarity_fused(a: Tensor, b: Tensor, *, similarity: str) -> Tensor:
    """d(a_i, b_j) ``[B,M]`` in ``a.dtype``: normalization (but for "dot"), then one ATen GEMM with the
    similarity's affine map folded in (``addmm`` with α = 1/2 and a broadcast 1/2 for the shifted cosine).
    Differentiable to any order by autograd."""
    return _similarities(reference._rows(a, similarity), reference._rows(b, similarity), similarity).to(a.dtype)
