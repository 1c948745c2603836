"""The contracts every backend shares, named once for Python.

- :class:`Form`: the loss form ids the kernels dispatch on (csrc/oucl_common.h ``FormId``, the Triton
  constexprs of ``metaug_fast.kernels._common``).
- :class:`Similarity`: the similarity ids of label mode.
- :class:`Stat`: the per-row state ``stats [B, N_STATS]`` that every forward saves for its backward. The
  slots mean different things per form, so each meaning has its own name (aliases of the same slot):
  the log-sum-exp forms keep A = LSE_p u(p) and C = LSE_n v(n) as (shift, log_sum) pairs, ℓ = softplus(A +
  C)/β; the hinge keeps its argument Σn - Σp + λ; InfoNCE (β = 1/τ) keeps C, Σ_k σ(C - βp_k) and n⁺; margin
  statistics keep p_min, n_max and the numbers of entries tied at each. Slot ``VALID`` is 1 for a row with a
  positive and a negative, whatever the form.
- :class:`Part`: the per-split partial state ``part [splits, B, N_PARTS]`` of the Triton label forward.
- :class:`LossParams`: the loss parameters with their defaults, their validation and the argument tuple
  the ops take.

``tests/test_contract_names.py`` checks that the C++ header and the Triton constants agree with these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from numbers import Real
from typing import NamedTuple

__all__ = ["Form", "Similarity", "Stat", "N_STATS", "stats_of", "Part", "N_PARTS", "LossParams", "OpArgs", "OUCL_FORMS",
           "HVP_FORMS", "SIMILARITIES", "normalizes", "slope", "label_self_mode"]


class Form(IntEnum):
    HINGE = 0
    SQUARED = 1
    WEIGHTED = 2
    CIRCLE = 3
    INFONCE = 4  # the weighted form's machinery with β = 1/τ
    MARGIN = 5  # margin statistics (label mode)


OUCL_FORMS = {"hinge": Form.HINGE, "squared": Form.SQUARED, "weighted": Form.WEIGHTED, "circle": Form.CIRCLE}

# The forms whose rows have a smooth Hessian in the scores, which label-aware second-derivative kernels take
# (the hinge's Hessian is zero and margins are piecewise linear: both keep the score-mode path). The C++
# header lists them as METAUG_HVP_FORMS (tests/test_contract_names.py compares the two).
HVP_FORMS = (Form.SQUARED, Form.WEIGHTED, Form.CIRCLE, Form.INFONCE)


class Similarity(IntEnum):
    SHIFTED_COSINE = 0  # (1 + cos)/2
    COSINE = 1


# "dot" is the inner product of the rows as given: the kernels see the cosine of rows that are not normalized.
SIMILARITIES = {"shifted_cosine": Similarity.SHIFTED_COSINE, "cosine": Similarity.COSINE, "dot": Similarity.COSINE}


def normalizes(similarity: str) -> bool:
    """Whether label mode L2-normalizes the rows before their inner product (every similarity but "dot")."""
    return similarity != "dot"


def slope(similarity: str) -> float:
    """a in d = a·⟨x, y⟩ + b: 1/2 for the shifted cosine, 1 otherwise."""
    return 0.5 if similarity == "shifted_cosine" else 1.0


class Stat(IntEnum):
    POS_SHIFT = 0
    POS_LOG_SUM = 1
    NEG_SHIFT = 2
    NEG_LOG_SUM = 3
    VALID = 4
    HINGE_ARG = 0
    NCE_SHIFT = 0
    NCE_LOG_SUM = 1
    NCE_SIGMOID_SUM = 2
    NCE_N_POS = 3
    P_MIN = 0
    N_MAX = 1
    TIES_POS = 2
    TIES_NEG = 3


N_STATS = 5


def stats_of(**slots):
    """``stats [B, N_STATS]`` from named slots (``Stat`` member names in lower case, e.g.
    ``pos_shift=a, valid=v``), zero where none is given; every slot a [B] tensor of one dtype."""
    import torch

    first = next(iter(slots.values()))
    out = torch.zeros(first.shape[0], N_STATS, dtype=first.dtype, device=first.device)
    for name, value in slots.items():
        out[:, Stat[name.upper()]] = value
    return out


class Part(IntEnum):
    """Running (max, Σ exp(e - max)) of each side; the hinge keeps plain sums in the Σ slots; margins keep
    extrema, ties and NaN counts. (The pair counts come from class counts, not from the tiles.)"""

    POS_MAX = 0
    POS_SUM = 1
    NEG_MAX = 2
    NEG_SUM = 3
    P_MIN = 0
    TIES_POS = 1
    N_MAX = 2
    TIES_NEG = 3
    NAN_POS = 4
    NAN_NEG = 5


N_PARTS = 6


def real(value, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class OpArgs(NamedTuple):
    """The loss arguments every op takes, in this order (C++ ``Cfg`` is built from them, Triton kernels take
    β, 1/β, γ⁺, γ⁻, m, λ)."""

    form: int
    beta: float
    gamma_pos: float
    gamma_neg: float
    margin: float
    lam: float


@dataclass(frozen=True)
class LossParams:
    """The OUCL loss parameters (defaults: the weighted form, β = 16, γ⁺ = γ⁻ = 0, m = 0.25, λ = 0),
    validated on construction: ``form`` one of :data:`OUCL_FORMS`, β > 0, every value finite."""

    form: str = "weighted"
    beta: float = 16.0
    gamma_pos: float = 0.0
    gamma_neg: float = 0.0
    margin: float = 0.25
    lam: float = 0.0

    def __post_init__(self):
        if not isinstance(self.form, str) or self.form not in OUCL_FORMS:
            raise ValueError(f"form must be one of {tuple(OUCL_FORMS)}, got {self.form!r}")
        object.__setattr__(self, "beta", real(self.beta, "beta", positive=True))
        for name in ("gamma_pos", "gamma_neg", "margin", "lam"):
            object.__setattr__(self, name, real(getattr(self, name), name))

    @classmethod
    def from_kwargs(cls, caller: str, kwargs: dict) -> "LossParams":
        """The parameters among ``kwargs`` (the others default); a TypeError naming ``caller`` for any other
        keyword."""
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"{caller} got unexpected arguments {sorted(unknown)}")
        return cls(**kwargs)

    def kwargs(self) -> dict:
        """The keyword arguments of the backends' implementations."""
        return dict(form=self.form, beta=self.beta, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg,
                    margin=self.margin, lam=self.lam)

    def op_args(self) -> OpArgs:
        """The argument tuple of the ops (C++, CUDA, Triton)."""
        return OpArgs(int(OUCL_FORMS[self.form]), self.beta, self.gamma_pos, self.gamma_neg, self.margin, self.lam)

    @staticmethod
    def info_nce(temperature: float) -> OpArgs:
        """The op arguments of InfoNCE at temperature τ: the weighted machinery with β = 1/τ."""
        return OpArgs(int(Form.INFONCE), 1.0 / real(temperature, "temperature", positive=True), 0.0, 0.0, 0.0, 0.0)

    @staticmethod
    def margins() -> OpArgs:
        """The op arguments of margin statistics (no loss parameters)."""
        return OpArgs(int(Form.MARGIN), 1.0, 0.0, 0.0, 0.0, 0.0)


def label_self_mode(e, iz, r, ir, self_offset: int) -> bool:
    """Whether a label op's call is self mode: the reference rows and their inverse norms are the anchors'
    own tensors (``r is e``, ``ir is iz``) with ``self_offset`` 0, as csrc/oucl_host.h's ``same_rows`` tells
    it; the op then returns the whole gradient in its first two outputs."""
    return self_offset == 0 and r is e and ir is iz
