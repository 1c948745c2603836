"""Ring strategy: the other ranks' normalized embeddings visit one chunk at a time around the ring instead
of being gathered: per-rank memory O((b + largest chunk)·D); first derivatives only."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._common import (
    _checked_params,
    _fused_op_args,
    _gather_padded,
    _gather_sizes,
    _global_loss,
    _merge_stats,
    _normalized,
    _valid_rows,
)


def _shift(tensors: List[Tensor], recv_shapes: List[torch.Size], rank: int, world: int, group) -> List[Tensor]:
    """Send ``tensors`` to rank + 1 and receive the same kinds of tensors (of ``recv_shapes``) from rank - 1."""
    dst, src = (rank + 1) % world, (rank - 1) % world
    received = [torch.empty(shape, dtype=t.dtype, device=t.device) for t, shape in zip(tensors, recv_shapes)]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, dst) if group else dst, group)
           for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, dist.get_global_rank(group, src) if group else src, group) for r in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _RingOUCL(torch.autograd.Function):
    """Per-row OUCL of this rank's normalized rows ``zn [b, D]`` against every rank's rows, which travel
    around the ring one chunk at a time (forward: row log-sum-exps; backward: the chunks again, each
    carrying the gradient its owner gets). Peak memory O((b + largest chunk)·D)."""

    @staticmethod
    def forward(ctx, zn, labels, all_labels, sizes, rank, group, similarity, params, ops):
        world = len(sizes)
        chunk, chunk_labels = zn, labels
        ones = zn.new_ones(zn.shape[0])  # the rows are normalized: unit inverse norms
        parts = []
        for step in range(world):
            owner = (rank - step) % world
            chunk_ones = ones if chunk is zn else chunk.new_ones(chunk.shape[0])
            _, stats = ops.oucl_label_fwd(zn, ones, chunk, chunk_ones, labels, chunk_labels,
                                          0 if owner == rank else -1, similarity, *params)
            parts.append(stats)
            if step < world - 1:
                nxt = sizes[(owner - 1) % world]
                chunk, chunk_labels = _shift([chunk, chunk_labels], [(nxt, zn.shape[1]), (nxt,)], rank, world, group)
        valid = _valid_rows(labels, all_labels)
        rows, merged = _merge_stats(torch.stack(parts, 1), valid, params)
        ctx.save_for_backward(zn, labels, merged)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        ctx.similarity, ctx.params, ctx.ops = similarity, params, ops
        ctx.mark_non_differentiable(valid)
        return rows, valid

    @staticmethod
    def backward(ctx, grad_rows, _grad_valid):
        if torch.is_grad_enabled():
            raise RuntimeError("ring-mode OUCL provides first derivatives only (use all_gather for second order)")
        zn, labels, merged = ctx.saved_tensors
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        world = len(sizes)
        ops = ctx.ops
        grad_rows = grad_rows.contiguous()
        own = torch.zeros_like(zn)
        ones = zn.new_ones(zn.shape[0])
        chunk, chunk_labels, chunk_grad = zn, labels, torch.zeros_like(zn)
        for step in range(world):
            owner = (rank - step) % world
            chunk_ones = ones if chunk is zn else chunk.new_ones(chunk.shape[0])
            # With unit inverse norms the op's row gradients are those of the normalized rows; our own chunk
            # (self mode) has the whole gradient in the first.
            g_z, _, g_c, _ = ops.oucl_label_bwd(grad_rows, zn, ones, chunk, chunk_ones, labels, chunk_labels, merged,
                                                0 if owner == rank else -1, ctx.similarity, *ctx.params)
            own += g_z
            if g_c.shape[0]:
                chunk_grad = chunk_grad + g_c
            nxt = sizes[(owner - 1) % world]
            shapes = [(nxt, zn.shape[1]), (nxt,), (nxt, zn.shape[1])]
            if step < world - 1:
                chunk, chunk_labels, chunk_grad = _shift([chunk, chunk_labels, chunk_grad], shapes, rank, world, group)
        # The last chunk's gradient is one hop from its owner (rank + 1): one more shift brings ours home
        # (with one rank the only chunk is our own).
        (mine,) = _shift([chunk_grad], [zn.shape], rank, world, group) if world > 1 else (chunk_grad,)
        return own + mine, None, None, None, None, None, None, None, None


def oucl_embeddings_ring(
    emb: Tensor,
    labels: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    similarity: str = "shifted_cosine",
    backend: str = "auto",
    **params,
) -> Tensor:
    """Label-mode OUCL over the global batch like :func:`oucl_embeddings_all_gather`, but the other ranks'
    embeddings visit one at a time around the ring instead of being gathered: per-rank memory
    O((b + largest rank's b)·D) instead of O(Σ b · D). Same loss and gradients; first derivatives only.
    Needs the fused label op of the tensors' device: ``backend`` names whose ("auto": the first that has
    them there, cpp on CPU); one without them is refused. ``emb [b, D]`` and ``labels [b]`` as
    :func:`oucl_embeddings_all_gather`.

    Example:
        >>> import torch
        >>> from metaug_fast import distributed
        >>> emb = torch.randn(16, 32)
        >>> labels = torch.arange(8).repeat(2) + 8 * torch.distributed.get_rank()
        >>> distributed.oucl_embeddings_ring(emb, labels).shape
        torch.Size([])
    """
    similarity, checked = _checked_params("oucl_embeddings_ring", emb, labels, reduction,
                                          dict(params, similarity=similarity))
    kernels, sim_id, op_params = _fused_op_args(emb, similarity, checked, backend)
    zn = _normalized(emb)
    rank = dist.get_rank(group)
    sizes = _gather_sizes(emb.shape[0], emb.device, group)
    all_labels = _gather_padded(labels.long(), sizes, group)
    rows, valid = _RingOUCL.apply(zn, labels.long(), all_labels, sizes, rank, group, sim_id, op_params,
                                  kernels.ops)
    return _global_loss(rows, valid, reduction, group).to(emb.dtype)
