"""Sharded-reference strategy: a reference set (a memory bank) split across ranks stays where it is and the
queries travel; each rank merges every shard's per-row statistics; first and second derivatives (the second
adds the shards' Hessian sums with one all-reduce)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._ops.label import _LabelDoubleBackward, hvp_row_sums
from ..contract import HVP_FORMS, SIMILARITIES
from ._common import (
    _checked_params,
    _fused_op_args,
    _gather_padded,
    _gather_sizes,
    _GatherRows,
    _LastDerivative,
    _merge_stats,
    _normalized,
)


class _ShardOUCL(torch.autograd.Function):
    """Per-row OUCL of the gathered queries ``zq [Q, D]`` against a reference set split across ranks, of
    which this rank holds ``shard [m, D]``: each rank computes its shard's row statistics, which are
    all-gathered (Q×5 numbers per rank) and merged, so every rank gets all Q losses. The backward returns
    this shard's part of ∂/∂zq; the gather of the queries sums the parts."""

    @staticmethod
    def forward(ctx, zq, q_labels, shard, shard_labels, valid, group, similarity, params, kernels):
        # The rows are normalized: unit inverse norms.
        _, stats = kernels.ops.oucl_label_fwd(zq, zq.new_ones(zq.shape[0]), shard, shard.new_ones(shard.shape[0]),
                                              q_labels, shard_labels, -1, SIMILARITIES[similarity], *params)
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, stats.contiguous(), group=group)
        rows, merged = _merge_stats(torch.stack(parts, 1), valid, params)
        ctx.save_for_backward(zq, q_labels, shard, shard_labels, merged)
        ctx.args = (group, similarity, params, kernels)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        grad_rows = grad_rows.contiguous()
        if torch.is_grad_enabled():
            return (_ShardGrad.apply(grad_rows, *ctx.saved_tensors, *ctx.args),) + (None,) * 8
        return (_shard_grad(grad_rows, *ctx.saved_tensors, *ctx.args),) + (None,) * 8


def _shard_grad(grad_rows, zq, q_labels, shard, shard_labels, merged, group, similarity, params, kernels):
    """This shard's part of ∂L/∂zq ``[Q, D]`` for the row weights ``grad_rows [Q]``."""
    return kernels.ops.oucl_label_bwd(grad_rows, zq, zq.new_ones(zq.shape[0]), shard, shard.new_ones(shard.shape[0]),
                                      q_labels, shard_labels, merged, -1, SIMILARITIES[similarity], *params,
                                      False)[0]


class _ShardGrad(torch.autograd.Function):
    """(grad_rows [Q], zq [Q, D]) -> :func:`_shard_grad`, differentiable once more (the MetAug meta step's
    HVP). The cotangent on every rank's part is the same (the gather's adjoint), so each rank takes its
    shard's round-1 Hessian sums (:func:`hvp_row_sums`), one all-reduce of Q×4 numbers makes them the whole
    rows', and each rank's part of the product follows from them; the gather of the queries sums the parts.
    The hinge (no Hessian) needs no sums."""

    @staticmethod
    def forward(ctx, grad_rows, zq, q_labels, shard, shard_labels, merged, group, similarity, params, kernels):
        ctx.save_for_backward(grad_rows, zq, q_labels, shard, shard_labels, merged)
        ctx.args = (group, similarity, params, kernels)
        return _shard_grad(grad_rows, zq, q_labels, shard, shard_labels, merged, *ctx.args)

    @staticmethod
    def backward(ctx, v):
        grad_rows, zq, q_labels, shard, shard_labels, merged = ctx.saved_tensors
        args = ctx.args

        def hvp(grad_rows, zq, v):
            return _shard_hvp(grad_rows, zq, v.contiguous(), q_labels, shard, shard_labels, merged, *args)

        return _LastDerivative.apply("sharded OUCL", hvp, grad_rows, zq, v) + (None,) * 8


