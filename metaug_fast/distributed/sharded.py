"""Sharded-reference strategy: a reference set (a memory bank) split across ranks stays where it is and the
queries travel; each rank merges every shard's per-row statistics; first derivatives only."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._common import (
    _checked_params,
    _fused_op_args,
    _gather_padded,
    _gather_sizes,
    _GatherRows,
    _merge_stats,
    _normalized,
)


class _ShardOUCL(torch.autograd.Function):
    """Per-row OUCL of the gathered queries ``zq [Q, D]`` against a reference set split across ranks, of
    which this rank holds ``shard [m, D]``: each rank computes its shard's row statistics, which are
    all-gathered (Q×5 numbers per rank) and merged, so every rank gets all Q losses. The backward returns
    this shard's part of ∂/∂zq; the gather of the queries sums the parts."""

    @staticmethod
    def forward(ctx, zq, q_labels, shard, shard_labels, valid, group, similarity, params, ops):
        # The rows are normalized: unit inverse norms.
        _, stats = ops.oucl_label_fwd(zq, zq.new_ones(zq.shape[0]), shard, shard.new_ones(shard.shape[0]), q_labels,
                                      shard_labels, -1, similarity, *params)
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, stats.contiguous(), group=group)
        rows, merged = _merge_stats(torch.stack(parts, 1), valid, params)
        ctx.save_for_backward(zq, q_labels, shard, shard_labels, merged)
        ctx.similarity, ctx.params, ctx.ops = similarity, params, ops
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        if torch.is_grad_enabled():
            raise RuntimeError("sharded OUCL provides first derivatives only")
        zq, q_labels, shard, shard_labels, merged = ctx.saved_tensors
        g_q = ctx.ops.oucl_label_bwd(grad_rows.contiguous(), zq, zq.new_ones(zq.shape[0]), shard,
                                     shard.new_ones(shard.shape[0]), q_labels, shard_labels, merged, -1,
                                     ctx.similarity, *ctx.params, False)[0]
        return g_q, None, None, None, None, None, None, None, None


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
    own ``emb``. The shards are constants (a bank is not trained by the loss). First derivatives only.

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
    kernels, sim_id, op_params = _fused_op_args(emb, similarity, checked, backend)
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
    rows = _ShardOUCL.apply(zq, q_labels, rn, shard_labels, valid, group, sim_id, op_params, kernels.ops)
    # Every rank holds all rows, so the loss is computed whole (no all-reduce) and its gradient reaches
    # every query; the gather's backward sums the shards' parts and keeps this rank's rows.
    total = rows.sum()
    if reduction == "mean":
        total = total / valid.sum().clamp(min=1).to(total.dtype)
    return total.to(emb.dtype)
