"""Ring strategy: the other ranks' normalized embeddings visit one chunk at a time around the ring instead
of being gathered: per-rank memory O((b + largest chunk)·D); first derivatives only.

Overlapped (the default), each hop is posted before the chunk in hand is scored and waited for after, so
the transfer runs while the kernels do: the forward sends the chunk it scores and receives the next; the
backward does the same with the chunk and its labels, and sends each chunk's accumulated gradient as soon
as its own part is added, one step behind the chunk (the next rank waits for it only once it has scored
that chunk). Every rank posts its receives on a link in the order the sender posts the sends (gradient of
the previous chunk, then the next chunk), as NCCL, which matches point-to-point operations by order, needs.
The sums are those of the blocking ring, in the same order: the results are bitwise equal."""
from __future__ import annotations

from typing import List, Optional, Tuple

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


class _Hop:
    """One hop of the ring in flight: posts the receives of ``recv`` (a list of (shape, dtype), on
    ``device``) from rank - 1 and the sends of ``send`` to rank + 1 as one batch, the receives first;
    :meth:`wait` completes them and returns what was received. The tensors sent stay alive until then."""

    def __init__(self, send: List[Tensor], recv: List[Tuple[Tuple[int, ...], torch.dtype]], device: torch.device,
                 rank: int, world: int, group) -> None:
        dst, src = (rank + 1) % world, (rank - 1) % world

        def peer(r: int) -> int:
            return dist.get_global_rank(group, r) if group else r

        self.received = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in recv]
        self.sent = [t.contiguous() for t in send]
        ops = [dist.P2POp(dist.irecv, r, peer(src), group) for r in self.received]
        ops += [dist.P2POp(dist.isend, t, peer(dst), group) for t in self.sent]
        self.requests = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> List[Tensor]:
        for req in self.requests:
            req.wait()
        self.requests, self.sent = [], []
        return self.received


def _shift(tensors: List[Tensor], recv_shapes: List[Tuple[int, ...]], rank: int, world: int, group) -> List[Tensor]:
    """Send ``tensors`` to rank + 1 and receive the same kinds of tensors (of ``recv_shapes``) from rank - 1."""
    recv = [(shape, t.dtype) for t, shape in zip(tensors, recv_shapes)]
    return _Hop(tensors, recv, tensors[0].device, rank, world, group).wait()


class _RingOUCL(torch.autograd.Function):
    """Per-row OUCL of this rank's normalized rows ``zn [b, D]`` against every rank's rows, which travel
    around the ring one chunk at a time (forward: row log-sum-exps; backward: the chunks again, each
    carrying the gradient its owner gets). Peak memory O((b + largest chunk)·D)."""

    @staticmethod
    def forward(ctx, zn, labels, all_labels, sizes, rank, group, similarity, params, ops, overlap):
        world = len(sizes)
        chunk, chunk_labels = zn, labels
        ones = zn.new_ones(zn.shape[0])  # the rows are normalized: unit inverse norms
        parts = []
        for step in range(world):
            owner = (rank - step) % world
            hop = None
            if step < world - 1:
                nxt = sizes[(owner - 1) % world]
                recv = [((nxt, zn.shape[1]), zn.dtype), ((nxt,), labels.dtype)]
                hop = _Hop([chunk, chunk_labels], recv, zn.device, rank, world, group)
                if not overlap:
                    hop.wait()
            chunk_ones = ones if chunk is zn else chunk.new_ones(chunk.shape[0])
            _, stats = ops.oucl_label_fwd(zn, ones, chunk, chunk_ones, labels, chunk_labels,
                                          0 if owner == rank else -1, similarity, *params)
            parts.append(stats)
            if hop is not None:
                chunk, chunk_labels = hop.wait()
        valid = _valid_rows(labels, all_labels)
        rows, merged = _merge_stats(torch.stack(parts, 1), valid, params)
        ctx.save_for_backward(zn, labels, merged)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        ctx.similarity, ctx.params, ctx.ops, ctx.overlap = similarity, params, ops, overlap
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
        chunk, chunk_labels = zn, labels
        sending = None  # the previous chunk's gradient on its way to rank + 1
        for step in range(world):
            owner = (rank - step) % world
            # The gradient the chunk gathered on the ranks before us (none on our own chunk), then the next
            # chunk and its labels: received in the order rank - 1 sent them.
            recv = [(chunk.shape, zn.dtype)] if step > 0 else []
            send = []
            if step < world - 1:
                nxt = sizes[(owner - 1) % world]
                recv += [((nxt, zn.shape[1]), zn.dtype), ((nxt,), labels.dtype)]
                send = [chunk, chunk_labels]
            hop = _Hop(send, recv, zn.device, rank, world, group)
            if not ctx.overlap:  # every transfer of the step done before its scoring
                hop.wait()
                if sending is not None:
                    sending.wait()
            chunk_ones = ones if chunk is zn else chunk.new_ones(chunk.shape[0])
            # With unit inverse norms the op's row gradients are those of the normalized rows; our own chunk
            # (self mode) has the whole gradient in the first.
            g_z, _, g_c, _ = ops.oucl_label_bwd(grad_rows, zn, ones, chunk, chunk_ones, labels, chunk_labels, merged,
                                                0 if owner == rank else -1, ctx.similarity, *ctx.params)
            own += g_z
            received = hop.wait()
            # Rank + 1 posted the receive of the previous gradient with this step's hop: the send completes
            # without waiting for anything of ours, and one gradient at a time is in flight.
            if sending is not None:
                sending.wait()
            chunk_grad = received.pop(0) if step > 0 else torch.zeros_like(zn)
            if g_c.shape[0]:
                chunk_grad = chunk_grad + g_c
            if step < world - 1:
                sending = _Hop([chunk_grad], [], zn.device, rank, world, group)
                chunk, chunk_labels = received
        # The last chunk's gradient is one hop from its owner (rank + 1): one more hop brings ours home
        # (with one rank the only chunk is our own).
        mine = chunk_grad
        if world > 1:
            (mine,) = _Hop([chunk_grad], [(zn.shape, zn.dtype)], zn.device, rank, world, group).wait()
        return own + mine, None, None, None, None, None, None, None, None, None


def oucl_embeddings_ring(
    emb: Tensor,
    labels: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    similarity: str = "shifted_cosine",
    backend: str = "auto",
    overlap: bool = True,
    **params,
) -> Tensor:
    """Label-mode OUCL over the global batch like :func:`oucl_embeddings_all_gather`, but the other ranks'
    embeddings visit one at a time around the ring instead of being gathered: per-rank memory
    O((b + largest rank's b)·D) instead of O(Σ b · D). Same loss and gradients; first derivatives only.
    ``overlap``: each hop's transfer runs while the chunk in hand is scored (two chunks in memory instead of
    one); False waits for each hop first. The results are bitwise the same.
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
    if not isinstance(overlap, bool):
        raise TypeError(f"oucl_embeddings_ring: overlap must be a bool, got {type(overlap).__name__}")
    rows, valid = _RingOUCL.apply(zn, labels.long(), all_labels, sizes, rank, group, sim_id, op_params,
                                  kernels.ops, overlap)
    return _global_loss(rows, valid, reduction, group).to(emb.dtype)
