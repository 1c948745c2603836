"""All-gather strategy: every rank gathers the global batch (with gradients) and scores its own rows against
it; exact first and second derivatives (the gather and its backward are each other's adjoints); per-rank
memory O(Σ b · D)."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

from .. import _backend
from .. import _validate as V
from ._common import _check_call, _checked_params, _gather_padded, _gather_sizes, _GatherRows, _global_loss, _valid_rows


def oucl_embeddings_all_gather(
    emb: Tensor,
    labels: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    backend: str = "auto",
    **params,
) -> Tensor:
    """Label-mode OUCL over the global batch of all ranks of ``group``.

    Args:
        emb: this rank's ``[b, D]`` embeddings (b may differ between ranks); labels: ``[b]`` integers.
        reduction: ``"mean"`` (over all valid rows of all ranks) or ``"sum"``; both return the global value
            on every rank.
        params: similarity, form, beta, gamma_pos, gamma_neg, margin, lam, as
            :func:`metaug_fast.functional.oucl_embeddings`.

    Example:
        >>> import torch
        >>> from metaug_fast import distributed
        >>> emb = torch.randn(16, 32)
        >>> labels = torch.arange(8).repeat(2) + 8 * torch.distributed.get_rank()
        >>> distributed.oucl_embeddings_all_gather(emb, labels, form="circle", beta=80.0).shape
        torch.Size([])
    """
    similarity, checked = _checked_params("oucl_embeddings_all_gather", emb, labels, reduction, params)
    return _all_gather_loss("oucl_embeddings", emb, labels, group, reduction, backend, similarity=similarity,
                            **checked)


def info_nce_embeddings_all_gather(
    emb: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.07,
    similarity: str = "cosine",
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Label-mode InfoNCE (NT-Xent for two views) over the global batch of all ranks of ``group``, like
    :func:`oucl_embeddings_all_gather`: the global loss on every rank, each rank's gradient that of one
    process holding the whole batch, to the second order. ``emb [b, D]`` and ``labels [b]`` as
    :func:`oucl_embeddings_all_gather`.

    Example:
        >>> import torch
        >>> from metaug_fast import distributed
        >>> z1, z2 = torch.randn(8, 32), torch.randn(8, 32)   # this rank's two views
        >>> labels = torch.arange(8).repeat(2) + 8 * torch.distributed.get_rank()
        >>> distributed.info_nce_embeddings_all_gather(torch.cat([z1, z2]), labels, temperature=0.1).shape
        torch.Size([])
    """
    _check_call("info_nce_embeddings_all_gather", reduction)
    V.check_label_inputs(emb, labels, None, None)
    temperature = V.check_real(temperature, "temperature", positive=True)
    similarity = V.check_choice(similarity, "similarity", ("shifted_cosine", "cosine"))
    return _all_gather_loss("info_nce_embeddings", emb, labels, group, reduction, backend, temperature=temperature,
                            similarity=similarity, reduction="none")


def _all_gather_loss(op: str, emb: Tensor, labels: Tensor, group, global_reduction: str, backend: str,
                     **kwargs) -> Tensor:
    """This rank's rows of label-mode ``op`` (``kwargs``: its arguments, reduction "none") against every
    rank's gathered rows (its own row excluded by self_offset), reduced over all ranks."""
    rank = dist.get_rank(group)
    sizes = _gather_sizes(emb.shape[0], emb.device, group)
    all_emb = _GatherRows.apply(emb, sizes, rank, group)
    all_labels = _gather_padded(labels.long(), sizes, group)
    impl = _backend.resolve(op, backend, emb.device, emb.dtype)
    rows = impl(emb, labels, all_emb, all_labels, self_offset=sum(sizes[:rank]), **kwargs)
    return _global_loss(rows, _valid_rows(labels.long(), all_labels), global_reduction, group)


