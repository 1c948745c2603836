"""Large batches in bounded memory: a gradient-cached contrastive step.

A contrastive loss couples every sample of the batch, so the batch cannot simply be split into
gradient-accumulation steps; but the loss only needs the embeddings, which are small. The step:

1. embeds the batch in chunks of ``chunk_size`` rows with no autograd graph (each chunk's random-number state
   recorded, the model's buffers put back afterwards), keeping only the ``[B, D]`` embeddings;
2. computes the loss on all embeddings at once (any loss of metaug_fast: the fused ops keep that
   O((B + M)·D) too) and its gradient with respect to each embedding;
3. runs each chunk through the model again, with its graph and its recorded random-number state, and
   back-propagates that chunk's slice of the cached gradient.

The parameters' gradients are those of the plain step on the same chunks: equal to the one-big-batch step
when the model treats samples independently (no BatchNorm), dropout and random augmentation included
(the replayed state draws the same masks). Peak memory is one chunk's activations plus the embeddings and
their gradients. The cost is one extra forward of the model; a batch of at most ``chunk_size`` rows is one
chunk, and takes the plain step.

>>> from metaug_fast import large_batch
>>> loss = large_batch.cached_backward(model, (view1, view2), loss_fn, chunk_size=256)
>>> optimizer.step()                       # the parameters' .grad were accumulated

What is exactly so:

- **Random state.** Each chunk's replay starts from the CPU (and, for CUDA inputs, the CUDA) generator state
  its first pass started from; afterwards the generators are where the first pass left them.
- **BatchNorm and other buffers.** In training mode each chunk is normalized with its own statistics (the
  first pass and the replay see the same chunk, so they agree); the running statistics are updated once per
  chunk, by the replay, as in the plain step on the same chunks (the first pass's updates are undone).
  A model with BatchNorm therefore differs from the one-big-batch step exactly as gradient accumulation
  would.
- **Several processes.** The loss may be a distributed one (``OUCLLoss(distributed="all_gather")``, the
  ``losses.open_clip.ClipLoss`` with ``world_size``): its gradient with respect to this rank's embeddings
  already holds every rank's terms. Under ``DistributedDataParallel`` the chunks but the last run under
  ``no_sync()``, so the gradients are averaged once; multiply the loss by the world size to undo DDP's
  average, as for any of our distributed losses.
- **AMP.** Run the call under ``torch.autocast`` as the plain step would; with a ``GradScaler`` pass it as
  ``scaler``: the cached gradients are those of ``scaler.scale(loss)``.
- **Not differentiable.** The returned loss is a value: back-propagating it (or asking for a second
  derivative through the cache, as the MetAug meta step would) raises.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["cached_backward"]

Outputs = Union[Tensor, Tuple[Tensor, ...]]


def _as_tuple(out: Outputs, what: str) -> Tuple[Tensor, ...]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not outs or not all(isinstance(x, Tensor) for x in outs):
        raise TypeError(f"{what} must return a tensor or a tuple of tensors, got {type(out).__name__}")
    return tuple(outs)


def _rng_state(devices: List[torch.device]):
    return torch.random.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices: List[torch.device]) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


class _Spent(torch.autograd.Function):
    """The returned loss: its value, and a backward that says why there is none."""

    @staticmethod
    def forward(ctx, anchor, value):
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("metaug_fast.large_batch.cached_backward has already back-propagated the loss into the "
                           "model's parameters (their .grad); its result cannot be differentiated again, and a "
                           "second derivative through the cached gradients would not be exact: run the plain step "
                           "for that")


@contextlib.contextmanager
def _buffers_restored(model):
    """On exit, every module that ran inside (and ``model``, if a module) has its buffers (BatchNorm's running
    statistics and ``num_batches_tracked``) back as they were when it first ran: a module reached through a
    plain callable (``lambda a, b: (enc(a), enc(b))``) is found by a global forward pre-hook, which sees it
    before its forward changes anything."""
    saved = {}

    def save(module, *_):
        if id(module) not in saved:
            saved[id(module)] = [(b, b.detach().clone()) for b in module.buffers(recurse=False)]

    for module in (model.modules() if isinstance(model, nn.Module) else ()):
        save(module)
    handle = nn.modules.module.register_module_forward_pre_hook(save)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for buffers in saved.values():
                for b, value in buffers:
                    b.copy_(value)


def _check(inputs: Sequence[Tensor], chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError("inputs must be a non-empty tuple of tensors (the model's arguments, batch first)")
    B = inputs[0].shape[0] if inputs[0].dim() else -1
    for i, x in enumerate(inputs):
        if x.dim() == 0 or x.shape[0] != B:
            raise ValueError(f"inputs[{i}] must have the batch's {B} rows first, got shape {tuple(x.shape)}")
    return B


def cached_backward(model: Callable[..., Outputs], inputs: Sequence[Tensor], loss_fn: Callable[..., Tensor], *,
                    chunk_size: int, scaler: Optional["torch.amp.GradScaler"] = None,
                    return_embeddings: bool = False):
    """One gradient-cached step: accumulates into the parameters' ``.grad`` the gradient of
    ``loss_fn(*model(*inputs))``, running ``model`` on ``chunk_size`` rows at a time.

    Args:
        model: maps chunks of ``inputs`` (``[c, ...]`` each) to one embedding tensor ``[c, D]`` or a tuple of
            them (e.g. the two views' embeddings); an ``nn.Module`` (a ``DistributedDataParallel`` too) or any
            callable (the modules it calls, e.g. ``lambda a, b: (enc(a), enc(b))``, get their buffers restored
            after the first pass just the same).
        inputs: the batch, a tuple of tensors with the same first dimension B (e.g. ``(view1, view2)``).
        loss_fn: maps the full embeddings (each ``[B, D]``, in ``model``'s output order) to a scalar; labels
            and other per-batch data are the caller's to close over.
        chunk_size: rows per chunk; peak memory is one chunk's activations.
        scaler: a ``torch.amp.GradScaler`` when training with one (the gradients cached are those of
            ``scaler.scale(loss)``).
        return_embeddings: also return the embeddings (detached, as ``model`` gave them), e.g. to write them
            to a memory bank.
    Returns:
        The loss, a scalar that carries no gradient (back-propagating it raises); with ``return_embeddings``,
        ``(loss, embeddings)``, a tuple in ``model``'s output order.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> from metaug_fast import large_batch
        >>> class TwoViews(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.enc = torch.nn.Linear(10, 8)
        ...     def forward(self, v1, v2):
        ...         return self.enc(v1), self.enc(v2)
        >>> model, labels = TwoViews(), torch.arange(64).repeat(2)
        >>> loss_fn = lambda z1, z2: F.info_nce_embeddings(torch.cat([z1, z2]), labels, temperature=0.1)
        >>> loss = large_batch.cached_backward(model, (torch.randn(64, 10), torch.randn(64, 10)), loss_fn,
        ...                                    chunk_size=16)
        >>> model.enc.weight.grad.shape   # the gradient of the whole batch, 16 rows of activations at a time
        torch.Size([8, 10])
    """
    B = _check(inputs, chunk_size)
    if B <= chunk_size:  # one chunk: the plain step is the same computation, without the extra forward
        outs = _as_tuple(model(*inputs), "model")
        loss = _scalar(loss_fn(*outs))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return _result(loss, outs, return_embeddings)
    devices = sorted({x.device for x in inputs if x.device.type == "cuda"}, key=str)
    chunks = [slice(s, min(s + chunk_size, B)) for s in range(0, B, chunk_size)] or [slice(0, 0)]

    # 1. Embeddings without a graph; each chunk's random state kept; buffers (BatchNorm statistics) restored,
    # so that pass 3 moves them once per chunk, as the plain step does.
    states, pieces = [], []
    with torch.no_grad(), _buffers_restored(model):
        for rows in chunks:
            states.append(_rng_state(devices))
            pieces.append(_as_tuple(model(*(x[rows] for x in inputs)), "model"))
    after = _rng_state(devices)
    embeddings = [torch.cat([p[k] for p in pieces]).detach().requires_grad_() for k in range(len(pieces[0]))]

    # 2. The loss on the whole batch, and its gradient with respect to every embedding.
    loss = _scalar(loss_fn(*embeddings))
    scaled = scaler.scale(loss) if scaler is not None else loss
    grads = torch.autograd.grad(scaled, embeddings, allow_unused=True)
    grads = [torch.zeros_like(e) if g is None else g for e, g in zip(embeddings, grads)]

    # 3. Each chunk again with its graph and its random state; its slice of the cached gradient.
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for i, (rows, state) in enumerate(zip(chunks, states)):
        _set_rng_state(state, devices)
        sync = not ddp or i == len(chunks) - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            outs = _as_tuple(model(*(x[rows] for x in inputs)), "model")
            pairs = [(o, g[rows]) for o, g in zip(outs, grads) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    _set_rng_state(after, devices)
    return _result(loss, embeddings, return_embeddings)


def _scalar(loss) -> Tensor:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a scalar tensor")
    return loss


def _result(loss: Tensor, embeddings: Sequence[Tensor], return_embeddings: bool):
    spent = _Spent.apply(torch.zeros((), requires_grad=True), loss)
    return (spent, tuple(e.detach() for e in embeddings)) if return_embeddings else spent
