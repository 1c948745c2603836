"""``OUCLLoss``: the OUCL loss as an ``nn.Module``, in the style of pytorch-metric-learning's losses."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import _backend, reference
from . import _validate as V
from . import functional as F
from .contract import LossParams

DEFAULTS = LossParams()


class OUCLLoss(nn.Module):
    """Optimization-driven unified contrastive loss (docs/mathematics.md#oucl-forms).

    Example:
        >>> import torch
        >>> from metaug_fast import OUCLLoss
        >>> loss_fn = OUCLLoss(form="circle", beta=80.0, margin=0.25, similarity="cosine")
        >>> pos, neg = torch.rand(8, 6), torch.rand(8, 60)     # score mode: pos [B,K⁺], neg [B,K⁻]
        >>> loss_fn(pos, neg).shape
        torch.Size([])
        >>> emb, labels = torch.randn(16, 32), torch.arange(8).repeat(2)   # label mode: emb [B,D], labels [B]
        >>> loss_fn.embeddings(emb, labels).shape
        torch.Size([])

    Args:
        form: the loss form, as :func:`metaug_fast.functional.oucl` (default: the weighted form,
            ℓ = (1/β)·log(1 + ΣΣ e^{β(n−p)}) with γ = 0, β = 16).
        beta: β > 0.
        gamma_pos: γ⁺ of the weighted form.
        gamma_neg: γ⁻ of the weighted form.
        margin: m of the circle and squared forms.
        lam: λ of the hinge form.
        similarity: used by :meth:`embeddings`: ``"shifted_cosine"`` ((1 + cos)/2) or ``"cosine"``.
        reduction: ``"mean"`` (over rows with a positive and a negative), ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"cuda"``.
        distributed: ``None``, ``"all_gather"`` or ``"ring"``: :meth:`embeddings` then scores this rank's rows
            against the batch of every rank of ``process_group`` (see :mod:`metaug_fast.distributed`), and
            score mode averages (or sums) over the rows of every rank.

    Every argument is checked here, so a bad configuration fails at construction.
    """

    def __init__(
        self,
        form: str = DEFAULTS.form,
        beta: float = DEFAULTS.beta,
        gamma_pos: float = DEFAULTS.gamma_pos,
        gamma_neg: float = DEFAULTS.gamma_neg,
        margin: float = DEFAULTS.margin,
        lam: float = DEFAULTS.lam,
        similarity: str = "shifted_cosine",
        reduction: str = "mean",
        backend: str = "auto",
        distributed: Optional[str] = None,
        process_group=None,
    ) -> None:
        super().__init__()
        self.params = V.oucl_params(form, beta, gamma_pos, gamma_neg, margin, lam, reduction)
        self.similarity = V.check_choice(similarity, "similarity", reference.SIMILARITIES)
        _backend.check_name(backend, "backend")
        self.backend = backend
        if distributed is not None:
            V.check_choice(distributed, "distributed", ("all_gather", "ring"))
            if reduction == "none":
                raise ValueError("reduction='none' has no distributed meaning: use 'mean' or 'sum' with distributed")
        self.distributed, self.process_group = distributed, process_group

    def forward(self, pos: Tensor, neg: Tensor, pos_mask: Optional[Tensor] = None,
                neg_mask: Optional[Tensor] = None) -> Tensor:
        """Score mode: ``pos [B,K⁺]``, ``neg [B,K⁻]``, optional bool masks of the same shapes. With
        ``distributed`` set, the reduction spans every rank (:func:`metaug_fast.distributed.oucl_global`)."""
        if self.distributed is not None:
            from . import distributed as D

            return D.oucl_global(pos, neg, pos_mask=pos_mask, neg_mask=neg_mask, group=self.process_group,
                                 backend=self.backend, **self.params)
        return F.oucl(pos, neg, pos_mask=pos_mask, neg_mask=neg_mask, backend=self.backend, **self.params)

    def embeddings(self, emb: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                   ref_labels: Optional[Tensor] = None) -> Tensor:
        """Label mode: ``emb [B,D]``, ``labels [B]``, optional ``ref_emb [M,D]``, ``ref_labels [M]``."""
        if self.distributed is not None:
            if ref_emb is not None or ref_labels is not None:
                raise ValueError("ref_emb/ref_labels cannot be combined with distributed: the reference set is "
                                 "the batch of all ranks")
            from . import distributed as D

            params = {k: v for k, v in self.params.items() if k != "reduction"}
            if self.distributed == "ring":
                return D.oucl_embeddings_ring(emb, labels, group=self.process_group, reduction=self.params["reduction"],
                                              similarity=self.similarity, backend=self.backend, **params)
            return D.oucl_embeddings_all_gather(emb, labels, group=self.process_group,
                                                reduction=self.params["reduction"], backend=self.backend,
                                                similarity=self.similarity, **params)
        return F.oucl_embeddings(emb, labels, ref_emb, ref_labels, similarity=self.similarity,
                                 backend=self.backend, **self.params)

    def extra_repr(self) -> str:
        items = dict(self.params, similarity=self.similarity, backend=self.backend)
        if self.distributed:
            items["distributed"] = self.distributed
        return ", ".join(f"{k}={v!r}" for k, v in items.items())
