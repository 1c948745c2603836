"""Label mode on the fused backends, one design for all of them: OUCL, InfoNCE (one way, or both ways between
two sets: cross mode) and margin statistics, as autograd Functions over a backend's :class:`LabelKernels`.

Every backend's label ops share one interface (the schemas of csrc/op_schemas.h; Triton registers the same
names in ``torch.ops.metaug_fast_triton``): raw rows ``e [B,D]``, ``r [M,D]`` in any floating dtype and
their inverse norms ``iz = 1/max(‖e‖, ε)`` in the accumulation dtype, so nothing is rounded twice and no
normalized copy is made where a kernel can scale its tiles instead. The norms are taken here with PyTorch
ops; the ops' backward returns the gradients of the rows at fixed norms and of the norms, and
:func:`through_norm` joins them in the accumulation dtype (the two nearly cancel, so they are added before
the one cast to the input dtype).

When a graph of the backward is requested (``create_graph=True``, the MetAug meta step), the backward op runs
on the normalized rows (inverse norms 1) inside :class:`_LabelBackward`, differentiable once more through
:class:`_LabelDoubleBackward`: the score-mode backward and double-backward ops over row chunks of the scores,
exact, and B×M never stored (or, where a backend has them, its label-aware second-derivative kernels).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, Mapping, Optional

import torch
from torch import Tensor

from .. import reference
from ..contract import HVP_FORMS, SIMILARITIES, Form, LossParams, Stat, label_self_mode, normalizes, slope
from .margins import sigmas
from .score import hinge_grad_grad_rows, third_order_error

_EPS = 1e-12  # F.normalize's

# What a backend's label kernels may do beyond the shared ops, per device type (LabelKernels.capabilities):
FWD_GRAD = "fwd_grad"  # oucl_label_fwd_grad: the gradient with the forward, for a constant reference set
ROWS_HVP = "rows_hvp"  # oucl_label_rows_bwd_bwd: the second derivative's row chunks by labels, no masks
SELF_HVP = "self_hvp"  # oucl_label_self_bwd_bwd: self mode's second derivative over the symmetric tiles
FUSED_HVP = "fused_hvp"  # oucl_label_hvp: the whole second derivative on the raw rows, tiles never stored


@dataclass(frozen=True)
class LabelKernels:
    """A backend's label kernels: ``ops``, the namespace of its label ops (``oucl_label_fwd``,
    ``oucl_label_bwd``, ``oucl_label_cross_fwd``, ``oucl_label_cross_bwd``) and score ops (the second
    derivative's chunks); ``capabilities``, per device type, which of FWD_GRAD, ROWS_HVP, SELF_HVP and FUSED_HVP
    it has there;
    ``triton_gemm``: the second derivative's GEMMs are Triton's on every device (else on CUDA only)."""

    ops: object
    capabilities: Mapping[str, FrozenSet[str]] = field(default_factory=dict)
    triton_gemm: bool = False

    def can(self, what: str, device: torch.device) -> bool:
        return what in self.capabilities.get(device.type, ())


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


def _score_chunks(zn, rn, labels, ref_labels, similarity, self_offset, masks=True, mm=None):
    """(rows, S [c,M], pos mask, neg mask) for consecutive chunks of rows of the label-mode scores, about
    chunk_scores(device) at a time: a row's loss depends on its own row of S only, so row chunks are exact
    and only one chunk of the B×M scores exists at a time. ``masks`` False: the masks are None; ``mm``: the
    GEMM (:func:`_gemm`). Nothing here waits for the device: the chunks are cut from the shapes."""
    B, M = zn.shape[0], rn.shape[0]
    step = max(1, chunk_scores(zn.device) // max(M, 1))
    for r0 in range(0, B, step):
        rows = slice(r0, min(B, r0 + step))
        S = _similarities(zn[rows], rn, similarity, mm)
        pm, nm = _label_masks(labels[rows], ref_labels, self_offset, r0) if masks else (None, None)
        yield rows, S, pm, nm


def _cotangent_chunks(zn, rn, v_z, v_r, labels, ref_labels, similarity, self_offset, masks, mm):
    """_score_chunks's (rows, S, masks) with U, the cotangent's change of S along (v_z, v_r) (``v_r`` [0, D]:
    none), beside each chunk: (rows, S, U, pm, nm). U = v_z·rnᵀ + zn·v_rᵀ is one GEMM over 2D features
    ([v_z | zn]·[rn | v_r]ᵀ), no second [c, M] pass; it is taken without the similarity's slope a: d_g and W
    are linear in it, so a scales them afterwards instead of costing a pass over each chunk."""
    with_r = v_r.numel() > 0
    right = torch.cat([rn, v_r], 1).T if with_r else rn.T
    for rows, S, pm, nm in _score_chunks(zn, rn, labels, ref_labels, similarity, self_offset, masks, mm):
        U = mm(torch.cat([v_z[rows], zn[rows]], 1) if with_r else v_z[rows], right, None, 1.0, 0.0)
        yield rows, S, U, pm, nm


def hvp_row_sums(zn: Tensor, rn: Tensor, v_z: Tensor, v_r: Tensor, labels: Tensor, ref_labels: Tensor, stats: Tensor,
                 similarity: str, params, self_offset: int, kernels: LabelKernels):
    """Round 1 of the label HVP over a part of the reference set: the normalized rows ``zn [B, D]`` (labels
    ``[B]``, whole-row ``stats [B, N_STATS]``) against the part ``rn [M, D]`` (``ref_labels [M]``), with the
    cotangents ``v_z [B, D]`` and ``v_r [M, D]`` (``[0, D]``: none). Returns (sums ``[B, 4]``, d_g ``[B]``): the
    rows' sums over this part and its part of ∂/∂grad_rows; both add over disjoint parts, and the whole
    sums go to :meth:`_LabelDoubleBackward._vjp` for each part (a reference set split across processes).
    The forms with a Hessian: by the kernels' round 1 where they have ROWS_HVP (the C++ CPU backend), else
    (the OUCL forms) in PyTorch ops over the same chunks (:func:`_split_sums`)."""
    by_labels = _split_route(params, kernels, zn.device)
    sums, d_g = zn.new_empty(zn.shape[0], 4), zn.new_empty(zn.shape[0])
    for rows, S, U, pm, nm in _cotangent_chunks(zn, rn, v_z, v_r, labels, ref_labels, similarity, self_offset,
                                                not by_labels, _gemm(kernels, zn.device)):
        if by_labels:
            sums[rows], d_g[rows] = kernels.ops.oucl_label_rows_hvp_sums(U, S, labels[rows], ref_labels,
                                                                         stats[rows], rows.start, self_offset,
                                                                         *params)
        else:
            sums[rows], d_g[rows] = _split_sums(S, U, pm, nm, stats[rows], params)
    return sums, slope(similarity) * d_g


def _split_route(params, kernels: LabelKernels, device: torch.device) -> bool:
    """Whether a product over a part of the reference set runs on the kernels' label-aware row ops (True) or
    in PyTorch ops (False: the OUCL forms on kernels without ROWS_HVP); raises for what has neither."""
    if params[0] in HVP_FORMS and kernels.can(ROWS_HVP, device):
        return True
    if params[0] in (Form.SQUARED, Form.WEIGHTED, Form.CIRCLE):
        return False
    raise ValueError(f"the second derivative over a part of the reference set takes the forms with a Hessian; "
                     f"{Form(params[0]).name.lower()} has kernels with ROWS_HVP only or no Hessian")


def _split_terms(S: Tensor, pm: Tensor, nm: Tensor, stats: Tensor, params):
    """Per entry of a chunk of OUCL scores ``S [c, m]`` (``pm``, ``nm``: the pairs' sides) of rows whose
    ``stats`` are the whole rows': the side's softmax weight w over the whole row and the exponent's first
    and second derivatives d1, d2 (u on the positives, v on the negatives; the circle form's Γ are
    constants, as everywhere), zero off the pairs and on invalid rows; and y = LSE⁺ + LSE⁻ per row."""
    form, beta, gamma_pos, gamma_neg, margin = params[:5]
    x = S.detach().requires_grad_()
    with torch.enable_grad():
        u, v = reference.exponents(x, x, Form(form).name.lower(), beta, gamma_pos, gamma_neg, margin)
        e = torch.where(pm, u, v)
        (d1,) = torch.autograd.grad(e.sum(), x, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), x, allow_unused=True)[0] if d1.requires_grad else None
    lse_pos = stats[:, Stat.POS_SHIFT] + stats[:, Stat.POS_LOG_SUM]
    lse_neg = stats[:, Stat.NEG_SHIFT] + stats[:, Stat.NEG_LOG_SUM]
    keep = (pm | nm) & (stats[:, Stat.VALID] > 0)[:, None]
    zero = torch.zeros((), dtype=S.dtype, device=S.device)
    w = torch.where(keep, torch.exp(e.detach() - torch.where(pm, lse_pos[:, None], lse_neg[:, None])), zero)
    d1 = torch.where(keep, d1.detach(), zero)
    d2 = zero.expand_as(S) if d2 is None else torch.where(keep, d2, zero)
    return w, d1, d2, lse_pos + lse_neg


def _split_sums(S: Tensor, U: Tensor, pm: Tensor, nm: Tensor, stats: Tensor, params):
    """oucl_label_rows_hvp_sums in PyTorch ops, for the OUCL forms: (sums [c, 4], d_g [c]) of a chunk's
    rows over its columns: a = Σ⁺ w·u'·U, b = Σ⁻ w·v'·U, d_g = σ(y)·(a + b)/β."""
    w, d1, _, y = _split_terms(S, pm, nm, stats, params)
    wdu = w * d1 * U
    zero = torch.zeros((), dtype=S.dtype, device=S.device)
    a, b = torch.where(pm, wdu, zero).sum(1), torch.where(nm, wdu, zero).sum(1)
    return torch.stack([a, b, torch.zeros_like(a), torch.zeros_like(a)], 1), _split_dg(y, a + b, stats, params)


def _split_dg(y: Tensor, sum_ab: Tensor, stats: Tensor, params) -> Tensor:
    """d_g = ∂ℓ/∂S·U = σ(y)·(a + b)/β per row (hvp_row_consts' d_g), 0 on invalid rows."""
    zero = torch.zeros((), dtype=sum_ab.dtype, device=sum_ab.device)
    return torch.where(stats[:, Stat.VALID] > 0, torch.sigmoid(y) * sum_ab / params[1], zero)


def _split_apply(g: Tensor, S: Tensor, U: Tensor, pm: Tensor, nm: Tensor, stats: Tensor, params, sums: Tensor):
    """oucl_label_rows_bwd_bwd with whole-row ``sums`` in PyTorch ops, for the OUCL forms: (d_g, G, W) of a
    chunk's rows over its columns, G = ∂(g·ℓ)/∂S and W = g·H U (label_rows.inc's second pass, term by term)."""
    w, d1, d2, y = _split_terms(S, pm, nm, stats, params)
    A, B = sums[:, 0], sums[:, 1]
    valid = stats[:, Stat.VALID] > 0
    zero = torch.zeros((), dtype=S.dtype, device=S.device)
    coef = torch.where(valid, g * torch.sigmoid(y) / params[1], zero)
    c1 = torch.where(valid, coef * torch.sigmoid(-y) * (A + B), zero)
    side = torch.where(pm, A[:, None], B[:, None])
    G = coef[:, None] * w * d1
    W = w * d1 * c1[:, None] + coef[:, None] * w * (d1 * (d1 * U - side) + d2 * U)
    return _split_dg(y, A + B, stats, params), G, W


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


def _gemm(kernels: LabelKernels, device: torch.device):
    """The GEMM of the second derivative's chunks, as ``mm(a, b, c, alpha, offset)``: in IEEE fp32/fp64
    whatever torch's global flags say. On CUDA, for every backend, Triton's (kernels/matmul.py): torch.mm
    there follows allow_tf32 / set_float32_matmul_precision("high"), whose TF32 error (1e-3 relative) is the
    whole tolerance of an fp32 Hessian-vector product. Triton's kernels take it on the CPU too (the
    interpreter's tests); the C++ ops there take torch's."""
    if device.type == "cuda" or kernels.triton_gemm:
        from ..kernels.matmul import mm

        return mm
    return _torch_mm


def inverse_norm(x: Tensor, unit: bool) -> Tensor:
    """1/max(‖x_i‖, ε) per row in the accumulation dtype, or ones for rows taken as they are (``unit``).
    Torch ops: differentiable when grad mode is on."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if unit:
        return x.new_ones(x.shape[0], dtype=acc)
    return 1.0 / torch.linalg.vector_norm(x.to(acc), dim=1).clamp(min=_EPS)


def through_norm(x: Tensor, inv: Tensor, d_direct: Tensor, d_inv: Tensor, unit: bool) -> Tensor:
    """∂L/∂x in the accumulation dtype from ∂L/∂x at fixed ``inv`` and ∂L/∂inv, ``inv = 1/max(‖x‖, ε)``:
    ∂inv/∂x = -inv³·x where the norm exceeds ε, 0 where the clamp holds it; ``unit``: inv is the constant 1
    (rows taken as they are). Differentiable (torch ops)."""
    if unit:
        return d_direct
    radial = torch.where(inv < 1.0 / _EPS, d_inv * inv**3, torch.zeros_like(inv))
    return d_direct - radial[:, None] * x.to(inv.dtype)


def _scaled(x: Tensor, inv: Tensor) -> Tensor:
    """The rows the similarity takes, x·inv, in the accumulation dtype."""
    return x.to(inv.dtype) * inv[:, None]


class _LabelDoubleBackward(torch.autograd.Function):
    """The second derivative of label mode. On the raw rows and inverse norms of the label ops (zn = e·iz,
    rn = r·ir), the backward's A = ∂L/∂zn = a·G·rn and B = ∂L/∂rn = a·Gᵀ·zn, where G = ∂(Σ_i grad_i ℓ_i)/∂S
    and a is the similarity's slope; this is their vector-Jacobian product for cotangents (v_z on A, v_r on
    B), as (∂/∂grad_rows, ∂/∂zn, ∂/∂rn) in the accumulation dtype. With U = a·(v_z·rnᵀ + zn·v_rᵀ), the change
    of S along the cotangents: ∂/∂grad_i = Σ_j ∂ℓ_i/∂S_ij · U_ij, and with W = ∂⟨G, U⟩/∂S (each row's Hessian
    applied to its row of U) ∂/∂zn = a·(W·rn + G·v_r), ∂/∂rn = a·(Wᵀ·zn + Gᵀ·v_z). Fused where the kernels
    can (FUSED_HVP: tiles recomputed from the raw rows, never stored); otherwise on the normalized rows, over
    row chunks of S and U, or by label-aware ops over the same chunks (ROWS_HVP) or, in self mode, over the
    symmetric tiles (SELF_HVP): never B×M. A third derivative raises."""

    @staticmethod
    def forward(ctx, grad_rows, e, iz, r, ir, v_z, v_r, labels, ref_labels, stats, similarity, params, self_offset,
                kernels, ref_grad):
        with torch.autocast(e.device.type, enabled=False):  # the chunks' GEMMs in the rows' fp32/fp64
            if params[0] in HVP_FORMS and kernels.can(FUSED_HVP, e.device):
                return kernels.ops.oucl_label_hvp(grad_rows, e, iz, r, ir, v_z, v_r, labels, ref_labels, stats,
                                                  self_offset, SIMILARITIES[similarity], *params, ref_grad)
            self_mode = label_self_mode(e, iz, r, ir, self_offset)
            zn = _scaled(e, iz)
            rn = zn if self_mode else _scaled(r, ir)
            return _LabelDoubleBackward._vjp(grad_rows, zn, rn, v_z, v_r, labels, ref_labels, stats, similarity,
                                             params, self_offset, kernels, self_mode)

    @staticmethod
    def _vjp(grad_rows, zn, rn, v_z, v_r, labels, ref_labels, stats, similarity, params, self_offset, kernels,
             self_mode, sums=None):
        """The product on the normalized rows. ``sums [B, 4]``: the rows' round-1 sums over the whole reference
        set, of which ``rn`` is then a part (:func:`hvp_row_sums`; the forms with a Hessian); d_g is then that
        of the given sums, not of this part."""
        ops = kernels.ops
        by_labels = params[0] in HVP_FORMS and kernels.can(ROWS_HVP, zn.device)
        if sums is not None:
            by_labels = _split_route(params, kernels, zn.device)
        if params[0] in HVP_FORMS and kernels.can(SELF_HVP, zn.device) and self_mode:
            # In self mode the two halves of the backward's output are summed, so v_r is v_z; the symmetric
            # tiles take five GEMM-equivalents where the row chunks below take seven.
            d_g, d_z = ops.oucl_label_self_bwd_bwd(grad_rows, zn, v_z, labels, stats, SIMILARITIES[similarity],
                                                   *params)
            return d_g, d_z, torch.zeros_like(rn)
        a = slope(similarity)
        with_r = v_r.numel() > 0  # a constant reference set gave no ∂/∂rn, so it has no cotangent
        d_g, d_z, d_r = torch.empty_like(grad_rows), torch.empty_like(zn), torch.zeros_like(rn)
        mm = _gemm(kernels, zn.device)
        for rows, S, U, pm, nm in _cotangent_chunks(zn, rn, v_z, v_r, labels, ref_labels, similarity, self_offset,
                                                    not by_labels, mm):
            z, g, st = zn[rows], grad_rows[rows], stats[rows]
            if by_labels:
                d_g[rows], G, W = ops.oucl_label_rows_bwd_bwd(g, U, S, labels[rows], ref_labels, st, rows.start,
                                                              self_offset, *params,
                                                              None if sums is None else sums[rows])
            elif params[0] == Form.MARGIN:
                # Piecewise linear (no Hessian): G shares grad_rows among each extremum's ties, found again
                # in this chunk's scores (they may differ from the fused op's tiles in the last bit).
                st = ops.margin_score_fwd(S, S, pm, nm)
                share_p, share_n = ops.margin_score_bwd(torch.ones_like(g), S, S, pm, nm, st)
                d_g[rows] = torch.stack([(share_p * U).sum(1), (share_n * U).sum(1)], 1)
                G, W = share_p * g[:, :1] + share_n * g[:, 1:], None
            elif sums is not None:
                d_g[rows], G, W = _split_apply(g, S, U, pm, nm, st, params, sums[rows])
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
    """(grad_rows, e, iz, r, ir) -> the label backward op's (∂e, ∂iz, ∂r, ∂ir) at fixed inverse norms: the same
    op on the same raw rows as the first-order path (a gradient taken with ``create_graph=True`` equals the
    one taken without), differentiable once more through :class:`_LabelDoubleBackward`: the path of the
    MetAug meta step, O(chunk·M + (B + M)·D) memory, or O((B + M)·D) where the kernels fuse it. With
    A = ∂L/∂zn (zn = e·iz), the op returns ∂e = iz·A and ∂iz = ⟨e, A⟩ (likewise the reference rows with B);
    in self mode (r is e, ir is iz, self_offset 0) A is the whole gradient and the reference's parts are
    empty ([0, D]), as they are without ``ref_grad``."""

    @staticmethod
    def forward(ctx, grad_rows, e, iz, r, ir, labels, ref_labels, stats, similarity, params, self_offset, kernels,
                ref_grad):
        de, diz, dr, dir_ = kernels.ops.oucl_label_bwd(grad_rows, e, iz, r, ir, labels, ref_labels, stats,
                                                       self_offset, SIMILARITIES[similarity], *params, ref_grad)
        ctx.save_for_backward(grad_rows, e, iz, r, ir, labels, ref_labels, stats, de, dr)
        ctx.args = (similarity, params, self_offset, kernels)
        ctx.self_mode = label_self_mode(e, iz, r, ir, self_offset)
        return de, diz, dr, dir_

    @staticmethod
    def backward(ctx, c_de, c_diz, c_dr, c_dir):
        grad_rows, e, iz, r, ir, labels, ref_labels, stats, de, dr = ctx.saved_tensors
        # The cotangent on A is what reaches it through ∂e = iz·A and ∂iz = ⟨e, A⟩; at fixed A those give e
        # and iz direct terms of their own, with A = ∂e/iz.
        a_z = de / iz[:, None]
        v_z = iz[:, None] * c_de + c_diz[:, None] * e.to(iz.dtype)
        with_r = dr.shape[0] > 0
        if with_r:
            a_r = dr / ir[:, None]
            v_r = ir[:, None] * c_dr + c_dir[:, None] * r.to(ir.dtype)
        else:  # self mode: A is the rows' and the columns' parts at once, so both take its cotangent
            v_r = v_z if ctx.self_mode else dr
        ref_grad = ctx.self_mode or with_r
        d_g, d_zn, d_rn = _LabelDoubleBackward.apply(grad_rows, e, iz, r, ir, v_z, v_r, labels, ref_labels, stats,
                                                     *ctx.args, ref_grad)
        d_e = iz[:, None] * d_zn + c_diz[:, None] * a_z
        d_iz = (e.to(iz.dtype) * d_zn).sum(1) + (c_de * a_z).sum(1)
        d_r = d_ir = None
        if ref_grad:
            d_r = ir[:, None] * d_rn
            d_ir = (r.to(ir.dtype) * d_rn).sum(1)
            if with_r:
                d_r = d_r + c_dir[:, None] * a_r
                d_ir = d_ir + (c_dr * a_r).sum(1)
            d_r = d_r.to(r.dtype)
        return (d_g, d_e.to(e.dtype), d_iz, d_r, d_ir) + (None,) * 8


@dataclass
class _Side:
    """What a label Function saved of one direction: the rows ``e`` against ``r`` (None: against themselves),
    their labels, the forward's ``stats``, and how the rows are taken (``unit``: as they are)."""

    e: Tensor
    r: Optional[Tensor]
    labels: Tensor
    ref_labels: Tensor
    stats: Tensor
    unit: bool
    ref_unit: bool
    self_offset: int


def _differentiable_grads(side: _Side, grad_rows: Tensor, similarity: str, params, kernels: LabelKernels,
                          ref_grad: bool):
    """(∂e, ∂r or None) as a function that can be differentiated again (the MetAug meta step): the backward
    op inside :class:`_LabelBackward`, then the normalization's chain in torch ops (the inverse norms
    recomputed from the rows here, in grad mode, so that every order reaches them)."""
    self_mode = side.r is None
    iz = inverse_norm(side.e, side.unit)
    ir = iz if self_mode else inverse_norm(side.r, side.ref_unit)
    outs = _LabelBackward.apply(grad_rows.contiguous(), side.e, iz, side.e if self_mode else side.r, ir,
                                side.labels, side.labels if self_mode else side.ref_labels, side.stats, similarity,
                                params, side.self_offset, kernels, self_mode or ref_grad)
    return _raw_grads(side, iz, ir, *outs)


def _raw_grads(side: _Side, iz: Tensor, ir: Tensor, de: Tensor, diz: Tensor, dr: Tensor, dir_: Tensor):
    """(∂e, ∂r or None) in the inputs' dtypes from the backward op's four outputs (∂r empty: not returned)."""
    if side.r is None and dr.shape[0]:  # self mode an op took as two sets (the rows traced apart): both are e
        de, diz = de + dr, diz + dir_
    g_e = through_norm(side.e, iz, de, diz, side.unit).to(side.e.dtype)
    if side.r is None or dr.shape[0] == 0:
        return g_e, None
    return g_e, through_norm(side.r, ir, dr, dir_, side.ref_unit).to(side.r.dtype)


class _LabelLoss(torch.autograd.Function):
    """(e [B,D], r [M,D] or None) -> (output, valid [B]): per-row losses [B], or for margin statistics
    (``params[0] == Form.MARGIN``) the row extrema (p_min, n_max) [B, 2]. Without a reference set (r None)
    the rows score against themselves with ``self_offset`` 0. ``params`` = (form id, β, γ⁺, γ⁻, m, λ) as the
    ops take them (InfoNCE: id 4, β = 1/τ); labels int64; ``unit``/``ref_unit``: the rows / reference rows
    are taken as they are (unit vectors already, or the "dot" similarity)."""

    @staticmethod
    def forward(ctx, e, r, labels, ref_labels, similarity, params, self_offset, kernels, unit, ref_unit):
        iz = inverse_norm(e, unit)
        ir = iz if r is None else inverse_norm(r, ref_unit)
        offset = 0 if r is None else self_offset
        args = (e, iz, e if r is None else r, ir, labels, labels if r is None else ref_labels, offset,
                SIMILARITIES[similarity], *params)
        # A constant reference set: where the kernels can, the gradient comes with the forward (in one sweep
        # while the score rows fit the caches), and the backward only scales it.
        with_forward = (r is not None and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
                        and params[0] != Form.MARGIN and kernels.can(FWD_GRAD, e.device))
        if with_forward:
            rows, stats, de, diz = kernels.ops.oucl_label_fwd_grad(*args)
        else:
            (rows, stats), de, diz = kernels.ops.oucl_label_fwd(*args), None, None
        ctx.save_for_backward(e, r, labels, ref_labels, stats, iz, ir, de, diz)
        ctx.similarity, ctx.params, ctx.kernels = similarity, params, kernels
        ctx.unit, ctx.ref_unit, ctx.self_offset = unit, ref_unit, offset
        if params[0] == Form.MARGIN:
            rows = stats[:, [Stat.P_MIN, Stat.N_MAX]]
        return with_valid(ctx, rows, stats)

    @staticmethod
    def backward(ctx, grad_out, _grad_valid):
        e, r, labels, ref_labels, stats, iz, ir, de, diz = ctx.saved_tensors
        side = _Side(e, r, labels, ref_labels, stats, ctx.unit, ctx.ref_unit, ctx.self_offset)
        ref_grad = r is not None and ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            grads = _differentiable_grads(side, grad_out, ctx.similarity, ctx.params, ctx.kernels, ref_grad)
        elif de is not None:
            grads = through_norm(e, iz, grad_out[:, None] * de, grad_out * diz, ctx.unit).to(e.dtype), None
        else:
            outs = ctx.kernels.ops.oucl_label_bwd(
                grad_out.contiguous(), e, iz, e if r is None else r, ir, labels, labels if r is None else ref_labels,
                stats, ctx.self_offset, SIMILARITIES[ctx.similarity], *ctx.params, r is None or ref_grad)
            grads = _raw_grads(side, iz, ir, *outs)
        return grads + (None,) * 8


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


def _rows_as_taken(emb: Tensor, ref_emb: Optional[Tensor], similarity: str, scale: Optional[Tensor],
                   ref_unit: bool = False):
    """(rows, reference rows, similarity, unit, ref_unit) as the label Functions take them: with a row
    ``scale`` (a temperature tensor, :func:`metaug_fast.reference.temperature_scale`), the rows as the
    similarity takes them times it, under "dot" and taken as they are; without, the inputs as they are, taken
    as they are for "dot" only (``ref_unit``: the reference rows are unit vectors already)."""
    if scale is None:
        unit = not normalizes(similarity)
        return emb, ref_emb, similarity, unit, ref_unit or unit
    emb = reference.similarity_rows(emb, similarity) * scale
    if ref_emb is not None:
        ref_emb = (ref_emb.to(emb.dtype) if ref_unit else reference.similarity_rows(ref_emb, similarity)) * scale
    return emb, ref_emb, "dot", True, True


def _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, self_offset, kernels, ref_unit=False,
                scale=None):
    """(output, valid) of :class:`_LabelLoss` for the public contract's arguments."""
    emb, ref_emb, similarity, unit, ref_unit = _rows_as_taken(emb, ref_emb, similarity, scale, ref_unit)
    offset = -1 if self_offset is None else int(self_offset)
    ref_labels = None if ref_labels is None else ref_labels.long()
    return _LabelLoss.apply(emb, ref_emb, labels.long(), ref_labels, similarity, params, offset, kernels, unit,
                            ref_unit)


def oucl_embeddings_fused(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                          ref_labels: Optional[Tensor] = None, *, similarity: str, reduction: str, form: str,
                          beta: float, gamma_pos: float, gamma_neg: float, margin: float, lam: float,
                          self_offset: Optional[int] = None, ref_unit: bool = False,
                          kernels: LabelKernels) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.oucl_embeddings`, on ``kernels``. ``ref_unit``: the rows
    of ``ref_emb`` are unit vectors already (a memory bank keeps them so) and are taken as they are."""
    params = LossParams(form, beta, gamma_pos, gamma_neg, margin, lam).op_args()
    rows, valid = _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, self_offset, kernels, ref_unit)
    return reference.reduce_rows(rows, valid, reduction, emb.dtype)


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
                              kernels: LabelKernels) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.info_nce_embeddings`, on ``kernels``."""
    params, scale, weights = info_nce_setup(temperature, similarity, average, labels, ref_labels, self_offset)
    rows, valid = _label_loss(emb, labels, ref_emb, ref_labels, similarity, params, self_offset, kernels,
                              scale=scale)
    return reference.reduce_rows(rows, valid, reduction, emb.dtype, weights)


class _CrossLoss(torch.autograd.Function):
    """(e [B,D], r [M,D]) -> (rows [B], valid [B], rows' [M], valid' [M]): InfoNCE of each row of e against r
    and of each row of r against e (cross mode), by the cross-mode ops (one tile sweep for both directions).
    Under ``create_graph`` each direction takes its differentiable path, so second derivatives stay exact."""

    @staticmethod
    def forward(ctx, e, r, labels, ref_labels, similarity, params, kernels, unit):
        iz, ir = inverse_norm(e, unit), inverse_norm(r, unit)
        outs = kernels.ops.oucl_label_cross_fwd(e, iz, r, ir, labels, ref_labels, SIMILARITIES[similarity], *params)
        ctx.save_for_backward(e, r, labels, ref_labels, outs[1], outs[3], iz, ir)
        ctx.similarity, ctx.params, ctx.kernels, ctx.unit = similarity, params, kernels, unit
        return with_valids(ctx, *outs)

    @staticmethod
    def backward(ctx, grad_z, _gvz, grad_r, _gvr):
        e, r, labels, ref_labels, stats_z, stats_r, iz, ir = ctx.saved_tensors
        args = (ctx.similarity, ctx.params, ctx.kernels, True)
        z_side = _Side(e, r, labels, ref_labels, stats_z, ctx.unit, ctx.unit, -1)
        if torch.is_grad_enabled():
            g_e, g_r = _differentiable_grads(z_side, grad_z, *args)
            r_side = _Side(r, e, ref_labels, labels, stats_r, ctx.unit, ctx.unit, -1)
            g_r2, g_e2 = _differentiable_grads(r_side, grad_r, *args)
            return (g_e + g_e2, g_r + g_r2) + (None,) * 6
        outs = ctx.kernels.ops.oucl_label_cross_bwd(grad_z.contiguous(), grad_r.contiguous(), e, iz, r, ir, labels,
                                                    ref_labels, stats_z, stats_r, SIMILARITIES[ctx.similarity],
                                                    *ctx.params)
        return _raw_grads(z_side, iz, ir, *outs) + (None,) * 6


def symmetric_info_nce_fused(emb: Tensor, ref_emb: Tensor, labels: Tensor, ref_labels: Tensor, *, temperature,
                             similarity: str, reduction: str, average: str = "anchor",
                             kernels: LabelKernels) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.symmetric_info_nce`, both directions in one sweep of the
    cross-mode ops of ``kernels``."""
    params, scale, w_z = info_nce_setup(temperature, similarity, average, labels, ref_labels, None)
    w_r = None if w_z is None else reference.positive_counts(ref_labels, labels)
    dtype = emb.dtype
    emb, ref_emb, similarity, unit, _ = _rows_as_taken(emb, ref_emb, similarity, scale)
    rows_z, valid_z, rows_r, valid_r = _CrossLoss.apply(emb, ref_emb, labels.long(), ref_labels.long(), similarity,
                                                        params, kernels, unit)
    return (reference.reduce_rows(rows_z, valid_z, reduction, dtype, w_z)
            + reference.reduce_rows(rows_r, valid_r, reduction, dtype, w_r)) / 2


def margin_statistics_embeddings_fused(emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                                       ref_labels: Optional[Tensor] = None, *, similarity: str,
                                       kernels: LabelKernels):
    """Same contract as :func:`metaug_fast.reference.margin_statistics_embeddings`, on ``kernels``; the
    gradient goes to the entries attaining each extremum, shared equally among ties (as torch.amin/amax)."""
    extrema, valid = _label_loss(emb, labels, ref_emb, ref_labels, similarity, LossParams.margins(), None, kernels)
    return sigmas(extrema[:, 0], extrema[:, 1], valid, emb.dtype)


def pairwise_similarity_fused(a: Tensor, b: Tensor, *, similarity: str) -> Tensor:
    """d(a_i, b_j) ``[B,M]`` in ``a.dtype``: normalization (but for "dot"), then one ATen GEMM with the
    similarity's affine map folded in (``addmm`` with α = 1/2 and a broadcast 1/2 for the shifted cosine).
    Differentiable to any order by autograd."""
    rows = (reference.similarity_rows(x, similarity) for x in (a, b))
    return _similarities(*rows, similarity).to(a.dtype)
