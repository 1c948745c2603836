"""Ring strategy: the other ranks' normalized embeddings visit one chunk at a time around the ring instead
of being gathered: per-rank memory O((b + largest chunk)·D); first and second derivatives (:class:`_RingGrad`).

Overlapped (the default), each hop is posted before the chunk in hand is scored and waited for after, so
the transfer runs while the kernels do: the forward sends the chunk it scores and receives the next; the
backward does the same with the chunk and its labels, and sends each chunk's accumulated gradient as soon
as its own part is added, one step behind the chunk (the next rank waits for it only once it has scored
that chunk). Every rank posts its receives on a link in the order the sender posts the sends (gradient of
the previous chunk, then the next chunk), as NCCL, which matches point-to-point operations by order, needs.
The sums are those of the blocking ring, in the same order: the results are bitwise equal."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .._ops.label import LabelKernels, _LabelDoubleBackward, hvp_row_sums
from ..contract import HVP_FORMS, SIMILARITIES
from ._common import (
    _checked_params,
    _fused_op_args,
    _gather_padded,
    _gather_sizes,
    _global_loss,
    _LastDerivative,
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


@dataclass(frozen=True)
class _Ring:
    """One call's ring: the ranks' row counts, this rank, the group, whether hops overlap the scoring, and
    what the label ops take (the similarity's name, op params, the backend's :class:`LabelKernels`)."""

    sizes: List[int]
    rank: int
    group: object
    overlap: bool
    similarity: str
    params: tuple
    kernels: LabelKernels

    @property
    def sim_id(self) -> int:
        return SIMILARITIES[self.similarity]

    def offset(self, owner: int) -> int:
        """The label ops' self_offset against ``owner``'s chunk: our own rows exclude their own pair."""
        return 0 if owner == self.rank else -1

    def sweep(self, travel: List[Tensor], visit: Callable[[int, List[Tensor]], Optional[Tensor]],
              returns: bool) -> Optional[Tensor]:
        """Every rank's ``travel`` (row-aligned ``[b, ...]`` tensors, ours first) visits this rank once, in the
        order of the ring, and ``visit(owner, chunk)`` scores each. With ``returns``, ``visit`` gives a
        ``[b_owner, D]`` part for the chunk's owner ([0, D]: none): the parts a chunk gathers travel behind it,
        one step behind, and the sum of ours is returned once it is home; else None."""
        world, rank, group = len(self.sizes), self.rank, self.group
        device, width = travel[0].device, travel[0].shape[1]
        chunk, acc, sending = travel, None, None  # sending: the previous chunk's parts on their way to rank + 1
        for step in range(world):
            owner = (rank - step) % world
            # The parts the chunk gathered on the ranks before us (none on our own chunk), then the next chunk:
            # received in the order rank - 1 sent them.
            recv = [(chunk[0].shape, travel[0].dtype)] if returns and step > 0 else []
            send = []
            if step < world - 1:
                nxt = self.sizes[(owner - 1) % world]
                recv += [((nxt,) + tuple(t.shape[1:]), t.dtype) for t in travel]
                send = chunk
            hop = _Hop(send, recv, device, rank, world, group)
            if not self.overlap:  # every transfer of the step done before its scoring
                hop.wait()
                if sending is not None:
                    sending.wait()
            part = visit(owner, chunk)
            received = hop.wait()
            # Rank + 1 posted the receive of the previous parts with this step's hop: the send completes
            # without waiting for anything of ours, and one chunk's parts at a time are in flight.
            if sending is not None:
                sending.wait()
            if returns:
                acc = received.pop(0) if step > 0 else torch.zeros_like(travel[0])
                if part.shape[0]:
                    acc = acc + part
                if step < world - 1:
                    sending = _Hop([acc], [], device, rank, world, group)
            if step < world - 1:
                chunk = received
        if not returns:
            return None
        # The last chunk's parts are one hop from its owner (rank + 1): one more hop brings ours home (with one
        # rank the only chunk is our own).
        if world > 1:
            (acc,) = _Hop([acc], [((self.sizes[rank], width), travel[0].dtype)], device, rank, world, group).wait()
        return acc


def _ring_grad(ring: _Ring, grad_rows: Tensor, zn: Tensor, labels: Tensor, merged: Tensor) -> Tensor:
    """∂L/∂zn ``[b, D]`` of every rank's rows' losses (weighted by each rank's ``grad_rows [b]``) for this
    rank's rows: the chunks visit again, each carrying the gradient its owner gets."""
    ops, ones = ring.kernels.ops, zn.new_ones(zn.shape[0])  # the rows are normalized: unit inverse norms
    own = torch.zeros_like(zn)

    def visit(owner: int, chunk: List[Tensor]) -> Tensor:
        # With unit inverse norms the op's row gradients are those of the normalized rows; our own chunk
        # (self mode) has the whole gradient in the first.
        c, c_labels = chunk
        g_z, _, g_c, _ = ops.oucl_label_bwd(grad_rows, zn, ones, c, ones if c is zn else c.new_ones(c.shape[0]),
                                            labels, c_labels, merged, ring.offset(owner), ring.sim_id,
                                            *ring.params)
        own.add_(g_z)
        return g_c

    return own + ring.sweep([zn, labels], visit, returns=True)


class _RingOUCL(torch.autograd.Function):
    """Per-row OUCL of this rank's normalized rows ``zn [b, D]`` against every rank's rows, which travel
    around the ring one chunk at a time (forward: row log-sum-exps; backward: the chunks again, each
    carrying the gradient its owner gets). Peak memory O((b + largest chunk)·D)."""

    @staticmethod
    def forward(ctx, zn, labels, all_labels, ring):
        ones = zn.new_ones(zn.shape[0])  # the rows are normalized: unit inverse norms
        parts = []

        def visit(owner: int, chunk: List[Tensor]) -> None:
            c, c_labels = chunk
            parts.append(ring.kernels.ops.oucl_label_fwd(zn, ones, c, ones if c is zn else c.new_ones(c.shape[0]),
                                                         labels, c_labels, ring.offset(owner), ring.sim_id,
                                                         *ring.params)[1])

        ring.sweep([zn, labels], visit, returns=False)
        valid = _valid_rows(labels, all_labels)
        rows, merged = _merge_stats(torch.stack(parts, 1), valid, ring.params)
        ctx.save_for_backward(zn, labels, merged)
        ctx.ring = ring
        ctx.mark_non_differentiable(valid)
        return rows, valid

    @staticmethod
    def backward(ctx, grad_rows, _grad_valid):
        zn, labels, merged = ctx.saved_tensors
        grad_rows = grad_rows.contiguous()
        if torch.is_grad_enabled():
            grad = _RingGrad.apply(grad_rows, zn, labels, merged, ctx.ring)
        else:
            grad = _ring_grad(ctx.ring, grad_rows, zn, labels, merged)
        return grad, None, None, None


class _RingGrad(torch.autograd.Function):
    """(grad_rows [b], zn [b, D]) -> :func:`_ring_grad`, differentiable once more: the MetAug meta step's HVP
    over the global batch. For a cotangent v on every rank's gradient the chunks go round twice, carrying
    their v: round 1 adds each row's Hessian sums over every chunk (:func:`hvp_row_sums`; they need the whole
    row before any term of the product); round 2 takes each chunk's part of the product from the whole sums,
    its part for the chunk's rows travelling back to their owner as the gradient does. The forms with a
    Hessian take both rounds; the hinge (none) only the second."""

    @staticmethod
    def forward(ctx, grad_rows, zn, labels, merged, ring):
        ctx.save_for_backward(grad_rows, zn, labels, merged)
        ctx.ring = ring
        return _ring_grad(ring, grad_rows, zn, labels, merged)

    @staticmethod
    def backward(ctx, v):
        grad_rows, zn, labels, merged = ctx.saved_tensors
        ring = ctx.ring

        def hvp(grad_rows, zn, v):
            return _ring_hvp(ring, grad_rows, zn, v.contiguous(), labels, merged)

        return _LastDerivative.apply("ring-mode OUCL", hvp, grad_rows, zn, v) + (None, None, None)


def _ring_hvp(ring: _Ring, grad_rows: Tensor, zn: Tensor, v: Tensor, labels: Tensor, merged: Tensor):
    """(∂/∂grad_rows [b], ∂/∂zn [b, D]) of Σ over ranks ⟨v, ∂L/∂zn⟩ for this rank (:class:`_RingGrad`)."""
    hessian = ring.params[0] in HVP_FORMS
    sim = ring.similarity
    d_g, d_z = torch.zeros_like(grad_rows), torch.zeros_like(zn)
    sums = None
    if hessian:
        sums = zn.new_zeros(zn.shape[0], 4)

        def add_sums(owner: int, chunk: List[Tensor]) -> None:
            c, c_labels, c_v = chunk
            part, dg = hvp_row_sums(zn, c, v, c_v, labels, c_labels, merged, sim, ring.params, ring.offset(owner),
                                    ring.kernels)
            sums.add_(part)
            d_g.add_(dg)

        ring.sweep([zn, labels, v], add_sums, returns=False)

    def product(owner: int, chunk: List[Tensor]) -> Tensor:
        c, c_labels, c_v = chunk
        dg, dz, dc = _LabelDoubleBackward._vjp(grad_rows, zn, c, v, c_v, labels, c_labels, merged, sim,
                                               ring.params, ring.offset(owner), ring.kernels, False, sums)
        if not hessian:  # with the sums, round 1 has d_g already
            d_g.add_(dg)
        d_z.add_(dz)
        if owner == ring.rank:  # our rows are the chunk's: its part is ours
            d_z.add_(dc)
            return dc[:0]
        return dc

    return d_g, d_z + ring.sweep([zn, labels, v], product, returns=True)


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
    O((b + largest rank's b)·D) instead of O(Σ b · D). Same loss, gradients and
    Hessian-vector products.
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
    kernels, _, op_params = _fused_op_args(emb, similarity, checked, backend)
    zn = _normalized(emb)
    rank = dist.get_rank(group)
    sizes = _gather_sizes(emb.shape[0], emb.device, group)
    all_labels = _gather_padded(labels.long(), sizes, group)
    if not isinstance(overlap, bool):
        raise TypeError(f"oucl_embeddings_ring: overlap must be a bool, got {type(overlap).__name__}")
    ring = _Ring(sizes, rank, group, overlap, similarity, op_params, kernels)
    rows, valid = _RingOUCL.apply(zn, labels.long(), all_labels, ring)
    return _global_loss(rows, valid, reduction, group).to(emb.dtype)