def _shard_hvp(grad_rows, zq, v, q_labels, shard, shard_labels, merged, group, similarity, params, kernels):
    """(∂/∂grad_rows [Q], this shard's part of ∂/∂zq [Q, D]) of ⟨v, ∂L/∂zq⟩ (:class:`_ShardGrad`)."""
    none = shard[:0]  # the shard is constant: no cotangent on it
    sums = d_g = None
    if params[0] in HVP_FORMS:
        sums, d_g = hvp_row_sums(zq, shard, v, none, q_labels, shard_labels, merged, similarity, params, -1, kernels)
        dist.all_reduce(sums, group=group)
    dg, d_zq, _ = _LabelDoubleBackward._vjp(grad_rows, zq, shard, v, none, q_labels, shard_labels, merged, similarity,
                                            params, -1, kernels, False, sums)
    return (dg if d_g is None else d_g), d_zq


def oucl_embeddings_sharded(
    emb: Tensor,
    labels: Tensor,
    shard: Tensor,
    shard_labels: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    similarity: str = "shifted_cosine",
    shard_unit: bool = False,
    backend: str = "auto",
    **params,
) -> Tensor:
    """Label-mode OUCL of every rank's rows against a reference set (a memory bank) split across ranks.

    The queries travel, the reference set stays: each rank's ``emb [b, D]`` are gathered (Σ b × D numbers),
    every rank scores all of them against its ``shard [m, D]`` with the fused label op, and the per-row
    statistics are merged across ranks. Communication is O(Σ b · D) per call whatever the size of the
    reference set; memory per rank O((Σ b + m)·D). The result equals
    ``oucl_embeddings(cat(emb of all ranks), ..., ref_emb=cat(shards), ref_labels=cat(shard_labels))``
    (the global mean over valid rows, or the sum), on every rank, and each rank gets the gradient of its
    own ``emb``. The shards are constants (a bank is not trained by the loss). Differentiable twice.

    Args:
        emb: ``[b, D]`` this rank's embeddings; labels: ``[b]`` integers (b may differ between ranks).
        shard: ``[m, D]`` this rank's part of the reference set (m may differ, and may be 0);
            shard_labels: ``[m]`` integers.
        shard_unit: the shard's rows are unit vectors already (a memory bank keeps them so): they are used as
            they are instead of through a normalized m×D copy.
        backend: whose fused label ops score the shard ("auto": the first that has them on the device); one
            without them (reference) is refused rather than replaced.
        params: form, beta, gamma_pos, gamma_neg, margin, lam, as :func:`metaug_fast.functional.oucl_embeddings`.

    Example:
        >>> import torch
        >>> from metaug_fast import distributed
        >>> shard = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)   # this rank's rows of the bank
        >>> shard_labels = torch.randint(0, 10, (500,))
        >>> emb, labels = torch.randn(16, 32), torch.randint(0, 10, (16,))
        >>> distributed.oucl_embeddings_sharded(emb, labels, shard, shard_labels, shard_unit=True).shape
        torch.Size([])
    """
    similarity, checked = _checked_params("oucl_embeddings_sharded", emb, labels, reduction,
                                          dict(params, similarity=similarity), ref=(shard, shard_labels))
    kernels, _, op_params = _fused_op_args(emb, similarity, checked, backend)
    rank = dist.get_rank(group)
    sizes = _gather_sizes(emb.shape[0], emb.device, group)
    zq = _GatherRows.apply(_normalized(emb), sizes, rank, group)
    q_labels = _gather_padded(labels.long(), sizes, group)
    shard_labels = shard_labels.long()
    # Positives of each query over the whole reference set: counted per shard, then summed over ranks.
    ordered = shard_labels.sort().values
    n_pos = torch.searchsorted(ordered, q_labels, right=True) - torch.searchsorted(ordered, q_labels)
    n_ref = torch.tensor([shard.shape[0]], dtype=torch.long, device=emb.device)
    dist.all_reduce(n_pos, group=group)
    dist.all_reduce(n_ref, group=group)
    valid = (n_pos > 0) & (n_ref - n_pos > 0)
    rn = shard.detach().to(zq.dtype) if shard_unit else _normalized(shard.detach()).to(zq.dtype)
    rows = _ShardOUCL.apply(zq, q_labels, rn, shard_labels, valid, group, similarity, op_params, kernels)
    # Every rank holds all rows, so the loss is computed whole (no all-reduce) and its gradient reaches
    # every query; the gather's backward sums the shards' parts and keeps this rank's rows.
    total = rows.sum()
    if reduction == "mean":
        total = total / valid.sum().clamp(min=1).to(total.dtype)
    return total.to(emb.dtype)
