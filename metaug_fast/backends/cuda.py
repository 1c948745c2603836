"""The ``cuda`` backend: the CUDA kernels of csrc/cuda, registered for the same ``torch.ops.metaug_fast`` ops
as the C++ backend (dispatch by the tensors' device), so the same autograd Functions run them.
``backend="auto"`` picks it for CUDA tensors after Triton (where Triton is missing or failed its check),
once its own self-check has passed (:mod:`metaug_fast._selfcheck`)."""
import warnings
from typing import Optional

import torch

from .. import _extension, _selfcheck
from .._backend import Backend, add
from . import cpp

ERROR: Optional[Exception]
if cpp.ERROR is not None:
    ERROR = ImportError(f"metaug_fast._C, which defines the ops, is unusable: {cpp.ERROR}")
else:
    try:
        _extension.load("_C_cuda")  # registers the CUDA kernels of the same ops

        ERROR = None
    except ImportError as exc:
        ERROR = exc
        if isinstance(exc, _extension.TorchMismatchError):
            warnings.warn(f"metaug_fast's CUDA backend is off: {exc}.", RuntimeWarning, stacklevel=2)


def unavailable() -> Optional[str]:
    if ERROR is not None:
        return (f"the CUDA extension metaug_fast._C_cuda could not be imported ({ERROR}). Build it on a machine "
                "with nvcc: METAUG_BUILD_CUDA=1 pip install -e . --no-build-isolation")
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: no CUDA device in this process"
    return None


# The C++ backend's record: the same ops, and capabilities by device type (none of them on CUDA).
BACKEND = add(Backend("cuda", rank=30, where="CUDA tensors", runs_on=lambda device: device.type == "cuda",
                      unavailable=unavailable, impls=dict(cpp.BACKEND.impls), kernels=cpp.KERNELS,
                      auto_on=("cuda",), self_check=_selfcheck.passes))
