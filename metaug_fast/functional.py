"""Public functions of metaug_fast: validate the inputs, pick a backend, run it.

Every function has the meaning given in docs/mathematics.md#mathematics and the design in
docs/design.md#backends; the pure-PyTorch versions in :mod:`metaug_fast.reference` define the results. Bad input
raises a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device or value) naming the argument.

Shapes: score mode takes ``pos [B,K⁺]`` and ``neg [B,K⁻]`` (float16/bfloat16/float32/float64) with
optional bool masks of the same shapes; label mode takes ``emb [B,D]``, integer ``labels [B]`` and an
optional reference set ``ref_emb [M,D]``, ``ref_labels [M]``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _backend, backends, reference  # noqa: F401  (importing backends registers them)
from . import _validate as V
from .contract import LossParams

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
    pos_mask, neg_mask = V.check_scores(pos, neg, pos_mask, neg_mask)
    params = V.oucl_params(form, beta, gamma_pos, gamma_neg, margin, lam, reduction)
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
    V.check_label_inputs(emb, labels, ref_emb, ref_labels)
    self_offset = V.check_self_offset(self_offset, emb, ref_emb)
    similarity = V.check_choice(similarity, "similarity", reference.SIMILARITIES)
    params = V.oucl_params(form, beta, gamma_pos, gamma_neg, margin, lam, reduction)
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
    V.check_float_tensor(a, "a", 2)
    V.check_float_tensor(b, "b", 2)
    V.check_same(b, a, "b", "a")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b must have the feature size of a ({a.shape[1]}), got {b.shape[1]}")
    similarity = V.check_choice(similarity, "similarity", reference.SIMILARITIES)
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
    pos_mask, neg_mask = V.check_scores(pos, neg, pos_mask, neg_mask)
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
    V.check_label_inputs(emb, labels, ref_emb, ref_labels)
    similarity = V.check_choice(similarity, "similarity", reference.SIMILARITIES)
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
    pos_mask, neg_mask = V.check_scores(pos_aug, neg_aug, pos_mask, neg_mask, "pos_aug", "neg_aug")
    for name, sigma in (("sigma_pos", sigma_pos), ("sigma_neg", sigma_neg)):
        V.check_float_tensor(sigma, name, 1)
        V.check_same(sigma, pos_aug, name, "pos_aug")
        if sigma.shape[0] != pos_aug.shape[0]:
            raise ValueError(f"{name} must have one value per row of pos_aug ({pos_aug.shape[0]}), got "
                             f"{sigma.shape[0]}")
    if not isinstance(detach_margin, bool):
        raise TypeError(f"detach_margin must be a bool, got {type(detach_margin).__name__}")
    reduction = V.check_choice(reduction, "reduction", reference.REDUCTIONS)
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
            gradient (a learned temperature, CLIP's 1/logit_scale). A zero, negative or non-finite one raises
            a ValueError; a tensor's value is read only on the CPU (on an accelerator reading it would wait
            for the device: there such a tensor makes the loss NaN instead).
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
    pos_mask, neg_mask = V.check_scores(pos, neg, pos_mask, neg_mask)
    args = V.info_nce_args(temperature, pos, "pos", reduction, average)
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
    V.check_label_inputs(emb, labels, ref_emb, ref_labels)
    self_offset = V.check_self_offset(self_offset, emb, ref_emb)
    args = V.info_nce_args(temperature, emb, "emb", reduction, average)
    similarity = V.check_choice(similarity, "similarity", reference.SIMILARITIES)
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
    V.check_float_tensor(emb, "emb", 2)
    V.check_float_tensor(ref_emb, "ref_emb", 2)
    if (labels is None) != (ref_labels is None):
        raise ValueError("labels and ref_labels must be given together (or both left None: pairs i <-> i)")
    if labels is None:
        labels = torch.arange(emb.shape[0], device=emb.device)
        ref_labels = torch.arange(ref_emb.shape[0], device=emb.device)
    V.check_label_inputs(emb, labels, ref_emb, ref_labels)
    args = V.info_nce_args(temperature, emb, "emb", reduction, average)
    if args["reduction"] == "none":
        raise ValueError("reduction must be 'mean' or 'sum' (the two directions have B and M rows); for per-row "
                         "losses call info_nce_embeddings once per direction")
    similarity = V.check_choice(similarity, "similarity", reference.SIMILARITIES)
    fn = _backend.resolve("symmetric_info_nce", backend, emb.device, emb.dtype)
    return fn(emb, ref_emb, labels, ref_labels, similarity=similarity, **args)
