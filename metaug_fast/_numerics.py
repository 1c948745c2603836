"""Numeric primitives shared by the reference-set chunks (chunked.py), the Triton label partials
(kernels/label.py) and the distributed modes: exact merges of partial log-sum-exps. Low in the package: it
imports nothing of it."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def finite_or_zero(m: Tensor) -> Tensor:
    """``m`` where finite, else 0: a shift only needs to be finite (exp(-inf - 0) = 0, where
    exp(-inf - (-inf)) would be NaN)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def combine(ms: Tensor, ss: Tensor) -> Tuple[Tensor, Tensor]:
    """Exact combination of per-part (m_c, s_c), ``[B, n]`` each (LSE_c = m_c + log s_c), into one (m, s)
    ``[B]``, as flash-attention's online softmax merges its blocks."""
    m = finite_or_zero(ms.amax(1, keepdim=True).detach())
    return m[:, 0], (ss * torch.exp(ms - m)).sum(1)


def merge_lse(shift: Tensor, log_sum: Tensor) -> Tuple[Tensor, Tensor]:
    """Exact merge of log-sum-exps given as (shift, log_sum), ``[B, n]`` each (an empty part has log_sum =
    -inf), into one (shift, log_sum) ``[B]``: :func:`combine` on (shift, exp(log_sum)), which cannot
    overflow (exp(log_sum) is at most the number of terms)."""
    m, s = combine(shift, torch.exp(log_sum))
    return m, torch.log(s)
