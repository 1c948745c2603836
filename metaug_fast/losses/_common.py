"""What the drop-in classes share: the errors for what they do not support, and the gathers of the
distributed semantics open_clip and lightly define."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed._common import _gather_padded, _gather_sizes, _GatherRows


def unsupported(cls: str, argument: str, value, instead: str) -> ValueError:
    """The error of an argument whose value a drop-in class does not implement: it names the argument, the
    value, and what to use instead (nothing is silently ignored)."""
    return ValueError(f"{cls}: {argument}={value!r} is not supported by metaug_fast; {instead}")


def check_world(cls: str, rank: int, world_size: int, group=None) -> None:
    """A peer's explicit ``rank``/``world_size`` arguments must be those of the initialized process group."""
    if world_size <= 1:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{cls}: world_size={world_size} needs torch.distributed initialized "
                           "(dist.init_process_group)")
    if (dist.get_rank(group), dist.get_world_size(group)) != (rank, world_size):
        raise ValueError(f"{cls}: rank={rank}, world_size={world_size} differ from the process group's "
                         f"({dist.get_rank(group)}, {dist.get_world_size(group)})")


def gather_rows(x: Tensor, with_grad: bool, group=None) -> Tuple[Tensor, List[int]]:
    """(``[Σ b, D]``: ``x [b, D]`` of every rank in rank order, the sizes b of each rank).

    ``with_grad``: the backward sums the gradient every rank sends to these rows (an all-reduce), as
    ``torch.distributed.nn.all_gather`` does; otherwise the gathered rows are constants."""
    sizes = _gather_sizes(x.shape[0], x.device, group)
    if with_grad:
        return _GatherRows.apply(x, sizes, dist.get_rank(group), group), sizes
    return _gather_padded(x.detach(), sizes, group), sizes


class _MapGrad(torch.autograd.Function):
    """Identity forward; the backward passes the gradient through ``fn``."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.fn(grad), None


def all_reduce_grad(x: Tensor, group=None) -> Tensor:
    """``x`` whose gradient is summed over ranks (a replicated parameter, such as a learned temperature,
    whose loss is the sum of every rank's share)."""
    def summed(grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad
    return _MapGrad.apply(x, summed)


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` whose gradient is multiplied by ``factor`` (a peer's gradient convention, value unchanged)."""
    return _MapGrad.apply(x, lambda grad: grad * factor)
