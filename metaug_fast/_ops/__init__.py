"""One module per op: the autograd Functions of the fused backends, beside the kernels they call."""
from __future__ import annotations

import functools
from typing import Callable, Dict


def fused_impls(kernels, **extra: Callable) -> Dict[str, Callable]:
    """A fused backend's implementation of each op, under the signature every backend shares: the one set of
    autograd Functions of this package over ``kernels`` (a :class:`metaug_fast._ops.label.LabelKernels`),
    plus ``extra`` (ops the backend implements otherwise, such as its pairwise similarity)."""
    from . import label, margins, score

    by_ops = {"info_nce": score.info_nce_fused, "margin_statistics": margins.margin_statistics_fused}
    by_kernels = {"oucl_embeddings": label.oucl_embeddings_fused,
                  "info_nce_embeddings": label.info_nce_embeddings_fused,
                  "margin_statistics_embeddings": label.margin_statistics_embeddings_fused,
                  "symmetric_info_nce": label.symmetric_info_nce_fused}
    impls = {name: functools.partial(fn, ops=kernels.ops) for name, fn in by_ops.items()}
    # OUCL's score mode also asks the kernels whether they write the gradient with the forward.
    impls["oucl"] = functools.partial(score.oucl_fused, ops=kernels.ops, kernels=kernels)
    impls.update({name: functools.partial(fn, kernels=kernels) for name, fn in by_kernels.items()})
    return {**impls, **extra}
