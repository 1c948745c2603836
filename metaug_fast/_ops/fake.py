"""Fake (meta) implementations of the C++/CUDA ops of ``torch.ops.metaug_fast``: the shapes, dtypes and
devices of their outputs, without computing them. ``torch.compile`` traces the ops through these (with
``fullgraph=True`` too), and ``torch.library.opcheck`` checks them against the real kernels
(tests/test_compile.py). Also their autocast rule: the label ops run their GEMMs in their inputs' fp32/fp64,
autocast off inside (under ``torch.autocast`` those GEMMs would otherwise come back in bf16/fp16 into fp32
buffers). Registered once, when the extension is loaded (metaug_fast.backends.cpp)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..contract import N_STATS, label_self_mode

_NAMESPACE = "metaug_fast"


def _acc(x: Tensor) -> torch.dtype:
    """The accumulation dtype of the score ops' per-row outputs: fp32 for fp16/bf16 scores."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _rows_and_stats(x: Tensor, dtype: torch.dtype):
    B = x.shape[0]
    return x.new_empty((B,), dtype=dtype), x.new_empty((B, N_STATS), dtype=dtype)


def _like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


def oucl_score_fwd(pos, neg, pos_mask, neg_mask, form, beta, gamma_pos, gamma_neg, margin, lam):
    return _rows_and_stats(pos, _acc(pos))


def oucl_score_bwd(grad_rows, pos, neg, pos_mask, neg_mask, stats, form, beta, gamma_pos, gamma_neg, margin, lam):
    return _like(pos), _like(neg)


def oucl_score_bwd_bwd(grad_rows, gg_pos, gg_neg, pos, neg, pos_mask, neg_mask, stats, form, beta, gamma_pos,
                       gamma_neg, margin, lam):
    return _like(grad_rows), _like(pos), _like(neg)


def margin_score_fwd(pos, neg, pos_mask, neg_mask):
    return _rows_and_stats(pos, _acc(pos))[1]


def margin_score_bwd(grad, pos, neg, pos_mask, neg_mask, stats):
    return _like(pos), _like(neg)


def _raw_grads(e: Tensor, iz: Tensor, r: Tensor, ir: Tensor, reference_parts: bool):
    """(∂e, ∂iz, ∂r, ∂ir) of the label backward ops, in the inverse norms' dtype; ∂r and ∂ir are empty when the
    reference's parts are not returned (self mode, or no gradient for the reference set)."""
    M = r.shape[0] if reference_parts else 0
    return (e.new_empty(e.shape, dtype=iz.dtype), iz.new_empty(iz.shape), r.new_empty((M, r.shape[1]), dtype=ir.dtype),
            ir.new_empty((M,)))


def oucl_score_fwd_grad(pos, neg, pos_mask, neg_mask, grad_rows, form, beta, gamma_pos, gamma_neg, margin, lam):
    return (*_rows_and_stats(pos, _acc(pos)), _like(pos), _like(neg))


def oucl_label_fwd(e, iz, r, ir, labels, ref_labels, self_offset, similarity, form, beta, gamma_pos, gamma_neg,
                   margin, lam):
    return _rows_and_stats(e, iz.dtype)


def oucl_label_bwd(grad_rows, e, iz, r, ir, labels, ref_labels, stats, self_offset, similarity, form, beta,
                   gamma_pos, gamma_neg, margin, lam, ref_grad=True):
    return _raw_grads(e, iz, r, ir, ref_grad and not label_self_mode(e, iz, r, ir, self_offset))


def oucl_label_fwd_grad(e, iz, r, ir, labels, ref_labels, self_offset, similarity, form, beta, gamma_pos, gamma_neg,
                        margin, lam):
    return (*_rows_and_stats(e, iz.dtype), *_raw_grads(e, iz, r, ir, False)[:2])


def oucl_label_rows_bwd_bwd(grad_rows, t, s, labels, ref_labels, stats, row0, self_offset, form, beta, gamma_pos,
                            gamma_neg, margin, lam, sums=None):
    return _like(grad_rows), _like(s), _like(s)


def oucl_label_rows_hvp_sums(t, s, labels, ref_labels, stats, row0, self_offset, form, beta, gamma_pos, gamma_neg,
                             margin, lam):
    return s.new_empty((s.shape[0], 4)), s.new_empty(s.shape[0])


def oucl_label_self_bwd_bwd(grad_rows, zn, v, labels, stats, similarity, form, beta, gamma_pos, gamma_neg, margin,
                            lam):
    return _like(grad_rows), _like(zn)


def oucl_label_hvp(grad_rows, e, iz, r, ir, v_z, v_r, labels, ref_labels, stats, self_offset, similarity, form, beta,
                   gamma_pos, gamma_neg, margin, lam, ref_grad):
    return (iz.new_empty(iz.shape), e.new_empty(e.shape, dtype=iz.dtype),
            r.new_empty((r.shape[0] if ref_grad else 0, r.shape[1]), dtype=ir.dtype))


def oucl_label_cross_fwd(e, iz, r, ir, labels, ref_labels, similarity, form, beta, gamma_pos, gamma_neg, margin,
                         lam):
    return (*_rows_and_stats(e, iz.dtype), *_rows_and_stats(r, ir.dtype))


def oucl_label_cross_bwd(grad_z, grad_r, e, iz, r, ir, labels, ref_labels, stats_z, stats_r, similarity, form, beta,
                         gamma_pos, gamma_neg, margin, lam):
    return _raw_grads(e, iz, r, ir, True)


OPS = (oucl_score_fwd, oucl_score_bwd, oucl_score_bwd_bwd, oucl_score_fwd_grad, margin_score_fwd, margin_score_bwd,
       oucl_label_fwd, oucl_label_bwd, oucl_label_fwd_grad, oucl_label_rows_bwd_bwd, oucl_label_rows_hvp_sums,
       oucl_label_self_bwd_bwd, oucl_label_hvp, oucl_label_cross_fwd, oucl_label_cross_bwd)


# The ops that multiply matrices inside (ATen GEMMs), per device type they run on.
_GEMM_OPS = {"cpu": (oucl_label_fwd, oucl_label_bwd, oucl_label_fwd_grad, oucl_label_rows_bwd_bwd,
                     oucl_label_self_bwd_bwd, oucl_label_cross_fwd, oucl_label_cross_bwd),
             "cuda": (oucl_label_fwd, oucl_label_bwd, oucl_label_hvp, oucl_label_cross_fwd, oucl_label_cross_bwd)}


def register() -> None:
    """Registers every fake implementation and the label ops' autocast rule (the ops must be defined: the
    extension is loaded). Under autocast their fp16/bf16 inputs would be cast to fp32 (they take fp32/fp64
    only), fp64 ones are left as they are, and the ops run with autocast off."""
    for fn in OPS:
        torch.library.register_fake(f"{_NAMESPACE}::{fn.__name__}", fn)
    for device, ops in _GEMM_OPS.items():
        if torch._C._is_autocast_available(device):
            for fn in ops:
                torch.library.register_autocast(f"{_NAMESPACE}::{fn.__name__}", device, torch.float32)
