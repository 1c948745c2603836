"""Drop-in for ``lightly.loss.NTXentLoss``: change the import line, keep the code.

>>> from metaug_fast.losses.lightly import NTXentLoss           # was: from lightly.loss import NTXentLoss
>>> loss = NTXentLoss(temperature=0.5)(out0, out1)

Without a memory bank this is SimCLR's NT-Xent: label-mode InfoNCE on ``cat(out0, out1)`` with labels
``arange(B)`` twice, the mean over all 2B rows; the 2B×2B logits are never formed. With
``memory_bank_size=(size, dim)`` it is MoCo's: each row of ``out0`` against its ``out1`` row (the positive)
and every bank row (the negatives), the fused score-mode InfoNCE over those scores; the bank is lightly's
(filled with normalized random rows at construction, then a first-in first-out queue of normalized ``out1``
rows written after each call whose ``out0`` requires a gradient, the wrap-around dropping what does not
fit, exactly as lightly writes it).

An empty batch raises without a bank and gives NaN with one, as lightly does. ``gather_distributed=True``
under torch.distributed: without a bank, each rank's rows are scored against
the rows of every rank and the loss is this rank's mean, its gradient summed over ranks through the gather
(lightly's); with a bank, the rows of every rank are written to it.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as TF

from .. import _backend
from .. import _validate as V
from .. import functional as F
from ._common import gather_rows

__all__ = ["NTXentLoss"]


def _bank_shape(size) -> tuple:
    """lightly's checks of ``memory_bank_size``, with its messages."""
    shape = (size,) if isinstance(size, int) else tuple(size)
    if any(x < 0 for x in shape):
        raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
    if isinstance(size, int) and size > 0:
        raise ValueError(f"Memory bank size 'size={size}' does not specify the feature dimension. Set it with "
                         f"'size=({size}, dim)', or pass 'size=0' to disable the memory bank.")
    if shape != (0,) and len(shape) != 2:
        raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, or 'size=0' "
                         "to disable the memory bank.")
    return shape


