"""Public functions of metaug_fast: validate the inputs, pick a backend, run it.

Every function has the meaning given in docs/mathematics.md#mathematics and the design in
docs/design.md#backends; the pure-PyTorch versions in :mod:`metaug_fast.reference` define the results. Bad input
raises a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device or value) naming the argument.

Shapes: score mode takes ``pos [B,K⁺]`` and ``neg [B,K⁻]`` (float16/bfloat16/float32/float64) with
optional bool masks of the same shapes; label mode takes ``emb [B,D]``, integer ``labels [B]`` and an
optional reference set ``ref_emb [M,D]``, ``ref_labels [M]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _backend, backends, reference  # noqa: F401  (importing backends registers them)
from .contract import LossParams, _real

DEFAULTS = LossParams()

__all__ = [
    "oucl",
    "oucl_embeddings",
    "pairwise_similarity",
    "margin_statistics",
    "margin_statistics_embeddings",
    "margin_injection_loss",
    "info_nce",
    "info_nce_embeddings",
    "symmetric_info_nce",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------- validation
def _tensor(x, name: str, ndim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def _float_tensor(x, name: str, ndim: int) -> Tensor:
    _tensor(x, name, ndim)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _same(x: Tensor, first: Tensor, name: str, first_name: str, dtype: bool = True) -> None:
    if x.device != first.device:
        raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}")
    if dtype and x.dtype != first.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}")


def _mask(mask, like: Tensor, name: str, like_name: str) -> Optional[Tensor]:
    if mask is None:
        return None
    _tensor(mask, name, 2)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}")
    _same(mask, like, name, like_name, dtype=False)
    return mask


def _scores(pos, neg, pos_mask, neg_mask, pos_name="pos", neg_name="neg"):
    _float_tensor(pos, pos_name, 2)
    _float_tensor(neg, neg_name, 2)
    _same(neg, pos, neg_name, pos_name)
    if neg.shape[0] != pos.shape[0]:
        raise ValueError(f"{pos_name} and {neg_name} must have the same number of rows, got {pos.shape[0]} and "
                         f"{neg.shape[0]}")
    return _mask(pos_mask, pos, "pos_mask", pos_name), _mask(neg_mask, neg, "neg_mask", neg_name)


def _choice(value, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _labels(labels, name: str, n: int, n_name: str, like: Tensor) -> Tensor:
    _tensor(labels, name, 1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have one label per row of {n_name} ({n}), got {labels.shape[0]}")
    _same(labels, like, name, n_name, dtype=False)
    return labels


def _label_inputs(emb, labels, ref_emb, ref_labels) -> None:
    _float_tensor(emb, "emb", 2)
    _labels(labels, "labels", emb.shape[0], "emb", emb)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together (or both left None)")
    if ref_emb is not None:
        _float_tensor(ref_emb, "ref_emb", 2)
        _same(ref_emb, emb, "ref_emb", "emb")
        if ref_emb.shape[1] != emb.shape[1]:
            raise ValueError(f"ref_emb must have the feature size of emb ({emb.shape[1]}), got {ref_emb.shape[1]}")
        _labels(ref_labels, "ref_labels", ref_emb.shape[0], "ref_emb", ref_emb)


def _temperature(temperature, like: Tensor, like_name: str):
    """A positive finite float, or a 0-d float tensor on ``like``'s device (its value is not read: that
    would wait for the device; it is the caller's to keep positive, as CLIP's exp(logit_scale) is)."""
    if not isinstance(temperature, Tensor):
        return _real(temperature, "temperature", positive=True)
    if temperature.dim() != 0:
        raise ValueError(f"temperature must be a 0-d tensor (or a float), got shape {tuple(temperature.shape)}")
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
    _same(temperature, like, "temperature", like_name, dtype=False)
    return temperature


def _info_nce_args(temperature, like: Tensor, like_name: str, reduction: str, average: str) -> dict:
    return dict(temperature=_temperature(temperature, like, like_name),
                reduction=_choice(reduction, "reduction", reference.REDUCTIONS),
                average=_choice(average, "average", reference.AVERAGES))


def _self_offset(self_offset, emb: Tensor, ref_emb: Optional[Tensor]) -> Optional[int]:
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


def _oucl_params(form, beta, gamma_pos, gamma_neg, margin, lam, reduction) -> dict:
    """The validated keyword arguments of the backends' OUCL implementations."""
    params = LossParams(form, beta, gamma_pos, gamma_neg, margin, lam).kwargs()
    return dict(params, reduction=_choice(reduction, "reduction", reference.REDUCTIONS))


