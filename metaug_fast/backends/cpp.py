"""The ``cpp`` backend: the OpenMP kernels of csrc/ (``torch.ops.metaug_fast``) on CPU tensors, through the
autograd Functions of metaug_fast._ops; ``backend="auto"`` picks it for CPU tensors when it is built."""
import warnings
from typing import Optional

from .. import _extension
from .._backend import Backend, add
from .._ops.label import (
    info_nce_embeddings_fused,
    margin_statistics_embeddings_fused,
    oucl_embeddings_fused,
    pairwise_similarity_fused,
    symmetric_info_nce_fused,
)
from .._ops.margins import margin_statistics_fused
from .._ops.score import CPP_OPS, info_nce_fused, oucl_fused

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

# The label and score ops dispatch on the tensors' device: the CUDA backend registers the same functions.
IMPLS = {"oucl": oucl_fused, "info_nce": info_nce_fused, "margin_statistics": margin_statistics_fused,
         "oucl_embeddings": oucl_embeddings_fused, "info_nce_embeddings": info_nce_embeddings_fused,
         "margin_statistics_embeddings": margin_statistics_embeddings_fused,
         "pairwise_similarity": pairwise_similarity_fused, "symmetric_info_nce": symmetric_info_nce_fused}


def unavailable() -> Optional[str]:
    if ERROR is None:
        return None
    if isinstance(ERROR, _extension.TorchMismatchError):
        return f"the C++ extension is unusable: {ERROR}"
    return (f"the C++ extension metaug_fast._C could not be imported ({ERROR}). Build it with "
            "`pip install -e . --no-build-isolation` (a C++17 compiler with OpenMP is needed; METAUG_NO_EXT=1 "
            "must not be set)")


BACKEND = add(Backend("cpp", where="CPU tensors", runs_on=lambda device: device.type == "cpu",
                      unavailable=unavailable, impls=dict(IMPLS), auto_on=("cpu",), label_ops=CPP_OPS))