def _distributed(gather: bool) -> bool:
    return gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``, fused.

    Args:
        temperature: τ (``abs(τ) < 1e-8`` raises, as in lightly; a negative τ divides the similarities by it, as
            lightly's logits do: the fused ops take |τ| and the reference rows negated).
        memory_bank_size: 0 (no bank) or ``(num_features, dim)``.
        gather_distributed: negatives from every rank (and, with a bank, every rank's rows written to it).
        backend: metaug_fast's backend choice.
    Forward: ``out0 [B, D]``, ``out1 [B, D]`` (one float dtype); returns a scalar in their dtype.

    Buffers ``bank [num_features, dim]`` (fp32, like lightly's; ``.double()`` converts it) and ``bank_ptr``.

    Example:
        >>> import torch
        >>> from metaug_fast.losses.lightly import NTXentLoss
        >>> NTXentLoss(temperature=0.5)(torch.randn(8, 32), torch.randn(8, 32)).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, backend: str = "auto") -> None:
        super().__init__()
        shape = _bank_shape(memory_bank_size)
        if abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not available. Please set "
                             "gather_distributed=False or install a torch version with distributed support.")
        _backend.check_name(backend, "backend")
        self.temperature, self.gather_distributed, self.backend = temperature, gather_distributed, backend
        # s/τ = (-s)/|τ|: the fused ops take a positive temperature, so a negative one flips the references.
        self._tau, self._sign = abs(temperature), (-1.0 if temperature < 0 else 1.0)
        self.size = shape
        self.register_buffer("bank", torch.empty(shape, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(shape) > 1:
            # The same draw as lightly's (torch.randn of the bank's shape), so a seeded run starts equal.
            self.bank = TF.normalize(torch.randn(shape).type_as(self.bank), dim=-1)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        V.check_float_tensor(out0, "out0", 2)
        V.check_float_tensor(out1, "out1", 2)
        V.check_same(out1, out0, "out1", "out0")
        if out1.shape != out0.shape:
            raise ValueError(f"out1 must have the shape of out0 {tuple(out0.shape)}, got {tuple(out1.shape)}")
        if self.size[0] == 0:
            if out0.shape[0] == 0:
                raise ValueError("out0 and out1 are empty: lightly's NTXentLoss fails on an empty batch without a "
                                 "memory bank (it cannot reshape its logits), and so does this one")
            return self._in_batch(out0, out1)
        loss = self._with_bank(out0, out1)
        return loss + float("nan") if out0.shape[0] == 0 else loss  # lightly's mean over no rows: NaN

    def _in_batch(self, out0: Tensor, out1: Tensor) -> Tensor:
        b = out0.shape[0]
        both = torch.cat([out0, out1])
        if not _distributed(self.gather_distributed):
            labels = torch.arange(b, device=out0.device).repeat(2)
            if self._sign > 0:
                return F.info_nce_embeddings(both, labels, temperature=self._tau, similarity="cosine",
                                             backend=self.backend)
            return F.info_nce_embeddings(both, labels, -both, labels, temperature=self._tau, similarity="cosine",
                                         self_offset=0, backend=self.backend)
        # Rank r's block of the gathered rows is its own cat(out0, out1): anchor i is reference row
        # offset + i, one self offset for both views.
        all_rows, sizes = gather_rows(both, with_grad=True)
        rank = dist.get_rank()
        starts = [sum(sizes[:r]) // 2 for r in range(len(sizes))]
        all_labels = torch.cat([torch.arange(s, s + n // 2, device=out0.device).repeat(2) for s, n in zip(starts,
                                                                                                          sizes)])
        offset = sum(sizes[:rank])
        return F.info_nce_embeddings(both, all_labels[offset:offset + 2 * b], self._sign * all_rows, all_labels,
                                     temperature=self._tau, similarity="cosine", self_offset=offset,
                                     backend=self.backend)

    def _with_bank(self, out0: Tensor, out1: Tensor) -> Tensor:
        z0, z1 = TF.normalize(out0, dim=1), TF.normalize(out1, dim=1)
        # The bank as it is before this call's write. Eagerly a plain copy; under torch.compile a transposed
        # one: in one graph with the write below, torch.compile (2.14) let the backward read the written buffer
        # through a plain clone (wrong gradients, measured), and a copy that changes the layout is kept. The
        # strided copy is what made this drop-in slower than lightly at small banks (`python -m bench.sweep
        # --suite drop_ins --ops lightly.NTXentLoss_bank`: 16.7 ms with it, 10.0-11.5 ms without, at 4096 rows).
        if torch.compiler.is_compiling():
            negatives = self.bank.detach().T.contiguous().to(out0.device)
        else:
            negatives = self.bank.detach().to(out0.device, copy=True).T
        if out0.requires_grad:
            self._enqueue(z1)
        pos = (z0 * z1).sum(1, keepdim=True)
        return F.info_nce(self._sign * pos, self._sign * (z0 @ negatives), temperature=self._tau, backend=self.backend)

    @torch.no_grad()
    def _enqueue(self, rows: Tensor) -> None:
        """lightly's write: rows at bank_ptr onwards, what passes the end dropped and the pointer reset to 0
        (if ptr + n >= size), else the pointer moved by n. In tensor ops, with no read of the pointer on the
        host: the batch's first ``size`` rows go to (ptr + k) mod size, those past the end rewriting what the
        bank already holds there (n ≤ size: the positions are distinct)."""
        if _distributed(self.gather_distributed):
            rows = gather_rows(rows.detach(), with_grad=False)[0]
        size, n = self.size[0], rows.shape[0]
        candidates = rows[:size].detach().to(self.bank.dtype)
        position = self.bank_ptr + torch.arange(candidates.shape[0], device=self.bank.device)
        index = position % size
        kept = (position < size)[:, None]
        self.bank.index_copy_(0, index, torch.where(kept, candidates, self.bank[index]))
        self.bank_ptr.copy_(torch.where(self.bank_ptr + n >= size, torch.zeros_like(self.bank_ptr), self.bank_ptr + n))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, memory_bank_size={self.size}, backend={self.backend!r}"
