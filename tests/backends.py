"""The backends the contract suite (test_contract.py) runs, one record each.

A record names a backend, the device its tensors live on, and its implementation of each op under the
signature every backend registers (``metaug_fast._backend``): arguments already validated, every
parameter given. A new backend gets the whole contract grid from one entry in :func:`records`.

``cuda_simt`` is the CUDA backend's own kernels (csrc/cuda/score.cu, label.cu) compiled as host C++ and run by
the SIMT emulator of csrc/cuda/simt, driven through the same autograd Functions as on a GPU.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from torch.utils import cpp_extension

import metaug_fast
from metaug_fast import _backend

ROOT = Path(__file__).resolve().parents[1]

# METAUG_SIMT_ASAN=1: the emulated kernels are built with AddressSanitizer (test_cuda_simt.py reruns the
# CUDA-specific tests and the contract suite's cuda_simt entries so, in a subprocess).
ASAN = os.environ.get("METAUG_SIMT_ASAN", "0") == "1"
ASAN_TEST = "test_cuda_simt.py::test_kernels_stay_in_bounds"


def runs_emulated_kernels(item) -> bool:
    """Whether the test ``item`` runs the emulated CUDA kernels: every test of test_cuda_simt.py but the
    AddressSanitizer run itself, and the contract suite's cuda_simt entries. The sanitizer run repeats
    exactly these."""
    path, name = item.nodeid.split("::", 1)
    if path.endswith("test_cuda_simt.py"):
        return not item.nodeid.endswith(ASAN_TEST)
    return path.endswith("test_contract.py") and re.search(r"\[cuda_simt[-\]]", name) is not None


def _gcc_library(name):
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) else None


@functools.lru_cache(maxsize=None)
def asan_preload():
    """The LD_PRELOAD of gcc's AddressSanitizer runtime and of libstdc++ (ASan must see it before Triton's
    extension throws its first exception), or None where the runtime is not installed."""
    libs = [_gcc_library("libasan.so"), _gcc_library("libstdc++.so.6")]
    return None if None in libs else " ".join(libs)


@dataclass(frozen=True)
class Backend:
    """One backend under test. ``interpreted``: its kernels run in an interpreter or emulator on the CPU,
    so the suite keeps its shapes small."""

    name: str
    device: str
    impls: Dict[str, Callable] = field(repr=False)
    interpreted: bool = False

    def has(self, op: str) -> bool:
        return op in self.impls

    def __call__(self, op: str, *args, **kwargs):
        if op not in self.impls:
            pytest.skip(f"{self.name} does not implement {op}")
        return self.impls[op](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def simt_ops():
    """torch.ops.metaug_fast_simt, built on first use into build/simt (about 10 s)."""
    build = ROOT / "build" / ("simt_asan" if ASAN else "simt")
    build.mkdir(parents=True, exist_ok=True)
    # -ffp-contract=off: no fused multiply-adds, as nvcc --fmad=false builds the real kernels.
    flags = ["-O1", "-ffp-contract=off"] + (["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else [])
    cpp_extension.load(name="metaug_fast_simt_asan" if ASAN else "metaug_fast_simt",
                       sources=[str(ROOT / "csrc/cuda/simt/oucl_cuda_simt.cpp")], extra_cflags=flags,
                       extra_ldflags=["-fsanitize=address"] if ASAN else [], build_directory=str(build),
                       is_python_module=False)
    return torch.ops.metaug_fast_simt


def simt_kernels():
    """The emulated CUDA ops as the CUDA backend's LabelKernels: the fused second derivative (oucl_label_hvp)
    declared on the emulator's CPU tensors as the backend declares it on CUDA."""
    from metaug_fast._ops.label import LabelKernels
    from metaug_fast.backends import cpp

    return LabelKernels(simt_ops(), {"cpu": cpp.KERNELS.capabilities["cuda"]})


def _registered(name: str) -> Dict[str, Callable]:
    return dict(_backend.REGISTRY[name].impls)


def _simt_impls() -> Dict[str, Callable]:
    from metaug_fast._ops import fused_impls
    from metaug_fast._ops.label import pairwise_similarity_fused

    # The CUDA backend's similarity is ATen (cuBLAS on a GPU): no kernel of its own to emulate.
    return fused_impls(simt_kernels(), pairwise_similarity=pairwise_similarity_fused)


# (name, device, interpreted, GPU only)
ENTRIES = (("reference", "cpu", False, False), ("cpp", "cpu", False, False), ("triton", "cpu", True, False),
           ("cuda_simt", "cpu", True, False), ("triton", "cuda", False, True), ("cuda", "cuda", False, True))


def params():
    """pytest params for the backend fixture: GPU entries carry the ``gpu`` mark."""
    out = []
    for name, device, interpreted, gpu in ENTRIES:
        marks = [pytest.mark.gpu] if gpu else []
        out.append(pytest.param((name, device, interpreted), id=f"{name}-{device}" if gpu else name, marks=marks))
    return out


def load(name: str, device: str, interpreted: bool) -> Backend:
    """The record of one entry, or a skip that says why it cannot run in this process."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "cuda_simt":
        if "cpp" not in metaug_fast.available_backends():
            pytest.skip("the emulated CUDA kernels run through the C++ extension's autograd Functions")
        return Backend(name, device, _simt_impls(), interpreted)
    if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("TRITON_INTERPRET=1 is needed to run the Triton kernels on CPU tensors")
    if name not in metaug_fast.available_backends():
        pytest.skip(f"backend {name!r} unavailable: {_backend.REGISTRY[name].unavailable()}")
    return Backend(name, device, _registered(name), interpreted)