# -------------------------------------------------------------------------------------------- public
def oucl(
    pos: Tensor,
    neg: Tensor,
    *,
    form: str = DEFAULTS.form,
    beta: float = DEFAULTS.beta,
    gamma_pos: float = DEFAULTS.gamma_pos,
    gamma_neg: float = DEFAULTS.gamma_neg,
    margin: float = DEFAULTS.margin,
    lam: float = DEFAULTS.lam,
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """OUCL loss in score mode (docs/mathematics.md#oucl-forms).

    Args:
        pos: ``[B, K⁺]`` positive scores, float16/bfloat16/float32/float64.
        neg: ``[B, K⁻]`` negative scores, the same dtype and device.
        form: ``"hinge" | "squared" | "weighted" | "circle"``.
        beta: inverse temperature β > 0.
        gamma_pos: γ⁺ of the weighted form.
        gamma_neg: γ⁻ of the weighted form.
        margin: m of the circle and squared forms.
        lam: λ of the hinge form.
        pos_mask: optional bool ``[B, K⁺]``, True = the entry counts.
        neg_mask: optional bool ``[B, K⁻]``.
        reduction: ``"mean"`` over rows with a positive and a negative, ``"sum"``, or ``"none"`` (``[B]``).
        backend: ``"auto"``, ``"reference"`` or ``"cpp"`` (see :func:`metaug_fast.available_backends`).
    Returns:
        Scalar (or ``[B]`` for ``"none"``) in ``pos.dtype``; fp16/bf16 accumulate in fp32.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> pos, neg = torch.rand(8, 6), torch.rand(8, 60)
        >>> F.oucl(pos, neg).shape
        torch.Size([])
        >>> F.oucl(pos, neg, form="circle", beta=80.0, reduction="none").shape
        torch.Size([8])
    """
    pos_mask, neg_mask = _scores(pos, neg, pos_mask, neg_mask)
    params = _oucl_params(form, beta, gamma_pos, gamma_neg, margin, lam, reduction)
    fn = _backend.resolve("oucl", backend, pos.device, pos.dtype)
    return fn(pos, neg, pos_mask=pos_mask, neg_mask=neg_mask, **params)


def oucl_embeddings(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    similarity: str = "shifted_cosine",
    form: str = DEFAULTS.form,
    beta: float = DEFAULTS.beta,
    gamma_pos: float = DEFAULTS.gamma_pos,
    gamma_neg: float = DEFAULTS.gamma_neg,
    margin: float = DEFAULTS.margin,
    lam: float = DEFAULTS.lam,
    reduction: str = "mean",
    self_offset: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """OUCL loss in label mode (docs/mathematics.md#modes): pairs with equal labels are positives, others negatives.

    Args:
        emb: ``[B, D]`` embeddings (normalized inside, gradients include the normalization, except for the
            ``"dot"`` similarity).
        labels: ``[B]`` integer labels.
        ref_emb: optional reference set ``[M, D]`` (a memory bank or the other view); without it the
            reference is ``emb`` and the self-pair is excluded.
        ref_labels: ``[M]`` integer labels of the reference set.
        similarity: ``"shifted_cosine"`` ((1 + cos)/2), ``"cosine"``, or ``"dot"`` (⟨x, y⟩ of the rows as
            given). Other arguments as :func:`oucl`.
        self_offset: with a reference set, anchor i is reference row i + self_offset and that pair is
            neither positive nor negative (the reference set holds the anchors, e.g. a gathered batch).
    Returns:
        Scalar (or ``[B]``) in ``emb.dtype``.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> emb, labels = torch.randn(16, 32), torch.arange(8).repeat(2)   # two views of 8 samples
        >>> F.oucl_embeddings(emb, labels).shape
        torch.Size([])
        >>> bank, bank_labels = torch.randn(100, 32), torch.randint(0, 8, (100,))
        >>> F.oucl_embeddings(emb, labels, bank, bank_labels, reduction="none").shape
        torch.Size([16])
    """
    _label_inputs(emb, labels, ref_emb, ref_labels)
    self_offset = _self_offset(self_offset, emb, ref_emb)
    similarity = _choice(similarity, "similarity", reference.SIMILARITIES)
    params = _oucl_params(form, beta, gamma_pos, gamma_neg, margin, lam, reduction)
    fn = _backend.resolve("oucl_embeddings", backend, emb.device, emb.dtype)
    return fn(emb, labels, ref_emb, ref_labels, similarity=similarity, self_offset=self_offset, **params)


def pairwise_similarity(a: Tensor, b: Tensor, *, similarity: str = "shifted_cosine", backend: str = "auto") -> Tensor:
    """d(a_i, b_j) for ``a [B,D]``, ``b [M,D]`` -> ``[B,M]`` in ``a.dtype``; rows are L2-normalized first
    (except for ``"dot"``).

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> F.pairwise_similarity(torch.randn(4, 8), torch.randn(5, 8)).shape
        torch.Size([4, 5])
    """
    _float_tensor(a, "a", 2)
    _float_tensor(b, "b", 2)
    _same(b, a, "b", "a")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b must have the feature size of a ({a.shape[1]}), got {b.shape[1]}")
    similarity = _choice(similarity, "similarity", reference.SIMILARITIES)
    return _backend.resolve("pairwise_similarity", backend, a.device, a.dtype)(a, b, similarity=similarity)


def margin_statistics(
    pos: Tensor,
    neg: Tensor,
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """``(sigma_pos [B], sigma_neg [B])`` (docs/mathematics.md#margins) from the original features' scores.

    σ⁺ = min(p_min, n_max), σ⁻ = max(p_min, n_max); a row without a positive or a negative gets
    (+inf, -inf), which constrains nothing in :func:`margin_injection_loss`.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> sigma_pos, sigma_neg = F.margin_statistics(torch.rand(8, 6), torch.rand(8, 60))
        >>> sigma_pos.shape, bool((sigma_pos <= sigma_neg).all())
        (torch.Size([8]), True)
    """
    pos_mask, neg_mask = _scores(pos, neg, pos_mask, neg_mask)
    return _backend.resolve("margin_statistics", backend, pos.device, pos.dtype)(pos, neg, pos_mask, neg_mask)


def margin_statistics_embeddings(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    similarity: str = "shifted_cosine",
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """:func:`margin_statistics` in label mode, the scores fused with the similarity (no B×M on ``cpp``).

    ``emb [B, D]``, integer ``labels [B]`` and the optional reference set ``ref_emb [M, D]``, ``ref_labels [M]``
    as :func:`oucl_embeddings`; returns ``(sigma_pos [B], sigma_neg [B])`` in ``emb.dtype``.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> sigma_pos, sigma_neg = F.margin_statistics_embeddings(torch.randn(16, 32), torch.arange(8).repeat(2))
        >>> sigma_pos.shape
        torch.Size([16])
    """
    _label_inputs(emb, labels, ref_emb, ref_labels)
    similarity = _choice(similarity, "similarity", reference.SIMILARITIES)
    fn = _backend.resolve("margin_statistics_embeddings", backend, emb.device, emb.dtype)
    return fn(emb, labels, ref_emb, ref_labels, similarity=similarity)


def margin_injection_loss(
    pos_aug: Tensor,
    neg_aug: Tensor,
    sigma_pos: Tensor,
    sigma_neg: Tensor,
    *,
    detach_margin: bool = False,
    reduction: str = "mean",
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """R_σ (docs/mathematics.md#margins) on augmented scores ``pos_aug [B,K̂⁺]``, ``neg_aug [B,K̂⁻]``.

    ``sigma_pos``/``sigma_neg`` are ``[B]`` (from :func:`margin_statistics`); gradients flow into them
    unless ``detach_margin``. ``reduction`` is over all B rows.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> sigma_pos, sigma_neg = F.margin_statistics(torch.rand(8, 6), torch.rand(8, 60))
        >>> F.margin_injection_loss(torch.rand(8, 36), torch.rand(8, 360), sigma_pos, sigma_neg).shape
        torch.Size([])
    """
    pos_mask, neg_mask = _scores(pos_aug, neg_aug, pos_mask, neg_mask, "pos_aug", "neg_aug")
    for name, sigma in (("sigma_pos", sigma_pos), ("sigma_neg", sigma_neg)):
        _float_tensor(sigma, name, 1)
        _same(sigma, pos_aug, name, "pos_aug")
        if sigma.shape[0] != pos_aug.shape[0]:
            raise ValueError(f"{name} must have one value per row of pos_aug ({pos_aug.shape[0]}), got "
                             f"{sigma.shape[0]}")
    if not isinstance(detach_margin, bool):
        raise TypeError(f"detach_margin must be a bool, got {type(detach_margin).__name__}")
    reduction = _choice(reduction, "reduction", reference.REDUCTIONS)
    fn = _backend.resolve("margin_injection_loss", backend, pos_aug.device, pos_aug.dtype)
    return fn(
        pos_aug, neg_aug, sigma_pos, sigma_neg, detach_margin=detach_margin, reduction=reduction,
        pos_mask=pos_mask, neg_mask=neg_mask,
    )


def info_nce(
    pos: Tensor,
    neg: Tensor,
    *,
    temperature: Union[float, Tensor] = 0.07,
    pos_mask: Optional[Tensor] = None,
    neg_mask: Optional[Tensor] = None,
    reduction: str = "mean",
    average: str = "anchor",
    backend: str = "auto",
) -> Tensor:
    """InfoNCE in score mode (docs/mathematics.md#infonce): similarities ``pos [B,K⁺]``, ``neg [B,K⁻]``.

    The loss of a positive p of row i is -log(e^{p/τ} / (e^{p/τ} + Σ_n e^{n/τ})).

    Args:
        temperature: τ > 0, a float or a 0-d float tensor on the scores' device, which then gets its
            gradient (a learned temperature, CLIP's 1/logit_scale).
        average: ``"anchor"``: a row's loss is the mean over its positives and "mean" averages the valid
            rows; ``"pair"``: a row's loss is the sum over its positives and "mean" divides by the number of
            positive pairs (pytorch-metric-learning's NTXentLoss). The two agree with one positive per row.
        pos_mask: as :func:`oucl`.
        neg_mask: as :func:`oucl`.
        reduction: as :func:`oucl`.
        backend: as :func:`oucl`.
    Returns:
        Scalar (or ``[B]`` for ``"none"``) in ``pos.dtype``.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> F.info_nce(torch.rand(8, 1), torch.rand(8, 60), temperature=0.1).shape
        torch.Size([])
        >>> tau = torch.tensor(0.07, requires_grad=True)   # a learned temperature gets its gradient
        >>> F.info_nce(torch.rand(8, 1), torch.rand(8, 60), temperature=tau).backward()
        >>> tau.grad.shape
        torch.Size([])
    """
    pos_mask, neg_mask = _scores(pos, neg, pos_mask, neg_mask)
    args = _info_nce_args(temperature, pos, "pos", reduction, average)
    fn = _backend.resolve("info_nce", backend, pos.device, pos.dtype)
    return fn(pos, neg, pos_mask=pos_mask, neg_mask=neg_mask, **args)


def info_nce_embeddings(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.07,
    similarity: str = "cosine",
    reduction: str = "mean",
    average: str = "anchor",
    self_offset: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """InfoNCE in label mode: pairs with equal labels are positives, the others negatives. For two views,
    ``emb = cat(z1, z2)`` and ``labels = arange(B)`` twice, it is SimCLR's NT-Xent (one positive per anchor,
    so both averages agree); with several positives per anchor, ``average="pair"`` is
    pytorch-metric-learning's NTXentLoss.

    Args:
        emb: ``[B, D]`` embeddings, as :func:`oucl_embeddings`.
        labels: ``[B]`` integer labels.
        ref_emb: optional reference set ``[M, D]``.
        ref_labels: ``[M]`` labels of the reference set.
        similarity: ``"cosine"``, ``"shifted_cosine"`` or ``"dot"`` (the inner product of the rows as given,
            CLIP's logits before the scale).
        temperature: as :func:`info_nce`.
        average: as :func:`info_nce`.
        reduction: as :func:`info_nce`.
        backend: as :func:`info_nce`.
        self_offset: as :func:`oucl_embeddings`.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> z1, z2 = torch.randn(8, 32), torch.randn(8, 32)
        >>> F.info_nce_embeddings(torch.cat([z1, z2]), torch.arange(8).repeat(2), temperature=0.1).shape
        torch.Size([])
    """
    _label_inputs(emb, labels, ref_emb, ref_labels)
    self_offset = _self_offset(self_offset, emb, ref_emb)
    args = _info_nce_args(temperature, emb, "emb", reduction, average)
    similarity = _choice(similarity, "similarity", reference.SIMILARITIES)
    fn = _backend.resolve("info_nce_embeddings", backend, emb.device, emb.dtype)
    return fn(emb, labels, ref_emb, ref_labels, similarity=similarity, self_offset=self_offset, **args)


def symmetric_info_nce(
    emb: Tensor,
    ref_emb: Tensor,
    labels: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.07,
    similarity: str = "cosine",
    reduction: str = "mean",
    average: str = "anchor",
    backend: str = "auto",
) -> Tensor:
    """InfoNCE both ways between two sets, CLIP's loss: the mean of :func:`info_nce_embeddings` of ``emb``
    against ``ref_emb`` and of ``ref_emb`` against ``emb``. Without labels, row i of ``emb`` and row i of
    ``ref_emb`` are a pair (``labels = arange``): with ``similarity="dot"`` and ``temperature =
    1/logit_scale`` this is open_clip's ``ClipLoss``. The C++ backend takes both directions in one sweep of
    the similarity tiles, each multiplied once (docs/design.md#cross-mode).

    Args:
        emb: ``[B, D]`` float embeddings (images).
        ref_emb: ``[M, D]`` embeddings of the other set (texts), ``emb``'s dtype and device.
        labels: ``[B]`` integer labels, or None for ``arange(B)``; pairs with equal labels across the two
            sets are positives.
        ref_labels: ``[M]`` labels of ``ref_emb``, given with ``labels`` (None for ``arange(M)``).
        temperature: as :func:`info_nce` (a float, or a 0-d tensor that gets its gradient).
        similarity: as :func:`info_nce_embeddings`.
        reduction: ``"mean"`` or ``"sum"``, applied to each direction before their mean.
        average: as :func:`info_nce`.
        backend: as :func:`info_nce`.

    Example:
        >>> import torch, metaug_fast.functional as F
        >>> image, text = torch.randn(8, 32), torch.randn(8, 32)
        >>> F.symmetric_info_nce(image, text, temperature=0.07, similarity="dot").shape
        torch.Size([])
    """
    _float_tensor(emb, "emb", 2)
    _float_tensor(ref_emb, "ref_emb", 2)
    if (labels is None) != (ref_labels is None):
        raise ValueError("labels and ref_labels must be given together (or both left None: pairs i <-> i)")
    if labels is None:
        labels = torch.arange(emb.shape[0], device=emb.device)
        ref_labels = torch.arange(ref_emb.shape[0], device=emb.device)
    _label_inputs(emb, labels, ref_emb, ref_labels)
    args = _info_nce_args(temperature, emb, "emb", reduction, average)
    if args["reduction"] == "none":
        raise ValueError("reduction must be 'mean' or 'sum' (the two directions have B and M rows); for per-row "
                         "losses call info_nce_embeddings once per direction")
    similarity = _choice(similarity, "similarity", reference.SIMILARITIES)
    fn = _backend.resolve("symmetric_info_nce", backend, emb.device, emb.dtype)
    return fn(emb, ref_emb, labels, ref_labels, similarity=similarity, **args)
