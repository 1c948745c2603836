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


class _GatherRows(torch.autograd.Function):
    """``x [b_rank, D]`` -> ``[Σ b, D]``; the backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


def _valid_rows(labels: Tensor, all_labels: Tensor) -> Tensor:
    """``[b]``: the row has another row with its label (a positive) and one with another label (a negative)."""
    uniq, counts = torch.unique(all_labels, return_counts=True)
    same = counts[torch.searchsorted(uniq, labels)] - 1  # the anchor itself is in all_labels
    return (same > 0) & (all_labels.numel() - 1 - same > 0)


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
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("oucl_embeddings_all_gather needs torch.distributed initialized (dist.init_process_group)")
    F._label_inputs(emb, labels, None, None)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for the distributed loss, got {reduction!r}")
    similarity = F._choice(params.pop("similarity", "shifted_cosine"), "similarity", ("shifted_cosine", "cosine"))
    defaults = dict(form="weighted", beta=16.0, gamma_pos=0.0, gamma_neg=0.0, margin=0.25, lam=0.0)
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    checked = F._oucl_params(**{**defaults, **params}, reduction="none")
    rank = dist.get_rank(group)
    sizes = _gather_sizes(emb.shape[0], emb.device, group)
    all_emb = _GatherRows.apply(emb, sizes, rank, group)
    all_labels = _gather_padded(labels.long(), sizes, group)
    impl = _backend.resolve("oucl_embeddings", backend, emb.device)
    rows = impl(emb, labels, all_emb, all_labels, similarity=similarity, self_offset=sum(sizes[:rank]), **checked)
    local = rows.sum()
    if reduction == "mean":
        n_valid = _valid_rows(labels.long(), all_labels).sum().to(torch.float64)
        dist.all_reduce(n_valid, group=group)
        local = local / n_valid.clamp(min=1).to(local.dtype)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local + (total - local).detach()
