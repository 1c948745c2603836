"""A memory bank of every training sample's features."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

from metaug_fast import _backend
from metaug_fast import _validate as V
from metaug_fast import distributed as D
from metaug_fast import reference as R
from metaug_fast.chunked import oucl_embeddings_chunked
from metaug_fast.contract import LossParams
from metaug_fast.reference import SIMILARITIES

BANK_INITS = ("normal", "uniform")


def _momentum_update(rows: Tensor, index: Tensor, z: Tensor, momentum: float) -> None:
    """rows[index] ← normalize(m·rows[index] + (1 - m)·z), in place."""
    mixed = momentum * rows[index] + (1.0 - momentum) * z.detach().to(rows)
    rows[index] = F.normalize(mixed, dim=1)


class MemoryBank:
    """``[views, n_data, dim]`` L2-normalized features (``features``), one bank per view, updated with momentum
    after scoring.

    Args:
        n_data: number of training samples; dim: feature size; views: number of views (one bank each).
        momentum: m in bank_j ← normalize(m·bank_j + (1 - m)·z_j) (0.5 in the paper).
        generator: the random source for initialization and sampling (reproducible runs).
        init: ``"normal"``, Gaussian rows normalized to unit length, or ``"uniform"``, the official code's
            rows uniform in ±1/√(dim/3) (unit length on average, not normalized).

    Example:
        >>> import torch
        >>> from metaug_fast.metaug import MemoryBank
        >>> bank = MemoryBank(1000, 128, views=2, momentum=0.5)
        >>> index = bank.sample(64, 1024)   # [64, 1024] rows, uniform with replacement
        >>> bank.gather(0, index).shape
        torch.Size([64, 1024, 128])
        >>> bank.update(0, torch.arange(4), torch.nn.functional.normalize(torch.randn(4, 128), dim=1))
    """

    def __init__(self, n_data: int, dim: int, views: int = 2, momentum: float = 0.5,
                 generator: Optional[torch.Generator] = None, device="cpu", init: str = "normal") -> None:
        if n_data < 1 or dim < 1 or views < 1:
            raise ValueError(f"n_data, dim and views must be positive, got {n_data}, {dim}, {views}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if init not in BANK_INITS:
            raise ValueError(f"init must be one of {BANK_INITS}, got {init!r}")
        self.momentum = momentum
        self.unit_rows = init == "normal"  # "uniform" rows are unit length only once written
        if init == "normal":
            rows = F.normalize(torch.randn(views, n_data, dim, generator=generator), dim=2)
        else:
            bound = 1.0 / math.sqrt(dim / 3)
            rows = torch.rand(views, n_data, dim, generator=generator) * (2 * bound) - bound
        self.features = rows.to(device)

    @property
    def n_data(self) -> int:
        return self.features.shape[1]

    def sample(self, batch: int, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``[batch, k]`` indices drawn uniformly with replacement."""
        return torch.randint(0, self.n_data, (batch, k), generator=generator).to(self.features.device)

    def gather(self, view: int, index: Tensor) -> Tensor:
        """Bank rows of ``view`` at ``index`` (any shape) -> ``index.shape + [dim]``, detached."""
        return self.features[view][index]

    @torch.no_grad()
    def update(self, view: int, index: Tensor, z: Tensor) -> None:
        """bank[index] ← normalize(m·bank[index] + (1 - m)·z) for ``index [B]``, ``z [B, dim]``."""
        _momentum_update(self.features[view], index, z, self.momentum)

    def score_all(self, view: int, z: Tensor, labels: Tensor, bank_labels: Tensor, *, chunk_size: int = 4096,
                  similarity: str = "shifted_cosine", reduction: str = "mean", backend: str = "auto",
                  **form_params) -> Tensor:
        """OUCL of ``z [B, dim]`` in label mode against the whole bank of ``view`` (``bank_labels [n_data]``).

        ``form_params``: form, beta, gamma_pos, gamma_neg, margin, lam (as :func:`~metaug_fast.functional.oucl`).
        The B×n_data score matrix is never stored: a fused backend (cpp, cuda) tiles it itself; on reference
        the bank is scored ``chunk_size`` rows at a time (:func:`metaug_fast.chunked.oucl_embeddings_chunked`).
        Arguments are validated as by ``oucl_embeddings``.
        """
        ref = self.features[view]
        V.check_label_inputs(z, labels, ref, bank_labels)
        loss_params = LossParams.from_kwargs("score_all", form_params)
        reduction = V.check_choice(reduction, "reduction", R.REDUCTIONS)
        similarity = V.check_choice(similarity, "similarity", SIMILARITIES)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chosen = _backend.select("oucl_embeddings", backend, z.device, z.dtype)
        if chosen.kernels is not None:  # with unit rows, no normalized copy of the bank
            return chosen.impls["oucl_embeddings"](z, labels, ref, bank_labels, similarity=similarity,
                                                   ref_unit=self.unit_rows, reduction=reduction,
                                                   **loss_params.kwargs())
        return oucl_embeddings_chunked(z, labels, ref, bank_labels, chunk_size=chunk_size, similarity=similarity,
                                       params=loss_params, reduction=reduction)

    def state_dict(self) -> dict:
        return {"features": self.features.clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        if state["features"].shape != self.features.shape:
            raise ValueError(f"bank shape {tuple(state['features'].shape)} does not match {tuple(self.features.shape)}")
        self.features.copy_(state["features"])
        self.momentum = float(state["momentum"])


class ShardedMemoryBank:
    """A memory bank split across the ranks of a process group: for ``world`` ranks and ``s =
    ceil(n_data / world)``, rank r holds rows ``[r·s, min((r + 1)·s, n_data))`` of every view, so a bank of
    1M×128 on 8 ranks costs each 64 MiB per view instead of 512 MiB.

    :meth:`score_all` scores every rank's batch against the whole bank in label mode without moving the
    bank (the queries are gathered instead: :func:`metaug_fast.distributed.oucl_embeddings_sharded`);
    :meth:`update` sends each rank's new features to the rows' owners. The initial bank depends on
    ``seed`` only (rows are drawn in fixed blocks), not on the world size, so runs with different numbers
    of ranks start from the same bank. Every call is collective: all ranks of ``group`` must make it.

    Args:
        n_data: rows per view; dim: feature size; views: number of views; momentum: as :class:`MemoryBank`.
        seed: the initial bank's seed; group: the process group (default: the world).

    Example:
        >>> from metaug_fast.metaug import ShardedMemoryBank
        >>> bank = ShardedMemoryBank(1000, 128, views=2)   # every rank, once the process group is initialized
        >>> bank.full(0).shape
        torch.Size([1000, 128])
    """

    _INIT_BLOCK = 4096

    def __init__(self, n_data: int, dim: int, views: int = 2, momentum: float = 0.5, seed: int = 0,
                 group: Optional[dist.ProcessGroup] = None, device="cpu") -> None:
        if n_data < 1 or dim < 1 or views < 1:
            raise ValueError(f"n_data, dim and views must be positive, got {n_data}, {dim}, {views}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedMemoryBank needs torch.distributed initialized (dist.init_process_group)")
        self.group, self.momentum, self.n_data = group, momentum, n_data
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.shard_size = math.ceil(n_data / self.world)
        self.start = min(self.rank * self.shard_size, n_data)
        self.stop = min(self.start + self.shard_size, n_data)
        self.features = self._initial_rows(seed, views, dim).to(device)

    def _initial_rows(self, seed: int, views: int, dim: int) -> Tensor:
        """Rows [start, stop) of the bank every world size shares: block b of ``_INIT_BLOCK`` rows is drawn
        from its own generator (seed, b)."""
        size = self._INIT_BLOCK
        parts = []
        for block in range(self.start // size, math.ceil(self.stop / size)):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
            rows = torch.randn(views, size, dim, generator=gen)
            lo, hi = max(self.start - block * size, 0), min(self.stop - block * size, size)
            parts.append(rows[:, lo:hi])
        shard = torch.cat(parts, 1) if parts else torch.empty(views, 0, dim)
        return F.normalize(shard, dim=2)

    @torch.no_grad()
    def update(self, view: int, index: Tensor, z: Tensor) -> None:
        """bank[index] ← normalize(m·bank[index] + (1 - m)·z) for this rank's ``index [b]``, ``z [b, dim]``
        (global row numbers, any owner); every rank's (index, z) reach the owners of the rows."""
        if index.ndim != 1 or z.ndim != 2 or z.shape != (index.shape[0], self.features.shape[2]):
            raise ValueError(f"index must be [b] and z [b, {self.features.shape[2]}], got {tuple(index.shape)} "
                             f"and {tuple(z.shape)}")
        all_index, all_z = D.gather_all([index.to(self.features.device).long(), z.to(self.features)], self.group)
        mine = (all_index >= self.start) & (all_index < self.stop)
        _momentum_update(self.features[view], all_index[mine] - self.start, all_z[mine], self.momentum)

    def score_all(self, view: int, z: Tensor, labels: Tensor, bank_labels: Tensor, *,
                  similarity: str = "shifted_cosine", reduction: str = "mean", backend: str = "auto",
                  **form_params) -> Tensor:
        """Label-mode OUCL of every rank's ``z [b, dim]`` (``labels [b]``) against the whole bank of ``view``,
        whose labels are ``bank_labels [n_data]`` (every row's, the same on every rank). Returns the global
        loss on every rank; gradients reach each rank's ``z``. ``backend``: whose fused label ops score each
        shard (:func:`metaug_fast.distributed.oucl_embeddings_sharded`). ``form_params`` as
        :meth:`MemoryBank.score_all`."""
        if bank_labels.shape != (self.n_data,):
            raise ValueError(f"bank_labels must have one label per bank row ({self.n_data}), "
                             f"got shape {tuple(bank_labels.shape)}")
        return D.oucl_embeddings_sharded(z, labels, self.features[view], bank_labels[self.start:self.stop],
                                         group=self.group, similarity=similarity, reduction=reduction,
                                         shard_unit=True, backend=backend, **form_params)

    def full(self, view: int) -> Tensor:
        """The whole bank of ``view``, ``[n_data, dim]``, on every rank (for checkpoints and checks)."""
        return D.gather_all([self.features[view]], self.group)[0]

    def state_dict(self) -> dict:
        """This rank's shard (save one file per rank, or :meth:`full` on one rank)."""
        return {"features": self.features.clone(), "momentum": self.momentum, "start": self.start,
                "n_data": self.n_data}

    def load_state_dict(self, state: dict) -> None:
        if state["n_data"] != self.n_data or state["start"] != self.start or \
                state["features"].shape != self.features.shape:
            raise ValueError(f"shard (rows from {state['start']}, shape {tuple(state['features'].shape)}, bank of "
                             f"{state['n_data']}) does not match this rank's (rows from {self.start}, shape "
                             f"{tuple(self.features.shape)}, bank of {self.n_data})")
        self.features.copy_(state["features"])
        self.momentum = float(state["momentum"])
