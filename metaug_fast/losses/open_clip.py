"""Drop-in for ``open_clip.loss.ClipLoss``: change the import line, keep the code.

>>> from metaug_fast.losses.open_clip import ClipLoss          # was: from open_clip.loss import ClipLoss
>>> loss = ClipLoss()(image_features, text_features, model.logit_scale.exp())

The loss is the symmetric cross-entropy of ``logit_scale · image_features @ text_features.T`` with the
matching pairs on the diagonal: InfoNCE both ways with the ``"dot"`` similarity (the features as given:
open_clip does not normalize them here either), pairs i ↔ i, with the features multiplied by ``logit_scale``
as open_clip multiplies them (temperature 1: one process scales the image features and one sweep of the
similarity tiles feeds both directions on the C++ backend; several scale each direction's anchors), so a
zero or negative scale gives open_clip's values too. ``logit_scale`` may be a float, a 0-d tensor or a
tensor of shape ``[1]`` (as checkpoints hold it) and gets its gradient. The B×B logits are never formed
(``get_logits`` forms them, as open_clip's does).

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
    Forward: ``image_features [B, D]``, ``text_features [B, D]`` (one float dtype), ``logit_scale`` a float,
    a 0-d tensor or a tensor of shape ``[1]`` (the learned ``exp(logit_scale)``, any sign), optional
    ``logit_bias``; returns a scalar in the features' dtype, or ``{"contrastive_loss": loss}`` with
    ``output_dict=True``.

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

    def get_ground_truth(self, device, num_logits: int) -> Tensor:
        """open_clip's: the matching column of each row of the logits, ``arange(num_logits)`` (offset by this
        rank's rows with ``local_loss`` over several processes)."""
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        return labels

    def get_logits(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                   logit_bias: Optional[Tensor] = None):
        """open_clip's: ``(logits_per_image, logits_per_text)`` ``[B, B]``, formed (the loss never forms them).
        One process only: over several, use open_clip's own, whose gather this class does not reproduce."""
        if self.world_size > 1:
            raise ValueError(f"ClipLoss.get_logits: world_size={self.world_size} is not supported (one process "
                             "only); open_clip.loss.ClipLoss(...).get_logits gathers the features")
        scale = _scale(logit_scale)
        logits_per_image = scale * image_features @ text_features.T
        logits_per_text = scale * text_features @ image_features.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def _direction(self, anchors: Tensor, references: Tensor, offset: int, scale, reduction: str) -> Tensor:
        """InfoNCE of ``anchors [b, D]`` (global rows offset .. offset + b) against ``references [N, D]``, the
        anchors multiplied by ``scale`` first, as open_clip's logits are ``logit_scale * anchors @ refs.T``."""
        b, n = anchors.shape[0], references.shape[0]
        labels = torch.arange(offset, offset + b, device=anchors.device)
        return F.info_nce_embeddings(scale * anchors, labels, references, torch.arange(n, device=anchors.device),
                                     temperature=1.0, similarity="dot", reduction=reduction, backend=self.backend)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                logit_bias: Optional[Tensor] = None, output_dict: bool = False):
        V.check_float_tensor(image_features, "image_features", 2)
        V.check_float_tensor(text_features, "text_features", 2)
        V.check_same(text_features, image_features, "text_features", "image_features")
        if text_features.shape != image_features.shape:
            raise ValueError(f"text_features must have the shape of image_features {tuple(image_features.shape)}, "
                             f"got {tuple(text_features.shape)}")
        scale = _scale(logit_scale)
        if self.world_size > 1:
            loss = self._distributed(image_features, text_features, scale)
        else:
            # Both directions from one matrix of logits (s·image)·textᵀ: on the C++ backend one sweep of the
            # similarity tiles feeds both.
            loss = F.symmetric_info_nce(scale * image_features, text_features, temperature=1.0, similarity="dot",
                                        backend=self.backend)
        if image_features.shape[0] == 0:  # open_clip's cross-entropy means over no rows: NaN
            loss = loss + float("nan")
        if logit_bias is not None:
            loss = loss + (logit_bias * 0).sum().to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image: Tensor, text: Tensor, scale) -> Tensor:
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
        if isinstance(scale, Tensor) and not self.local_loss:
            scale = all_reduce_grad(scale)  # each rank holds a share of the global loss
        reduction = "mean" if self.local_loss else "sum"
        loss = (self._direction(image, all_text, offset, scale, reduction)
                + self._direction(text, all_image, offset, scale, reduction)) / 2
        if self.local_loss:
            return loss
        share = loss / total
        value = share.detach().clone()
        dist.all_reduce(value)
        return share + (value - share).detach()


def _scale(logit_scale) -> Union[float, Tensor]:
    """``logit_scale`` as a float or a 0-d tensor (a one-element ``[1]`` tensor, as checkpoints hold it, is
    reshaped, keeping its gradient); any other shape is refused by its name."""
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1 or logit_scale.dim() > 1:
            raise ValueError(f"logit_scale must be a float, a 0-d tensor or a tensor of shape [1], got shape "
                             f"{tuple(logit_scale.shape)}")
        return logit_scale.reshape(())
    return V.check_real(logit_scale, "logit_scale")
