"""Backends and dispatch.

Each public op has one implementation per backend that provides it (registered by
:mod:`metaug_fast.functional`). ``backend="auto"`` picks, per op and device: ``METAUG_BACKEND`` when set,
else the C++ backend for CPU tensors when it is built, else ``reference`` (CUDA tensors included, until
the Triton and CUDA kernels have been verified on a GPU). Where the chosen backend does
not provide the op, ``auto`` runs ``reference``; an explicit ``backend=`` never falls back, it raises.

The ``triton`` backend runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` (Triton's
interpreter, used by the tests).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "register", "resolve"]

BACKENDS = ("reference", "cpp", "triton", "cuda")

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.metaug_fast.*)

    _CPP_ERROR = None
except ImportError as exc:  # the package must work without the extension
    _CPP_ERROR = exc

_CUDA_ERROR: Optional[Exception]
if _CPP_ERROR is not None:
    _CUDA_ERROR = ImportError("metaug_fast._C (which defines the ops) is not built")
elif importlib.util.find_spec(f"{__package__}._C_cuda") is None:
    _CUDA_ERROR = ImportError("metaug_fast._C_cuda is not built")
else:
    try:
        from . import _C_cuda  # noqa: F401  (registers the CUDA kernels of the same ops)

        _CUDA_ERROR = None
    except ImportError as exc:
        _CUDA_ERROR = exc


try:
    import triton  # noqa: F401

    _TRITON_ERROR: Optional[Exception] = None
except ImportError as exc:
    _TRITON_ERROR = exc


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this process cannot run; the message says why and what to do."""


def _unavailable_reason(name: str) -> str:
    if name == "cuda":
        if _CUDA_ERROR is not None:
            return (
                f"the CUDA extension metaug_fast._C_cuda could not be imported ({_CUDA_ERROR}). Build it on a "
                "machine with nvcc: METAUG_BUILD_CUDA=1 pip install -e . --no-build-isolation"
            )
        return "torch.cuda.is_available() is False: no CUDA device in this process"
    if name == "triton":
        if _TRITON_ERROR is not None:
            return f"Triton could not be imported ({_TRITON_ERROR}); `pip install triton`"
        return ("no CUDA device in this process (set TRITON_INTERPRET=1 before importing metaug_fast to run the "
                "Triton kernels on CPU tensors in Triton's interpreter, slowly)")
    if name == "cpp":
        return (
            f"the C++ extension metaug_fast._C could not be imported ({_CPP_ERROR}). Build it with "
            "`pip install -e . --no-build-isolation` (a C++17 compiler with OpenMP is needed; "
            "METAUG_NO_EXT=1 must not be set)"
        )
    return (
        f"this version of metaug_fast has no '{name}' backend; use backend='auto', 'reference'"
        + (" or 'cpp'" if _CPP_ERROR is None else "")
    )


def available_backends() -> List[str]:
    """Names of the backends usable in this process, e.g. ``['reference', 'cpp']``."""
    names = ["reference"]
    if _CPP_ERROR is None:
        names.append("cpp")
    if _TRITON_ERROR is None and (torch.cuda.is_available() or _triton_interpreting()):
        names.append("triton")
    if _CUDA_ERROR is None and torch.cuda.is_available():
        names.append("cuda")
    return names


_IMPLS: Dict[str, Dict[str, Callable]] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    _IMPLS.setdefault(op, {})[backend] = fn


def _check_name(name: str, argument: str) -> None:
    if not isinstance(name, str) or (name not in BACKENDS and name != "auto"):
        raise ValueError(f"{argument} must be 'auto' or one of {BACKENDS}, got {name!r}")


_DEVICE_TYPE = {"cpp": "cpu", "cuda": "cuda", "triton": "cuda"}


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "triton" and device.type == "cpu":
        return _triton_interpreting()
    return backend == "reference" or _DEVICE_TYPE[backend] == device.type


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` that ``backend`` selects for tensors on ``device``."""
    _check_name(backend, "backend")
    impls = _IMPLS[op]
    if backend == "auto":
        preferred = os.environ.get("METAUG_BACKEND", "").strip()
        if preferred and preferred != "auto":
            _check_name(preferred, "METAUG_BACKEND")
            if preferred not in available_backends():
                raise BackendUnavailableError(f"METAUG_BACKEND={preferred!r}: {_unavailable_reason(preferred)}")
        else:
            # CUDA tensors stay on reference under auto until the CUDA kernels have passed tests/test_cuda.py
            # on a real GPU (bench/gpu_check.sh); backend="cuda" or METAUG_BACKEND=cuda selects them.
            preferred = "cpp" if device.type == "cpu" and "cpp" in available_backends() else "reference"
        choice = preferred if preferred in impls and _device_ok(preferred, device) else "reference"
        return impls[choice]
    if backend not in available_backends():
        raise BackendUnavailableError(f"backend={backend!r}: {_unavailable_reason(backend)}")
    if backend not in impls:
        raise BackendUnavailableError(
            f"backend={backend!r} does not implement {op} in this version; backends that do: {sorted(impls)}"
        )
    if not _device_ok(backend, device):
        where = " (or CPU tensors under TRITON_INTERPRET=1)" if backend == "triton" else ""
        raise ValueError(f"backend={backend!r} runs on {_DEVICE_TYPE[backend].upper()} tensors{where} only, "
                         f"got tensors on {device}")
    return impls[backend]
