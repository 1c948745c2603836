"""The ``cpp`` backend: the OpenMP kernels of csrc/ (``torch.ops.metaug_fast``) on CPU tensors, through the
autograd Functions of metaug_fast._ops; ``backend="auto"`` picks it for CPU tensors when it is built."""
import warnings
from typing import Optional

from .. import _extension
from .._backend import Backend, add
from .._ops import fused_impls
from .._ops.label import FUSED_HVP, FWD_GRAD, ROWS_HVP, SELF_HVP, LabelKernels, pairwise_similarity_fused
from .._ops.score import CPP_OPS, SCORE_FWD_GRAD

try:
    _extension.load("_C")  # loading the library registers torch.ops.metaug_fast.*

    ERROR: Optional[Exception] = None
except ImportError as exc:  # the package must work without the extension
    ERROR = exc
    if isinstance(exc, _extension.TorchMismatchError):  # built, but unusable: say so once, loudly
        warnings.warn(f"metaug_fast's C++ backend is off: {exc}. backend='auto' runs the reference "
                      "implementation meanwhile.", RuntimeWarning, stacklevel=2)
else:
    from .._ops import fake

    fake.register()

# The ops dispatch on the tensors' device: the CUDA backend registers its kernels for the same ops. The
# label-aware extras of the second derivative are CPU kernels over row chunks and symmetric tiles there, and
# the fused op oucl_label_hvp on CUDA (csrc/cuda/label_hvp.cuh); score mode's gradient with its forward
# (oucl_score_fwd_grad) is the CPU's.
KERNELS = LabelKernels(CPP_OPS, {"cpu": frozenset({FWD_GRAD, ROWS_HVP, SELF_HVP, SCORE_FWD_GRAD}),
                                 "cuda": frozenset({FUSED_HVP})})


def unavailable() -> Optional[str]:
    if ERROR is None:
        return None
    if isinstance(ERROR, _extension.TorchMismatchError):
        return f"the C++ extension is unusable: {ERROR}"
    return (f"the C++ extension metaug_fast._C could not be imported ({ERROR}). Build it with "
            "`pip install -e . --no-build-isolation` (a C++17 compiler with OpenMP is needed; METAUG_NO_EXT=1 "
            "must not be set)")


BACKEND = add(Backend("cpp", rank=10, where="CPU tensors", runs_on=lambda device: device.type == "cpu",
                      unavailable=unavailable, auto_on=("cpu",), kernels=KERNELS,
                      impls=fused_impls(KERNELS, pairwise_similarity=pairwise_similarity_fused)))
