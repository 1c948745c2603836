"""Traces every case of tests/triton_cases.py on fake CUDA tensors, without a GPU and without the interpreter,
through AOT dispatch (what torch.compile runs after Dynamo), and prints one JSON line per case:

- ``kernels``: the Triton kernels in the traced graph (``triton_kernel_wrapper_functional`` nodes): the
  launches are visible to the compiler, not hidden in an opaque call;
- ``opaque``: calls of ``torch.ops.metaug_fast_triton`` left in the graph (there should be none);
- ``inputs_written``: graph inputs that a kernel writes, as torch's analysis of the kernels' Triton IR finds
  them (compiled for sm_90 here; there should be none: every operator is declared not to mutate);
- ``outputs``: (shape, dtype) of each output.

Run by tests/test_triton_ops.py as ``python tests/triton_trace.py DTYPE...`` with TRITON_INTERPRET unset; each
line also names its dtype.
"""
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET: the kernels must be Triton's JIT functions to be traced")

import torch  # noqa: E402  (after the TRITON_INTERPRET check)
import triton  # noqa: E402  (after the TRITON_INTERPRET check)
from functorch.compile import aot_function, make_boxed_func  # noqa: E402  (after the TRITON_INTERPRET check)
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402  (after the TRITON_INTERPRET check)
from triton.backends.compiler import GPUTarget  # noqa: E402  (after the TRITON_INTERPRET check)


class _Hopper:
    """The device torch's mutation analysis compiles the kernels for (Triton asks its driver; there is none)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def _outputs(out):
    flat = out if isinstance(out, (tuple, list)) else (out,)
    return [[list(x.shape), str(x.dtype)] for x in flat]


def _tensors(args):
    """The distinct tensors among ``args``, in order (one passed twice is one input: the label ops' self mode
    is the same tensor on both sides, as the autograd Functions pass it)."""
    unique = {}
    for a in args:
        if isinstance(a, torch.Tensor):
            unique.setdefault(id(a), a)
    return list(unique.values())


def _with_constants(fn, args):
    """``fn`` as a function of the distinct tensors among ``args`` only (AOT dispatch takes tensors), the
    other arguments bound."""
    order = [id(t) for t in _tensors(args)]

    def call(*tensors):
        by_id = dict(zip(order, tensors))
        return fn(*(by_id[id(a)] if isinstance(a, torch.Tensor) else a for a in args))
    return call


def _trace(cases, dtype: str) -> None:
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    for name, fn, args in cases:
        graphs.clear()
        out = aot_function(_with_constants(fn, args), fw_compiler=keep)(*_tensors(args))
        (gm,) = graphs
        kernels = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
        written = sorted({n.kwargs["kwargs"][arg].name for n in kernels for arg in n.kwargs["tensors_to_clone"]
                          if n.kwargs["kwargs"][arg].op == "placeholder"})
        opaque = sorted({str(n.target) for n in gm.graph.nodes if "metaug_fast_triton" in str(n.target)})
        print(json.dumps(dict(dtype=dtype, name=name, kernels=len(kernels), opaque=opaque, inputs_written=written,
                              outputs=_outputs(out))), flush=True)


def main() -> None:
    triton.runtime.driver.set_active(_Hopper())
    sys.path.insert(0, os.path.dirname(__file__))
    import metaug_fast.backends.triton as triton_backend

    from triton_cases import op_cases, public_cases

    triton_backend.BACKEND.unavailable = lambda: None  # the tensors are CUDA tensors, only fake
    for dtype in sys.argv[1:]:
        with FakeTensorMode():
            _trace(op_cases("cuda", getattr(torch, dtype)) + public_cases("cuda", getattr(torch, dtype)), dtype)


if __name__ == "__main__":
    main()
