"""The ``triton`` backend: the Triton kernels of metaug_fast.kernels on CUDA tensors, and on CPU tensors in
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the import (the tests use it).
``backend="auto"`` picks it first for CUDA tensors once its self-check has passed on that device, dtype and
mode family (:mod:`metaug_fast._selfcheck`); never for CPU tensors (the interpreter is for tests, not
speed)."""
import functools
import os
from typing import Optional

import torch

from .. import _selfcheck
from .._backend import Backend, add
from .._ops.label_triton import (
    info_nce_embeddings_triton,
    margin_statistics_embeddings_triton,
    oucl_embeddings_triton,
    pairwise_similarity_triton,
    symmetric_info_nce_triton,
)
from .._ops.margins import margin_injection_loss_triton, margin_statistics_fused
from .._ops.score import TRITON_OPS, info_nce_fused, oucl_fused

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


BACKEND = add(Backend(
    "triton", where="CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)",
    runs_on=lambda device: device.type == "cuda" or (device.type == "cpu" and interpreting()),
    unavailable=unavailable, auto_on=("cuda",), self_check=_selfcheck.passes,
    impls={"oucl": functools.partial(oucl_fused, ops=TRITON_OPS),
           "info_nce": functools.partial(info_nce_fused, ops=TRITON_OPS),
           "margin_statistics": functools.partial(margin_statistics_fused, ops=TRITON_OPS),
           "margin_injection_loss": margin_injection_loss_triton,
           "oucl_embeddings": oucl_embeddings_triton, "info_nce_embeddings": info_nce_embeddings_triton,
           "symmetric_info_nce": symmetric_info_nce_triton,
           "margin_statistics_embeddings": margin_statistics_embeddings_triton,
           "pairwise_similarity": pairwise_similarity_triton}))
