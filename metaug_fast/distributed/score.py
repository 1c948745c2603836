"""Score mode across ranks: rows carry their own pairs, so nothing is gathered; only the reduction spans the
ranks."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

from .. import functional as F
from .. import reference as R
from ._common import _check_call, _global_loss


def oucl_global(
    pos: Tensor,
    neg: Tensor,
    *,
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    reduction: str = "mean",
    backend: str = "auto",
    **params,
) -> Tensor:
    """Score-mode OUCL whose reduction spans every rank of ``group``: the mean over the valid rows of all
    ranks (or the global sum), on every rank; each rank's gradient for its ``pos [b, K⁺]``, ``neg [b, K⁻]``
    (and optional masks) equals that of one process holding every rank's rows. Score-mode rows carry their
    own pairs, so nothing is gathered, and unlike label mode the second derivative is exact (no collective
    sits in the backward).

    params: form, beta, gamma_pos, gamma_neg, margin, lam, as :func:`metaug_fast.functional.oucl`.

    Example:
        >>> import torch
        >>> from metaug_fast import distributed
        >>> distributed.oucl_global(torch.rand(8, 6), torch.rand(8, 60)).shape   # the mean over every rank's rows
        torch.Size([])
    """
    _check_call("oucl_global", reduction)
    rows = F.oucl(pos, neg, pos_mask=pos_mask, neg_mask=neg_mask, reduction="none", backend=backend, **params)
    valid = R.valid_rows(pos, neg, pos_mask, neg_mask)
    return _global_loss(R.acc(rows), valid, reduction, group).to(pos.dtype)
