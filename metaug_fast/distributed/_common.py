"""What every distributed strategy shares: gathers of variable-size row blocks (with and without gradients),
the checks of a call, the global reduction of per-row losses, and the merge of per-part row statistics
into the label ops' saved statistics (one log-sum-exp merge, :func:`metaug_fast._numerics.merge_lse`)."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _backend
from .. import _validate as V
from .. import reference as R
from .._numerics import merge_lse
from .._ops.score import third_order_error
from ..contract import N_STATS, SIMILARITIES, Form, LossParams, OpArgs, Stat


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


def gather_all(tensors: List[Tensor], group) -> List[Tensor]:
    """Each of ``tensors`` (``[b, ...]``, the same b within a rank) concatenated over the ranks of ``group``
    (``[Σ b, ...]``), without gradients.

    Example:
        >>> import torch
        >>> from metaug_fast import distributed
        >>> x = torch.randn(4, 8)   # every rank's 4 rows, once the process group is initialized
        >>> distributed.gather_all([x], None)[0].shape[0] == 4 * torch.distributed.get_world_size()
        True
    """
    sizes = _gather_sizes(tensors[0].shape[0], tensors[0].device, group)
    return [_gather_padded(t.detach(), sizes, group) for t in tensors]


class _GatherRows(torch.autograd.Function):
    """``x [b_rank, D]`` -> ``[Σ b, D]``; the backward sums the gradient over ranks and keeps this rank's rows
    (:class:`_ReduceScatterRows`). Both are linear and each is the other's adjoint, so a gradient taken with
    ``create_graph=True`` is differentiable again, to any order, across ranks: the MetAug meta step's HVP over
    the global batch."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            return _ReduceScatterRows.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None
        return _reduce_scatter_rows(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


def _reduce_scatter_rows(x: Tensor, sizes: List[int], rank: int, group) -> Tensor:
    """This rank's rows (``sizes[rank]`` of them) of the sum over ranks of ``x [Σ b, ...]``."""
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


class _ReduceScatterRows(torch.autograd.Function):
    """``x [Σ b, D]`` -> this rank's rows of the sum over ranks: :class:`_GatherRows`'s backward as a Function,
    whose own backward is that gather."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _reduce_scatter_rows(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _GatherRows.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _LastDerivative(torch.autograd.Function):
    """``fn(*inputs)`` (a tuple of tensors) as the last derivative a distributed mode provides: connected to
    its inputs, so that a gradient taken with ``create_graph=True`` through it exists and a further derivative
    reaches this backward and raises instead of silently missing terms."""

    @staticmethod
    def forward(ctx, what, fn, *inputs):
        ctx.what = what
        return fn(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        raise third_order_error(ctx.what)


class _MeanOverRanks(torch.autograd.Function):
    """The mean over the ranks of ``group`` of each of ``xs`` (one all-reduce of their concatenation), on
    every rank. Its adjoint is itself, so it is differentiable to any order."""

    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        flat = torch.cat([x.reshape(-1) for x in xs])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        return tuple(part.view_as(x).clone() for part, x in zip(flat.split([x.numel() for x in xs]), xs))

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + _MeanOverRanks.apply(ctx.group, *grads)


def mean_over_ranks(tensors: List[Tensor], group=None) -> List[Tensor]:
    """The mean over the ranks of ``group`` of each tensor of ``tensors`` (any shapes, one dtype), on every
    rank, differentiable to any order (a gradient averaged with it can be differentiated again: the look-ahead
    parameters θ̂ = θ - ℓ·∇_θ L of a meta step over the global batch).

    Example:
        >>> import torch
        >>> from metaug_fast import distributed
        >>> g = torch.randn(3, requires_grad=True)   # every rank's own, once the process group is initialized
        >>> distributed.mean_over_ranks([g])[0].shape
        torch.Size([3])
    """
    return list(_MeanOverRanks.apply(group, *tensors)) if tensors else []


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
    V.check_label_inputs(emb, labels, *ref)
    similarity = V.check_choice(params.pop("similarity", "shifted_cosine"), "similarity", ("shifted_cosine", "cosine"))
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


def _fused_op_args(emb: Tensor, similarity: str, checked: dict, backend: str) -> tuple:
    """(the label kernels that ``backend`` selects for ``emb``, similarity id, op arguments)."""
    params = LossParams(**{k: v for k, v in checked.items() if k != "reduction"}).op_args()
    return _backend.label_kernels(backend, emb.device, emb.dtype), SIMILARITIES[similarity], params


def _normalized(x: Tensor) -> Tensor:
    """L2-normalized rows in the accumulation dtype (fp32 for fp16/bf16)."""
    return torch.nn.functional.normalize(R.acc(x), dim=1)


def shutdown(group=None) -> None:
    """Leaves ``group`` (by default every process group) once every rank is done with it. The barrier is the
    point: a rank that tears its gloo group down while a peer still finishes the last collective makes that
    peer abort ("terminate called without an active exception"; measured here, two processes ending with an
    all_gather: 4 of 14 runs without the barrier, 0 of 14 with it). Call it on every rank after a normal
    run; after an error the other ranks may never reach the barrier: use ``dist.destroy_process_group``.

    Example:
        >>> from metaug_fast import distributed
        >>> distributed.shutdown()   # every rank, at the end of the run
    """
    dist.barrier(group=group)
    dist.destroy_process_group(group)
