"""Backends as records, and dispatch.

A backend is one module of :mod:`metaug_fast.backends` that builds a :class:`Backend` record and adds it
to :data:`REGISTRY`: its name, which tensors it runs, a probe that says why it is unavailable in this
process (and how to get it), the device types ``backend="auto"`` picks it for, the fused label ops the
distributed modes and memory banks need (if it has them), and its implementation of each op under the
signature every backend shares (arguments validated by :mod:`metaug_fast.functional`, every parameter
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

__all__ = ["Backend", "REGISTRY", "BackendUnavailableError", "add", "available_backends", "fused_label_ops",
           "resolve"]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this process cannot run; the message says why and what to do."""


@dataclass
class Backend:
    """One backend. ``runs_on(device)``: whether it runs tensors on ``device`` (``where`` says it in words);
    ``unavailable()``: None when usable in this process, else why not and how to get it;
    ``self_check(backend, device, dtype, op)``: whether ``auto`` may pick it there (None: always)."""

    name: str
    where: str
    runs_on: Callable[[torch.device], bool]
    unavailable: Callable[[], Optional[str]]
    impls: Dict[str, Callable] = field(default_factory=dict)
    auto_on: Tuple[str, ...] = ()
    label_ops: Optional[object] = None
    self_check: Optional[Callable[["Backend", torch.device, Optional[torch.dtype], str], bool]] = None

    def available(self) -> bool:
        return self.unavailable() is None


REGISTRY: Dict[str, Backend] = {}


def add(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


def available_backends() -> List[str]:
    """Names of the backends usable in this process, e.g. ``['reference', 'cpp']``.

    Example:
        >>> import metaug_fast
        >>> "reference" in metaug_fast.available_backends()
        True
    """
    return [name for name, b in REGISTRY.items() if b.available()]


def _check_name(name: str, argument: str) -> None:
    if not isinstance(name, str) or (name not in REGISTRY and name != "auto"):
        raise ValueError(f"{argument} must be 'auto' or one of {tuple(REGISTRY)}, got {name!r}")


def _auto(op: str, device: torch.device, dtype: Optional[torch.dtype]) -> Callable:
    preferred = os.environ.get("METAUG_BACKEND", "").strip()
    if preferred and preferred != "auto":
        _check_name(preferred, "METAUG_BACKEND")
        reason = REGISTRY[preferred].unavailable()
        if reason:
            raise BackendUnavailableError(f"METAUG_BACKEND={preferred!r}: {reason}")
        chosen = REGISTRY[preferred]
        return chosen.impls[op] if op in chosen.impls and chosen.runs_on(device) else REGISTRY["reference"].impls[op]
    for b in REGISTRY.values():
        if device.type in b.auto_on and op in b.impls and b.runs_on(device) and b.available() and (
                b.self_check is None or b.self_check(b, device, dtype, op)):
            return b.impls[op]
    return REGISTRY["reference"].impls[op]


def resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Callable:
    """The implementation of ``op`` that ``backend`` selects for tensors of ``dtype`` on ``device``."""
    _check_name(backend, "backend")
    if backend == "auto":
        return _auto(op, device, dtype)
    chosen = REGISTRY[backend]
    reason = chosen.unavailable()
    if reason:
        raise BackendUnavailableError(f"backend={backend!r}: {reason}")
    if op not in chosen.impls:
        doing = sorted(name for name, b in REGISTRY.items() if op in b.impls)
        raise BackendUnavailableError(f"backend={backend!r} does not implement {op} in this version; backends "
                                      f"that do: {doing}")
    if not chosen.runs_on(device):
        raise ValueError(f"backend={backend!r} runs on {chosen.where} only, got tensors on {device}")
    return chosen.impls[op]


def fused_label_ops(what: str, device: torch.device, backend: str = "auto"):
    """The fused label ops (``oucl_label_fwd``/``_bwd``) for tensors on ``device``: the named ``backend``'s,
    or with ``"auto"`` the first available backend's that has them there; ``what`` names the caller in the
    errors. An explicit backend without them is refused, never replaced by another."""
    _check_name(backend, "backend")
    if backend != "auto":
        chosen = REGISTRY[backend]
        if chosen.label_ops is None:
            having = sorted(name for name, b in REGISTRY.items() if b.label_ops is not None)
            raise ValueError(f"{what} runs the fused label ops, which backend={backend!r} does not have; backends "
                             f"that do: {having} (or backend='auto')")
        reason = chosen.unavailable()
        if reason:
            raise BackendUnavailableError(f"backend={backend!r}: {reason}")
        if not chosen.runs_on(device):
            raise ValueError(f"backend={backend!r} runs on {chosen.where} only, got tensors on {device}")
        return chosen.label_ops
    candidates = [b for b in REGISTRY.values() if b.label_ops is not None and b.runs_on(device)]
    for b in candidates:
        if b.available():
            return b.label_ops
    reasons = "; ".join(f"{b.name}: {b.unavailable()}" for b in candidates) or "no backend has them"
    raise BackendUnavailableError(f"{what} needs the fused label ops on {device.type}: {reasons}")
