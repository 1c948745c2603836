"""Drop-in for ``open_clip.loss.ClipLoss``: change the import line, keep the code.

>>> from metaug_fast.losses.open_clip import ClipLoss          # was: from open_clip.loss import ClipLoss
>>> loss = ClipLoss()(image_features, text_features, model.logit_scale.exp())

The loss is the symmetric cross-entropy of ``logit_scale · image_features @ text_features.T`` with the
matching pairs on the diagonal: :func:`metaug_fast.functional.symmetric_info_nce` with the ``"dot"`` similarity
(the features as given: open_clip does not normalize them here either), pairs i ↔ i, the temperature
``1/logit_scale``: on the C++ backend one sweep of the similarity tiles feeds both directions.
``logit_scale`` may be a tensor and gets its gradient. The B×B logits are never formed.

Several processes (``world_size > 1``, torch.distributed initialized, any backend): each rank scores only its
own rows against the gathered features of every rank, where open_clip builds the global logits on every rank
when ``local_loss=False``. Values and gradients are open_clip's in all four settings:

- ``local_loss=True``: the loss of this rank's rows (mean over them, both directions);
- ``local_loss=False``: the global loss, on every rank;
- ``gather_with_grad=True``: gradients reach the features through the gather from every rank's loss (summed
  over ranks, as ``torch.distributed.nn.all_gather`` does);
- ``gather_with_grad=False``: the gathered features are constants (with ``local_loss=False`` open_clip puts
  this rank's own features, with their gradient, in their slot of the global logits: the gradient is the
  global loss's, which the gather's backward gives here).

An empty batch gives NaN, as open_clip's mean over no rows does. ``logit_bias`` adds the same constant to every
logit, which the cross-entropy cancels: accepted, with a zero gradient. ``use_horovod=True`` raises (use
torch.distributed).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _backend
from .. import _validate as V
from .. import functional as F
from ._common import all_reduce_grad, check_world, gather_rows, scale_grad, unsupported

__all__ = ["ClipLoss"]


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``, fused.

    Args:
        local_loss: open_clip's: each rank scores only its own rows against the gathered features.
        gather_with_grad: open_clip's: the gathered features carry gradients to their ranks.
        cache_labels: open_clip's (it only caches open_clip's label tensor: it changes nothing here).
        rank: this process's rank.
        world_size: the number of processes.
        use_horovod: must be False.
        backend: metaug_fast's backend choice.
    Forward: ``image_features [B, D]``, ``text_features [B, D]`` (one float dtype), ``logit_scale`` a float
    or 0-d tensor (the learned ``exp(logit_scale)``), optional ``logit_bias``; returns a scalar in the
    features' dtype, or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    Example:
        >>> import torch
        >>> from metaug_fast.losses.open_clip import ClipLoss
        >>> image = torch.nn.functional.normalize(torch.randn(8, 32), dim=1)
        >>> text = torch.nn.functional.normalize(torch.randn(8, 32), dim=1)
        >>> logit_scale = torch.tensor(100.0, requires_grad=True)
        >>> ClipLoss()(image, text, logit_scale).backward()
        >>> logit_scale.grad.shape
        torch.Size([])
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if use_horovod:
            raise unsupported("ClipLoss", "use_horovod", use_horovod, "run under torch.distributed")
        _backend.check_name(backend, "backend")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def _direction(self, anchors: Tensor, references: Tensor, offset: int, temperature, reduction: str) -> Tensor:
        """InfoNCE of ``anchors [b, D]`` (global rows offset .. offset + b) against ``references [N, D]``."""
        b, n = anchors.shape[0], references.shape[0]
        labels = torch.arange(offset, offset + b, device=anchors.device)
        return F.info_nce_embeddings(anchors, labels, references, torch.arange(n, device=anchors.device),
                                     temperature=temperature, similarity="dot", reduction=reduction,
                                     backend=self.backend)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                logit_bias: Optional[Tensor] = None, output_dict: bool = False):
        V.check_float_tensor(image_features, "image_features", 2)
        V.check_float_tensor(text_features, "text_features", 2)
        V.check_same(text_features, image_features, "text_features", "image_features")
        if text_features.shape != image_features.shape:
            raise ValueError(f"text_features must have the shape of image_features {tuple(image_features.shape)}, "
                             f"got {tuple(text_features.shape)}")
        temperature = 1.0 / logit_scale
        if self.world_size > 1:
            loss = self._distributed(image_features, text_features, temperature)
        else:
            loss = F.symmetric_info_nce(image_features, text_features, temperature=temperature, similarity="dot",
                                        backend=self.backend)
        if image_features.shape[0] == 0:  # open_clip's cross-entropy means over no rows: NaN
            loss = loss + float("nan")
        if logit_bias is not None:
            loss = loss + (logit_bias * 0).sum().to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image: Tensor, text: Tensor, temperature) -> Tensor:
        check_world("ClipLoss", self.rank, self.world_size)
        # The global loss's gradient reaches this rank's features from every rank's rows only if the gather's
        # backward sums over ranks: always so for the global loss, which open_clip computes whole on every
        # rank, its own features in their slot of the global logits whatever gather_with_grad says.
        with_grad = self.gather_with_grad or not self.local_loss
        if self.gather_with_grad and not self.local_loss:
            # open_clip's gather_with_grad sums over ranks the gradients of a loss every rank computes whole:
            # the features get world_size times the global loss's gradient (logit_scale does not).
            image, text = scale_grad(image, float(self.world_size)), scale_grad(text, float(self.world_size))
        all_image, sizes = gather_rows(image, with_grad)
        all_text, _ = gather_rows(text, with_grad)
        offset, total = sum(sizes[:self.rank]), sum(sizes)
        if isinstance(temperature, Tensor) and not self.local_loss:
            temperature = all_reduce_grad(temperature)  # each rank holds a share of the global loss
        reduction = "mean" if self.local_loss else "sum"
        loss = (self._direction(image, all_text, offset, temperature, reduction)
                + self._direction(text, all_image, offset, temperature, reduction)) / 2
        if self.local_loss:
            return loss
        share = loss / total
        value = share.detach().clone()
        dist.all_reduce(value)
        return share + (value - share).detach()
