"""The argument checks of the public API, shared by the functional API, the loss modules, the drop-ins, the
distributed modes and the memory bank: each raises a TypeError or ValueError that names the argument."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .contract import LossParams
from .contract import real as check_real

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x, name: str, ndim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def check_float_tensor(x, name: str, ndim: int) -> Tensor:
    check_tensor(x, name, ndim)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_same(x: Tensor, first: Tensor, name: str, first_name: str, dtype: bool = True) -> None:
    if x.device != first.device:
        raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}")
    if dtype and x.dtype != first.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}")


def check_mask(mask, like: Tensor, name: str, like_name: str) -> Optional[Tensor]:
    if mask is None:
        return None
    check_tensor(mask, name, 2)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}")
    check_same(mask, like, name, like_name, dtype=False)
    return mask


def check_scores(pos, neg, pos_mask, neg_mask, pos_name="pos", neg_name="neg"):
    check_float_tensor(pos, pos_name, 2)
    check_float_tensor(neg, neg_name, 2)
    check_same(neg, pos, neg_name, pos_name)
    if neg.shape[0] != pos.shape[0]:
        raise ValueError(f"{pos_name} and {neg_name} must have the same number of rows, got {pos.shape[0]} and "
                         f"{neg.shape[0]}")
    return check_mask(pos_mask, pos, "pos_mask", pos_name), check_mask(neg_mask, neg, "neg_mask", neg_name)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_labels(labels, name: str, n: int, n_name: str, like: Tensor) -> Tensor:
    check_tensor(labels, name, 1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have one label per row of {n_name} ({n}), got {labels.shape[0]}")
    check_same(labels, like, name, n_name, dtype=False)
    return labels


def check_label_inputs(emb, labels, ref_emb, ref_labels) -> None:
    check_float_tensor(emb, "emb", 2)
    if emb.shape[1] == 0:
        raise ValueError(f"emb must have at least one feature, got shape {tuple(emb.shape)}")
    check_labels(labels, "labels", emb.shape[0], "emb", emb)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together (or both left None)")
    if ref_emb is not None:
        check_float_tensor(ref_emb, "ref_emb", 2)
        check_same(ref_emb, emb, "ref_emb", "emb")
        if ref_emb.shape[1] != emb.shape[1]:
            raise ValueError(f"ref_emb must have the feature size of emb ({emb.shape[1]}), got {ref_emb.shape[1]}")
        check_labels(ref_labels, "ref_labels", ref_emb.shape[0], "ref_emb", ref_emb)


def check_temperature(temperature, like: Tensor, like_name: str):
    """A positive finite float, or a 0-d float tensor on ``like``'s device. A tensor's value is checked as the
    float's where reading it is free (a CPU tensor, outside torch.compile's tracing); on an accelerator
    reading it would wait for the device, so a zero, negative or non-finite one makes the result NaN instead
    (a ``torch.isfinite(loss)`` guard fires; nothing is silently wrong)."""
    if not isinstance(temperature, Tensor):
        return check_real(temperature, "temperature", positive=True)
    if temperature.dim() != 0:
        raise ValueError(f"temperature must be a 0-d tensor (or a float), got shape {tuple(temperature.shape)}")
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
    check_same(temperature, like, "temperature", like_name, dtype=False)
    if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
        value = float(temperature.detach())
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperature must be finite and > 0, got tensor({value})")
        return temperature
    valid = (temperature > 0) & temperature.isfinite()
    return torch.where(valid, temperature, torch.full_like(temperature, float("nan")))


def info_nce_args(temperature, like: Tensor, like_name: str, reduction: str, average: str) -> dict:
    return dict(temperature=check_temperature(temperature, like, like_name),
                reduction=check_choice(reduction, "reduction", reference.REDUCTIONS),
                average=check_choice(average, "average", reference.AVERAGES))


def check_self_offset(self_offset, emb: Tensor, ref_emb: Optional[Tensor]) -> Optional[int]:
    if self_offset is None:
        return None
    if isinstance(self_offset, bool) or not isinstance(self_offset, int):
        raise TypeError(f"self_offset must be an int or None, got {type(self_offset).__name__}")
    if ref_emb is None:
        raise ValueError("self_offset needs ref_emb: without a reference set each row's own pair is excluded already")
    if self_offset < 0 or self_offset + emb.shape[0] > ref_emb.shape[0]:
        raise ValueError(f"self_offset must be in [0, {ref_emb.shape[0] - emb.shape[0]}] (anchor i is reference row "
                         f"i + self_offset), got {self_offset}")
    return self_offset


def oucl_params(form, beta, gamma_pos, gamma_neg, margin, lam, reduction) -> dict:
    """The validated keyword arguments of the backends' OUCL implementations."""
    params = LossParams(form, beta, gamma_pos, gamma_neg, margin, lam).kwargs()
    return dict(params, reduction=check_choice(reduction, "reduction", reference.REDUCTIONS))
