"""OUCL across processes with torch.distributed: every rank's anchors are scored against the global batch.

``oucl_embeddings_all_gather`` gathers every rank's embeddings (with gradients) and labels; each rank
scores its own rows against the gathered set, excluding each anchor's own row. The returned loss is the
global one (the mean over every valid row of every rank, or the global sum), on every rank, and the
gradient each rank gets for its own embeddings equals that of one process holding the whole batch: each
rank back-propagates its share, and the gather's backward sums the shares that reach a row from every
rank (an all-reduce; gloo has no reduce-scatter). Under DistributedDataParallel, which averages gradients
over ranks, multiply the loss by the world size to keep that equality for the model's parameters.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _backend
from . import functional as F
from . import reference as R
from .chunked import merge_lse
from .contract import N_STATS, SIMILARITIES, Form, LossParams, OpArgs, Stat


def _gather_sizes(n: int, device: torch.device, group) -> List[int]:
    world = dist.get_world_size(group)
    local = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s) for s in sizes]


def _gather_padded(x: Tensor, sizes: List[int], group) -> Tensor:
    """Concatenation over ranks of ``x [sizes[rank], ...]`` (padded to the largest for the collective)."""
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))]) if pad else x.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _gather_all(tensors: List[Tensor], group) -> List[Tensor]:
    """Each of ``tensors`` (same number of rows) concatenated over the ranks of ``group``, without gradients."""
    sizes = _gather_sizes(tensors[0].shape[0], tensors[0].device, group)
    return [_gather_padded(t.detach(), sizes, group) for t in tensors]


class _GatherRows(torch.autograd.Function):
    """``x [b_rank, D]`` -> ``[Σ b, D]``; the backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            # The all-reduce is not differentiable: a second derivative would silently lose the terms that
            # cross ranks, so it is refused.
            raise RuntimeError("distributed OUCL provides first derivatives only")
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


def _valid_rows(labels: Tensor, all_labels: Tensor) -> Tensor:
    """``[b]``: the row has another row with its label (a positive) and one with another label (a negative)."""
    uniq, counts = torch.unique(all_labels, return_counts=True)
    same = counts[torch.searchsorted(uniq, labels)] - 1  # the anchor itself is in all_labels
    return (same > 0) & (all_labels.numel() - 1 - same > 0)


