"""Backends as records, and dispatch.

A backend is one module of :mod:`metaug_fast.backends` that builds a :class:`Backend` record and adds it
to :data:`REGISTRY`: its name, which tensors it runs, a probe that says why it is unavailable in this
process (and how to get it), the device types ``backend="auto"`` picks it for, its kernels (a fused backend:
the namespace of its ops, which every fused backend shares the interface of, and what else they can do,
:class:`metaug_fast._ops.label.LabelKernels`), and its implementation of each op under the signature every
backend shares (arguments validated by :mod:`metaug_fast.functional`, every parameter
given). Dispatch, ``available_backends``, the distributed modes and the tests read this registry; a new
backend is a new module.

``backend="auto"`` picks, per op, device and dtype: ``METAUG_BACKEND`` when set, else the first available
backend that provides the op, lists the device type in ``auto_on`` and passes its ``self_check`` (the C++
backend for CPU tensors; for CUDA tensors Triton, then CUDA, each once its check against the reference has
passed in this process: :mod:`metaug_fast._selfcheck`), else ``reference``. An explicit ``backend=`` never
falls back, it raises.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Backend", "LABEL_KERNELS", "REGISTRY", "BackendUnavailableError", "add", "available_backends",
           "label_kernels", "resolve", "select"]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this process cannot run; the message says why and what to do."""


@dataclass
class Backend:
    """One backend. ``runs_on(device)``: whether it runs tensors on ``device`` (``where`` says it in words);
    ``unavailable()``: None when usable in this process, else why not and how to get it;
    ``self_check(backend, device, dtype, op)``: whether ``auto`` may pick it there (None: always);
    ``kernels``: a fused backend's ops and capabilities (None for the reference); ``rank``: where it stands in
    :data:`REGISTRY`, lowest first, which is the order ``auto`` tries backends in for a device type."""

    name: str
    rank: int
    where: str
    runs_on: Callable[[torch.device], bool]
    unavailable: Callable[[], Optional[str]]
    impls: Dict[str, Callable] = field(default_factory=dict)
    auto_on: Tuple[str, ...] = ()
    kernels: Optional[object] = None
    self_check: Optional[Callable[["Backend", torch.device, Optional[torch.dtype], str], bool]] = None

    def available(self) -> bool:
        return self.unavailable() is None


REGISTRY: Dict[str, Backend] = {}


def add(backend: Backend) -> Backend:
    """Register ``backend`` in :data:`REGISTRY`, kept in ``rank`` order (in place: modules hold the dict)."""
    ranks = {b.rank: name for name, b in REGISTRY.items() if name != backend.name}
    if backend.rank in ranks:
        raise ValueError(f"backend {backend.name!r} has rank {backend.rank}, already {ranks[backend.rank]!r}'s")
    entries = sorted({**REGISTRY, backend.name: backend}.items(), key=lambda item: item[1].rank)
    REGISTRY.clear()
    REGISTRY.update(entries)
    return backend


def available_backends() -> List[str]:
    """Names of the backends usable in this process, e.g. ``['reference', 'cpp']``.

    Example:
        >>> import metaug_fast
        >>> "reference" in metaug_fast.available_backends()
        True
    """
    return [name for name, b in REGISTRY.items() if b.available()]


def check_name(name: str, argument: str) -> None:
    if not isinstance(name, str) or (name not in REGISTRY and name != "auto"):
        raise ValueError(f"{argument} must be 'auto' or one of {tuple(REGISTRY)}, got {name!r}")


# The requirement of the callers that run a backend's label ops themselves (ring mode, sharded scoring, the
# benches) instead of one of its ``impls``: the backend must have ``kernels``.
LABEL_KERNELS = "label_kernels"


def _provides(b: Backend, op: str) -> bool:
    return b.kernels is not None if op == LABEL_KERNELS else op in b.impls


def _auto(op: str, device: torch.device, dtype: Optional[torch.dtype]) -> Backend:
    preferred = os.environ.get("METAUG_BACKEND", "").strip()
    if preferred and preferred != "auto":
        check_name(preferred, "METAUG_BACKEND")
        reason = REGISTRY[preferred].unavailable()
        if reason:
            raise BackendUnavailableError(f"METAUG_BACKEND={preferred!r}: {reason}")
        chosen = REGISTRY[preferred]
        if _provides(chosen, op) and chosen.runs_on(device):
            return chosen
    else:
        for b in REGISTRY.values():
            if device.type in b.auto_on and _provides(b, op) and b.runs_on(device) and b.available() and (
                    b.self_check is None or b.self_check(b, device, dtype, op)):
                return b
    if not _provides(REGISTRY["reference"], op):
        having = [b for b in REGISTRY.values() if _provides(b, op) and b.runs_on(device)]
        reasons = "; ".join(f"{b.name}: {b.unavailable() or 'not picked by auto here'}" for b in having)
        raise BackendUnavailableError(f"no backend runs the fused label kernels on {device.type} in this process "
                                      f"({reasons or 'none has them there'})")
    return REGISTRY["reference"]


def select(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Backend:
    """The record of the backend that runs ``op`` for tensors of ``dtype`` on ``device`` when ``backend`` is
    asked for: ``op`` is one of the backends' ``impls`` names, or :data:`LABEL_KERNELS` for a caller that
    runs the label ops itself. An explicit backend that cannot is refused (``BackendUnavailableError`` when
    this process cannot run it or it lacks ``op``, ``ValueError`` for tensors on a device it does not run),
    never replaced by another; ``"auto"`` as the module says."""
    check_name(backend, "backend")
    if backend == "auto":
        return _auto(op, device, dtype)
    chosen = REGISTRY[backend]
    reason = chosen.unavailable()
    if reason:
        raise BackendUnavailableError(f"backend={backend!r}: {reason}")
    if not _provides(chosen, op):
        doing = sorted(name for name, b in REGISTRY.items() if _provides(b, op))
        lacks = "has no fused label kernels" if op == LABEL_KERNELS else f"does not implement {op} in this version"
        raise BackendUnavailableError(f"backend={backend!r} {lacks}; backends that do: {doing}")
    if not chosen.runs_on(device):
        raise ValueError(f"backend={backend!r} runs on {chosen.where} only, got tensors on {device}")
    return chosen


def resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Callable:
    """The implementation of ``op`` that ``backend`` selects for tensors of ``dtype`` on ``device``."""
    return select(op, backend, device, dtype).impls[op]


def label_kernels(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None):
    """The label kernels (:class:`metaug_fast._ops.label.LabelKernels`) that ``backend`` selects for tensors of
    ``dtype`` on ``device``, for a caller that runs the label ops itself; with ``"auto"`` the backend that
    ``auto`` picks there, and an error where it would pick the reference (which has none)."""
    return select(LABEL_KERNELS, backend, device, dtype).kernels
