"""The ``triton`` backend: the Triton kernels of metaug_fast.kernels on CUDA tensors, and on CPU tensors in
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the import (the tests use it).
``backend="auto"`` picks it first for CUDA tensors once its self-check has passed on that device, dtype and
mode family (:mod:`metaug_fast._selfcheck`); never for CPU tensors (the interpreter is for tests, not
speed)."""
import os
from typing import Optional

import torch

from .. import _selfcheck
from .._backend import Backend, add
from .._ops import fused_impls
from .._ops.label import FUSED_HVP, LabelKernels
from .._ops.margins import margin_injection_loss_triton
from .._ops.score import TRITON_OPS
from .._ops.similarity import pairwise_similarity_triton

try:
    import triton  # noqa: F401  (the import is the availability probe)

    ERROR: Optional[Exception] = None
except ImportError as exc:
    ERROR = exc


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable() -> Optional[str]:
    if ERROR is not None:
        return f"Triton could not be imported ({ERROR}); `pip install triton`"
    if not (torch.cuda.is_available() or interpreting()):
        return ("no CUDA device in this process (set TRITON_INTERPRET=1 before importing metaug_fast to run the "
                "Triton kernels on CPU tensors in Triton's interpreter, slowly)")
    return None


# The second derivative's own kernels on every device Triton runs on (CPU tensors: under the interpreter), and
# for the forms they do not take, the chunks' GEMMs are Triton's there too.
KERNELS = LabelKernels(TRITON_OPS, {"cuda": frozenset({FUSED_HVP}), "cpu": frozenset({FUSED_HVP})}, triton_gemm=True)

BACKEND = add(Backend(
    "triton", rank=20, where="CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)",
    runs_on=lambda device: device.type == "cuda" or (device.type == "cpu" and interpreting()),
    unavailable=unavailable, auto_on=("cuda",), self_check=_selfcheck.passes, kernels=KERNELS,
    impls=fused_impls(KERNELS, margin_injection_loss=margin_injection_loss_triton,
                      pairwise_similarity=pairwise_similarity_triton)))
