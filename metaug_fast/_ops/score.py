"""Score-mode OUCL on the fused backends: autograd Functions around the ``oucl_score_*`` ops, which
``ops`` provides: ``torch.ops.metaug_fast`` (the C++ kernels of csrc/cpu/score.cpp and, for CUDA tensors,
csrc/cuda/score.cu) or :data:`TRITON_OPS` (the Triton kernels of metaug_fast.kernels, same signatures and
stats).

The backward is itself an autograd Function whose backward runs the fused double-backward kernel, so
the MetAug meta step (a gradient of a gradient) stays on the fused path. A third derivative is not
provided: it raises instead of returning something wrong.

Saved tensors stay in the caller's layout; the ops make their own contiguous copies where needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..contract import Form, LossParams, Stat

CPP_OPS = torch.ops.metaug_fast


class _TritonOps:
    """``torch.ops.metaug_fast_triton``, the Triton kernels' ops under the C++ ops' names, once the kernel
    modules that register them are imported: on first use, because importing them needs Triton and
    TRITON_INTERPRET is read when they are defined."""

    @property
    def name(self) -> str:
        """The namespace's name, as ``torch.ops.metaug_fast.name`` is the C++ ops'."""
        from ..kernels import _common

        return _common.NAMESPACE

    def __getattr__(self, name):
        from ..kernels import label, label_hvp, margins, score  # noqa: F401  (importing registers the ops)

        return getattr(getattr(torch.ops, self.name), name)


TRITON_OPS = _TritonOps()


def _masked_sum(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype))).sum(1)


def hinge_grad_grad_rows(stats: Tensor, gg_pos: Tensor, gg_neg: Tensor, pos_mask: Optional[Tensor],
                         neg_mask: Optional[Tensor]) -> Tensor:
    """The hinge's double backward: its Hessian is zero, so only grad_rows gets a term, the ±1 sums of the
    cotangents on the active rows (no kernel needed)."""
    active = (stats[:, Stat.HINGE_ARG] > 0) & (stats[:, Stat.VALID] > 0)
    along = _masked_sum(gg_neg, neg_mask) - _masked_sum(gg_pos, pos_mask)
    return torch.where(active, along, torch.zeros_like(along))


def third_order_error(ops: str) -> RuntimeError:
    """What the backward of a fused second derivative raises: a third derivative is not provided."""
    return RuntimeError(f"metaug_fast: the fused backends of {ops} provide first and second derivatives only; "
                        "use backend='reference' for third-order derivatives")


class _OUCLScoreDoubleBackward(torch.autograd.Function):
    """The fused Hessian-vector product. It is a Function of its own, connected to pos and neg, so that a
    third derivative reaches its backward and raises (``once_differentiable`` would detach the result
    and let a third-order term through pos go silently missing)."""

    @staticmethod
    def forward(grad_rows, gg_pos, gg_neg, pos, neg, pos_mask, neg_mask, stats, params, ops):
        return ops.oucl_score_bwd_bwd(
            grad_rows, gg_pos.contiguous(), gg_neg.contiguous(), pos, neg, pos_mask, neg_mask, stats, *params
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise third_order_error("oucl and info_nce")


class _OUCLScoreBackward(torch.autograd.Function):
    """(grad_rows, pos, neg) -> (grad_pos, grad_neg); differentiable once more via the fused HVP kernel."""

    @staticmethod
    def forward(grad_rows, pos, neg, pos_mask, neg_mask, stats, params, ops):
        return ops.oucl_score_bwd(grad_rows, pos, neg, pos_mask, neg_mask, stats, *params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_rows, pos, neg, pos_mask, neg_mask, stats, params, ops = inputs
        ctx.save_for_backward(grad_rows, pos, neg, pos_mask, neg_mask, stats)
        ctx.params, ctx.ops = params, ops

    @staticmethod
    def backward(ctx, gg_pos, gg_neg):
        grad_rows, pos, neg, pos_mask, neg_mask, stats = ctx.saved_tensors
        if ctx.params[0] == Form.HINGE:
            # pos/neg get zeros (not None, so that, as through reference.py, they count as used in the graph).
            ggo = hinge_grad_grad_rows(stats, gg_pos, gg_neg, pos_mask, neg_mask)
            return ggo, torch.zeros_like(pos), torch.zeros_like(neg), None, None, None, None, None
        ggo, hv_pos, hv_neg = _OUCLScoreDoubleBackward.apply(
            grad_rows, gg_pos, gg_neg, pos, neg, pos_mask, neg_mask, stats, ctx.params, ctx.ops
        )
        return ggo, hv_pos, hv_neg, None, None, None, None, None


class _OUCLScore(torch.autograd.Function):
    """(pos [B,K⁺], neg [B,K⁻]) -> (per-row losses [B], stats [B,5]), both in the accumulation dtype.

    Written with ``setup_context`` so that torch.func transforms (``grad``, nested ``grad``) can use it."""

    @staticmethod
    def forward(pos, neg, pos_mask, neg_mask, params, ops):
        return ops.oucl_score_fwd(pos, neg, pos_mask, neg_mask, *params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pos, neg, pos_mask, neg_mask, params, ops = inputs
        ctx.save_for_backward(pos, neg, pos_mask, neg_mask, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.params, ctx.ops = params, ops

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        pos, neg, pos_mask, neg_mask, stats = ctx.saved_tensors
        grad_pos, grad_neg = _OUCLScoreBackward.apply(
            grad_rows.contiguous(), pos, neg, pos_mask, neg_mask, stats, ctx.params, ctx.ops
        )
        return grad_pos, grad_neg, None, None, None, None


# A backend's score kernels can write the gradient in the forward's sweep (oucl_score_fwd_grad), per device
# type (LabelKernels.capabilities).
SCORE_FWD_GRAD = "score_fwd_grad"


def _plain_one(x: Tensor) -> bool:
    """``x`` is an ordinary tensor equal to 1 (``loss.backward()``'s seed), not one a torch.func transform
    wraps nor one torch.compile traces; reading it synchronizes, so only CPU tensors are read."""
    if torch.compiler.is_compiling():
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: True)(x)
    return not wrapped and x.device.type == "cpu" and x.numel() == 1 and bool(x == 1)


class _OUCLScoreWithGrad(torch.autograd.Function):
    """(pos [B,K⁺], neg [B,K⁻]) -> the reduced loss (``reduction`` "mean" over the valid rows, or "sum"), its
    gradient written by the forward in the same sweep over the scores (``oucl_score_fwd_grad`` with the
    reduction's row weights): the scores are read from memory once and the gradient written once. The
    backward returns that gradient as it is for ``loss.backward()``'s seed 1, scaled once for another; a
    backward with a graph (a second derivative) takes the differentiable route of :class:`_OUCLScore`."""

    @staticmethod
    def forward(pos, neg, pos_mask, neg_mask, params, ops, reduction):
        valid = reference.valid_rows(pos, neg, pos_mask, neg_mask)
        acc = torch.float64 if pos.dtype == torch.float64 else torch.float32
        weight = 1.0 / valid.sum().clamp(min=1).to(acc) if reduction == "mean" else torch.ones((), dtype=acc)
        grad_rows = weight.to(pos.device).expand(pos.shape[0]).contiguous()
        rows, stats, grad_pos, grad_neg = ops.oucl_score_fwd_grad(pos, neg, pos_mask, neg_mask, grad_rows, *params)
        return reference.reduce_rows(rows, valid, reduction, pos.dtype), stats, grad_rows, grad_pos, grad_neg

    @staticmethod
    def setup_context(ctx, inputs, output):
        pos, neg, pos_mask, neg_mask, params, ops, _ = inputs
        _, stats, grad_rows, grad_pos, grad_neg = output
        ctx.save_for_backward(pos, neg, pos_mask, neg_mask, stats, grad_rows, grad_pos, grad_neg)
        ctx.mark_non_differentiable(stats, grad_rows, grad_pos, grad_neg)
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs nothing differentiates
        ctx.params, ctx.ops = params, ops

    @staticmethod
    def backward(ctx, grad_loss, *_):
        pos, neg, pos_mask, neg_mask, stats, grad_rows, grad_pos, grad_neg = ctx.saved_tensors
        if torch.is_grad_enabled():
            rows = (grad_rows * grad_loss.to(grad_rows.dtype)).contiguous()
            gp, gn = _OUCLScoreBackward.apply(rows, pos, neg, pos_mask, neg_mask, stats, ctx.params, ctx.ops)
        elif _plain_one(grad_loss):
            gp, gn = grad_pos, grad_neg
        else:
            gp, gn = grad_pos * grad_loss.to(grad_pos.dtype), grad_neg * grad_loss.to(grad_neg.dtype)
        return gp, gn, None, None, None, None, None


def oucl_fused(
    pos: Tensor,
    neg: Tensor,
    *,
    form: str,
    beta: float,
    gamma_pos: float,
    gamma_neg: float,
    margin: float,
    lam: float,
    pos_mask: Optional[Tensor],
    neg_mask: Optional[Tensor],
    reduction: str,
    ops=CPP_OPS,
    kernels=None,
) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.oucl`, on the fused kernels of ``ops``. Where
    ``kernels`` (the backend's :class:`metaug_fast._ops.label.LabelKernels`) can write the gradient with the
    forward on the inputs' device and a mean or sum will need one, it does (:class:`_OUCLScoreWithGrad`)."""
    params = LossParams(form, beta, gamma_pos, gamma_neg, margin, lam).op_args()
    if (reduction != "none" and torch.is_grad_enabled() and (pos.requires_grad or neg.requires_grad)
            and kernels is not None and kernels.can(SCORE_FWD_GRAD, pos.device)):
        return _OUCLScoreWithGrad.apply(pos, neg, pos_mask, neg_mask, params, ops, reduction)[0]
    rows, _ = _OUCLScore.apply(pos, neg, pos_mask, neg_mask, params, ops)
    valid = reference.valid_rows(pos, neg, pos_mask, neg_mask)
    return reference.reduce_rows(rows, valid, reduction, pos.dtype)


def info_nce_fused(
    pos: Tensor,
    neg: Tensor,
    *,
    temperature,
    pos_mask: Optional[Tensor],
    neg_mask: Optional[Tensor],
    reduction: str,
    average: str = "anchor",
    ops=CPP_OPS,
) -> Tensor:
    """Same contract as :func:`metaug_fast.reference.info_nce`, on the fused kernels of ``ops``. A temperature
    tensor divides the scores in torch (so that it gets its gradient) and the kernels run at τ = 1."""
    if isinstance(temperature, Tensor):
        # Masked entries may hold inf or NaN: zeroed first, they give τ no 0·inf term.
        pos = reference.masked(pos, pos_mask, 0.0) / temperature
        neg = reference.masked(neg, neg_mask, 0.0) / temperature
        temperature = 1.0
    rows, _ = _OUCLScore.apply(pos, neg, pos_mask, neg_mask, LossParams.info_nce(temperature), ops)
    valid = reference.valid_rows(pos, neg, pos_mask, neg_mask)
    return reference.reduce_rows(rows, valid, reduction, pos.dtype, reference.pair_weights(average, pos, pos_mask))