def _check_call(name: str, reduction: str) -> None:
    """What every distributed loss needs: an initialized process group and a reduction with a global meaning."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} needs torch.distributed initialized (dist.init_process_group)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for the distributed loss, got {reduction!r}")


def _checked_params(name: str, emb: Tensor, labels: Tensor, reduction: str, params: dict, ref=(None, None)):
    """Validates a distributed label-mode OUCL call (``ref``: an optional reference set and its labels);
    returns (similarity, the oucl params with reduction "none")."""
    _check_call(name, reduction)
    F._label_inputs(emb, labels, *ref)
    similarity = F._choice(params.pop("similarity", "shifted_cosine"), "similarity", ("shifted_cosine", "cosine"))
    return similarity, {**LossParams.from_kwargs(name, params).kwargs(), "reduction": "none"}


def _global_loss(rows: Tensor, valid: Tensor, reduction: str, group) -> Tensor:
    """The global mean (over every rank's valid rows) or sum, on every rank; its gradient is this rank's
    share, which the gather/ring backward completes with the other ranks' shares."""
    local = rows.sum()
    if reduction == "mean":
        n_valid = valid.sum().to(torch.float64)
        dist.all_reduce(n_valid, group=group)
        local = local / n_valid.clamp(min=1).to(local.dtype)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local + (total - local).detach()


def oucl_embeddings_all_gather(
    emb: Tensor,
    labels: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    backend: str = "auto",
    **params,
) -> Tensor:
    """Label-mode OUCL over the global batch of all ranks of ``group``.

    Args:
        emb: this rank's ``[b, D]`` embeddings (b may differ between ranks); labels: ``[b]`` integers.
        reduction: ``"mean"`` (over all valid rows of all ranks) or ``"sum"``; both return the global value
            on every rank.
        params: similarity, form, beta, gamma_pos, gamma_neg, margin, lam, as :func:`metaug_fast.functional.oucl_embeddings`.
    """
    similarity, checked = _checked_params("oucl_embeddings_all_gather", emb, labels, reduction, params)
    return _all_gather_loss("oucl_embeddings", emb, labels, group, reduction, backend, similarity=similarity,
                            **checked)


def info_nce_embeddings_all_gather(
    emb: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.07,
    similarity: str = "cosine",
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Label-mode InfoNCE (NT-Xent for two views) over the global batch of all ranks of ``group``, like
    :func:`oucl_embeddings_all_gather`: the global loss on every rank, each rank's gradient that of one
    process holding the whole batch; first derivatives only."""
    _check_call("info_nce_embeddings_all_gather", reduction)
    F._label_inputs(emb, labels, None, None)
    temperature = F._real(temperature, "temperature", positive=True)
    similarity = F._choice(similarity, "similarity", ("shifted_cosine", "cosine"))
    return _all_gather_loss("info_nce_embeddings", emb, labels, group, reduction, backend, temperature=temperature,
                            similarity=similarity, reduction="none")


def _all_gather_loss(op: str, emb: Tensor, labels: Tensor, group, global_reduction: str, backend: str,
                     **kwargs) -> Tensor:
    """This rank's rows of label-mode ``op`` (``kwargs``: its arguments, reduction "none") against every
    rank's gathered rows (its own row excluded by self_offset), reduced over all ranks."""
    rank = dist.get_rank(group)
    sizes = _gather_sizes(emb.shape[0], emb.device, group)
    all_emb = _GatherRows.apply(emb, sizes, rank, group)
    all_labels = _gather_padded(labels.long(), sizes, group)
    impl = _backend.resolve(op, backend, emb.device)
    rows = impl(emb, labels, all_emb, all_labels, self_offset=sum(sizes[:rank]), **kwargs)
    return _global_loss(rows, _valid_rows(labels.long(), all_labels), global_reduction, group)


def oucl_global(
    pos: Tensor,
    neg: Tensor,
    *,
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    backend: str = "auto",
    **params,
) -> Tensor:
    """Score-mode OUCL whose reduction spans every rank of ``group``: the mean over the valid rows of all
    ranks (or the global sum), on every rank; each rank's gradient for its ``pos [b, K⁺]``, ``neg [b, K⁻]``
    (and optional masks) equals that of one process holding every rank's rows. Score-mode rows carry their
    own pairs, so nothing is gathered, and unlike label mode the second derivative is exact (no collective
    sits in the backward).

    params: form, beta, gamma_pos, gamma_neg, margin, lam, as :func:`metaug_fast.functional.oucl`.
    """
    _check_call("oucl_global", reduction)
    rows = F.oucl(pos, neg, pos_mask=pos_mask, neg_mask=neg_mask, reduction="none", backend=backend, **params)
    valid = R.valid_rows(pos, neg, pos_mask, neg_mask)
    return _global_loss(R._acc(rows), valid, reduction, group).to(pos.dtype)


# ------------------------------------------------------------------------------------------------ ring
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


def _merge_stats(stats: Tensor, valid: Tensor, params: OpArgs) -> tuple:
    """Per-row losses ``[b]`` and the merged statistics ``[b, N_STATS]`` (as the label ops' backward takes
    them) from the statistics ``stats [b, W, N_STATS]`` of W disjoint parts of the reference set; ``valid
    [b]`` counts the whole set."""
    merged = torch.zeros(stats.shape[0], N_STATS, dtype=stats.dtype, device=stats.device)
    if params.form == Form.HINGE:  # per part Σn - Σp + λ, λ counted once
        arg = (stats[..., Stat.HINGE_ARG] - params.lam).sum(1) + params.lam
        merged[:, Stat.HINGE_ARG] = arg
        rows = torch.where(torch.isnan(arg) | (arg > 0), arg, torch.zeros_like(arg))
    else:
        for shift, log_sum in ((Stat.POS_SHIFT, Stat.POS_LOG_SUM), (Stat.NEG_SHIFT, Stat.NEG_LOG_SUM)):
            merged[:, shift], merged[:, log_sum] = merge_lse(stats[..., shift], stats[..., log_sum])
        total = merged[:, [Stat.POS_SHIFT, Stat.POS_LOG_SUM, Stat.NEG_SHIFT, Stat.NEG_LOG_SUM]].sum(1)
        rows = torch.logaddexp(total, torch.zeros_like(total)) / params.beta
    merged[:, Stat.VALID] = valid.to(stats.dtype)
    return torch.where(valid, rows, torch.zeros_like(rows)), merged


class _RingOUCL(torch.autograd.Function):
    """Per-row OUCL of this rank's normalized rows ``zn [b, D]`` against every rank's rows, which travel
    around the ring one chunk at a time (forward: row log-sum-exps; backward: the chunks again, each
    carrying the gradient its owner gets). Peak memory O((b + largest chunk)·D)."""

    @staticmethod
    def forward(ctx, zn, labels, all_labels, sizes, rank, group, similarity, params, ops):
        world = len(sizes)
        chunk, chunk_labels = zn, labels
        parts = []
        for step in range(world):
            owner = (rank - step) % world
            _, stats = ops.oucl_label_fwd(zn, chunk, labels, chunk_labels, 0 if owner == rank else -1, similarity,
                                          *params)
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
        chunk, chunk_labels, chunk_grad = zn, labels, torch.zeros_like(zn)
        for step in range(world):
            owner = (rank - step) % world
            g_z, g_c = ops.oucl_label_bwd(grad_rows, zn, chunk, labels, chunk_labels, merged,
                                          0 if owner == rank else -1, ctx.similarity, *ctx.params)
            own += g_z
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
    **params,
) -> Tensor:
    """Label-mode OUCL over the global batch like :func:`oucl_embeddings_all_gather`, but the other ranks'
    embeddings visit one at a time around the ring instead of being gathered: per-rank memory
    O((b + largest rank's b)·D) instead of O(Σ b · D). Same loss and gradients; first derivatives only.
    Needs the fused label op of the tensors' device (cpp on CPU)."""
    similarity, checked = _checked_params("oucl_embeddings_ring", emb, labels, reduction,
                                          dict(params, similarity=similarity))
    ops, sim_id, op_params = _fused_op_args("ring mode", emb.device, similarity, checked)
    zn = _normalized(emb)
    rank = dist.get_rank(group)
    sizes = _gather_sizes(emb.shape[0], emb.device, group)
    all_labels = _gather_padded(labels.long(), sizes, group)
    rows, valid = _RingOUCL.apply(zn, labels.long(), all_labels, sizes, rank, group, sim_id, op_params, ops)
    return _global_loss(rows, valid, reduction, group).to(emb.dtype)


def _fused_op_args(what: str, device: torch.device, similarity: str, checked: dict) -> tuple:
    """(the fused label ops of ``device`` from the backend registry, similarity id, op arguments)."""
    return _backend.fused_label_ops(what, device), SIMILARITIES[similarity], LossParams(**{k: v for k, v in checked.items() if k != "reduction"}).op_args()


def _normalized(x: Tensor) -> Tensor:
    """L2-normalized rows in the accumulation dtype (fp32 for fp16/bf16)."""
    return torch.nn.functional.normalize(R._acc(x), dim=1)


# --------------------------------------------------------------------------------- sharded reference set
class _ShardOUCL(torch.autograd.Function):
    """Per-row OUCL of the gathered queries ``zq [Q, D]`` against a reference set split across ranks, of
    which this rank holds ``shard [m, D]``: each rank computes its shard's row statistics, which are
    all-gathered (Q×5 numbers per rank) and merged, so every rank gets all Q losses. The backward returns
    this shard's part of ∂/∂zq; the gather of the queries sums the parts."""

    @staticmethod
    def forward(ctx, zq, q_labels, shard, shard_labels, valid, group, similarity, params, ops):
        _, stats = ops.oucl_label_fwd(zq, shard, q_labels, shard_labels, -1, similarity, *params)
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
        g_q, _ = ctx.ops.oucl_label_bwd(grad_rows.contiguous(), zq, shard, q_labels, shard_labels, merged, -1,
                                        ctx.similarity, *ctx.params, False)
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
        params: form, beta, gamma_pos, gamma_neg, margin, lam, as :func:`metaug_fast.functional.oucl_embeddings`.
    """
    similarity, checked = _checked_params("oucl_embeddings_sharded", emb, labels, reduction,
                                          dict(params, similarity=similarity), ref=(shard, shard_labels))
    ops, sim_id, op_params = _fused_op_args("sharded scoring", emb.device, similarity, checked)
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
    rows = _ShardOUCL.apply(zq, q_labels, rn, shard_labels, valid, group, sim_id, op_params, ops)
    # Every rank holds all rows, so the loss is computed whole (no all-reduce) and its gradient reaches
    # every query; the gather's backward sums the shards' parts and keeps this rank's rows.
    total = rows.sum()
    if reduction == "mean":
        total = total / valid.sum().clamp(min=1).to(total.dtype)
    return total.to(emb.dtype)


def shutdown(group=None) -> None:
    """Leaves ``group`` (by default every process group) once every rank is done with it. The barrier is the
    point: a rank that tears its gloo group down while a peer still finishes the last collective makes that
    peer abort ("terminate called without an active exception"; measured here, two processes ending with an
    all_gather: 4 of 14 runs without the barrier, 0 of 14 with it). Call it on every rank after a normal
    run; after an error the other ranks may never reach the barrier: use ``dist.destroy_process_group``."""
    dist.barrier(group=group)
    dist.destroy_process_group(group)
