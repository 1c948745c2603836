"""The official MetAug code's criterion (github.com/jiangmengli/metaug, ``NCE/NCECriterion_MetAug.py``,
``CircleLoss.forward``), fused.

>>> from metaug_fast.losses.official import CircleLoss          # was: from NCE.NCECriterion_MetAug import CircleLoss
>>> criterion = CircleLoss(args)                                # the same argparse options
>>> loss = criterion(out_ab2l, out_l2ab, out_ori2l, out_l2ori, out_ab2ori, out_ori2ab)

The six inputs are the CMC memory's scores, each ``[B, K+1, 1]`` (or ``[B, K+1]``) with the positive in
column 0 and K negatives after it. The official criterion maps every score s to (s + 1)/2, concatenates the
six positives into ``p [B, 6]`` and the negatives into ``n [B, 6K]``, and returns

    (16/γ) · mean_i softplus(LSE_k γ·(n_ik − δ⁻) + LSE_k −γ·(p_ik − δ⁺))

(its ``circle_loss_ite_de_to_softmax``), with δ⁺ = 1 − δ_m and δ⁻ = δ_m when ``delta_enable_gh == "yes"``,
else 0. That is 16 times the library's weighted OUCL form at β = γ, γ⁺ = δ⁺, γ⁻ = δ⁻ on the mapped scores ("mean"
reduction), or, with the map folded into the parameters, 8 times the weighted form at β = γ/2, γ± = 2δ± − 1 on
the scores as given: what this class computes, on the fused score-mode op. The official Γ weights are 1 whether
``alpha_enable_gh`` is "yes" or "no" (its "yes" branch computes the circle weights and then sets them to 1), so
the α options change nothing there and change nothing here; they are checked as the official code checks them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _backend
from .. import _validate as V
from .. import functional as F

__all__ = ["CircleLoss"]

# The official options (train_MetAug.py's argparse names) and their defaults there.
_OPTIONS = {"gama_gh": 16.0, "delta_m_gh": 0.25, "delta_enable_gh": "no", "alpha_m_gh": 0.25, "alpha_de_gh": 1.0,
            "alpha_enable_gh": "no"}


def _yes_no(value, name: str) -> str:
    if value not in ("yes", "no"):
        raise ValueError(f"{name} must be 'yes' or 'no', got {value!r}")
    return value


class CircleLoss(nn.Module):
    """The official MetAug criterion.

    Args:
        args: an object with the official options as attributes (``gama_gh``, ``delta_m_gh``,
            ``delta_enable_gh``, ``alpha_m_gh``, ``alpha_de_gh``, ``alpha_enable_gh``), e.g. the official
            argparse namespace; missing attributes take the defaults below.
        gamma: ``gama_gh`` as a keyword (overrides ``args``); likewise the next five.
        delta_m: ``delta_m_gh``.
        delta_enable: ``delta_enable_gh``.
        alpha_m: ``alpha_m_gh``.
        alpha_de: ``alpha_de_gh``.
        alpha_enable: ``alpha_enable_gh``.
        backend: metaug_fast's backend choice.
    Forward: six float tensors ``[B, K+1, 1]`` or ``[B, K+1]`` of one dtype and device (K may differ between
    them); returns a scalar in their dtype.

    Example:
        >>> import torch
        >>> from metaug_fast.losses.official import CircleLoss
        >>> outs = [torch.rand(4, 17, 1) * 2 - 1 for _ in range(6)]   # [B, K+1, 1], the positive in column 0
        >>> CircleLoss()(*outs).shape
        torch.Size([])
    """

    def __init__(self, args=None, *, gamma: Optional[float] = None, delta_m: Optional[float] = None,
                 delta_enable: Optional[str] = None, alpha_m: Optional[float] = None,
                 alpha_de: Optional[float] = None, alpha_enable: Optional[str] = None,
                 backend: str = "auto") -> None:
        super().__init__()
        given = dict(gama_gh=gamma, delta_m_gh=delta_m, delta_enable_gh=delta_enable, alpha_m_gh=alpha_m,
                     alpha_de_gh=alpha_de, alpha_enable_gh=alpha_enable)
        opts = {k: given[k] if given[k] is not None else getattr(args, k, default) for k, default in _OPTIONS.items()}
        self.gamma = V.check_real(opts["gama_gh"], "gamma", positive=True)
        self.delta_m = V.check_real(opts["delta_m_gh"], "delta_m")
        self.delta_enable = _yes_no(opts["delta_enable_gh"], "delta_enable")
        self.alpha_enable = _yes_no(opts["alpha_enable_gh"], "alpha_enable")
        self.alpha_m = V.check_real(opts["alpha_m_gh"], "alpha_m")
        self.alpha_de = V.check_real(opts["alpha_de_gh"], "alpha_de")
        _backend.check_name(backend, "backend")
        self.backend = backend

    def forward(self, out_ab2l: Tensor, out_l2ab: Tensor, out_ori2l: Tensor, out_l2ori: Tensor,
                out_ab2ori: Tensor, out_ori2ab: Tensor) -> Tensor:
        outs = {"out_ab2l": out_ab2l, "out_l2ab": out_l2ab, "out_ori2l": out_ori2l, "out_l2ori": out_l2ori,
                "out_ab2ori": out_ab2ori, "out_ori2ab": out_ori2ab}
        first = out_ab2l
        scores = []
        for name, x in outs.items():
            if isinstance(x, Tensor) and x.dim() == 3 and x.shape[2] == 1:
                x = x[..., 0]
            V.check_float_tensor(x, name, 2)
            V.check_same(x, first, name, "out_ab2l")
            if x.shape[0] != first.shape[0] or x.shape[1] < 1:
                raise ValueError(f"{name} must be [B, K+1(, 1)] with B = {first.shape[0]} and the positive in column "
                                 f"0, got {tuple(x.shape)}")
            scores.append(x)
        pos = torch.cat([s[:, :1] for s in scores], 1)
        neg = torch.cat([s[:, 1:] for s in scores], 1)
        delta_p, delta_n = (1 - self.delta_m, self.delta_m) if self.delta_enable == "yes" else (0.0, 0.0)
        # γ·((s + 1)/2 − δ) = (γ/2)·(s − (2δ − 1)): the map to (s + 1)/2 folds into β and the γ±, so the scores
        # go to the op as they are; (16/γ)·softplus = 8·(2/γ)·softplus.
        loss = F.oucl(pos, neg, form="weighted", beta=self.gamma / 2, gamma_pos=2 * delta_p - 1,
                      gamma_neg=2 * delta_n - 1, reduction="mean", backend=self.backend)
        return loss * 8

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, delta_enable={self.delta_enable!r}, delta_m={self.delta_m}"
