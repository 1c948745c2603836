"""What is specific to the C++ backend's score-mode OUCL (the shared grid of values, gradients and HVPs is
the contract suite, test_contract.py): gradcheck/gradgradcheck in float64, infinite scores, results
independent of the thread count, and the op's own checks of its saved statistics."""
import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import metaug_fast.functional as F
from metaug_fast import reference as R

from conftest import requires_cpp
from helpers import FORMS, hvp

pytestmark = requires_cpp

PARAMS = dict(gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)


def _inputs(shape, masks, dtype=torch.float64):
    B, kp, kn = shape
    pos = torch.rand(B, kp, dtype=torch.float64).to(dtype)
    neg = torch.rand(B, kn, dtype=torch.float64).to(dtype)
    pm = nm = None
    if masks in ("pos", "both"):
        pm = torch.rand(B, kp) < 0.7
        pm[0] = False  # a fully masked row
        if B > 1:
            pm[-1] = True
    if masks == "both":
        nm = torch.rand(B, kn) < 0.7
        if B > 2:
            nm[1] = False
        nm[-1, 0] = True
    return pos, neg, pm, nm


def _both(pos, neg, pm, nm, vecs, reduction="sum", **kw):
    """(loss, grads, hvp) for reference and cpp on the same inputs."""
    out = []
    for backend in ("reference", "cpp"):
        p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        fn = lambda p, n: F.oucl(p, n, pos_mask=pm, neg_mask=nm, reduction=reduction, backend=backend, **kw)
        out.append(hvp(fn, (p, n), vecs))
    return out


def _flat(result):
    loss, grads, hv = result
    return (loss,) + grads + hv


def _loss_and_grads(backend, pos, neg, pm, nm, reduction="none", **kw):
    p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    loss = F.oucl(p, n, pos_mask=pm, neg_mask=nm, reduction=reduction, backend=backend, **kw)
    return (loss,) + torch.autograd.grad(1.5 * loss.sum(), (p, n))


@pytest.mark.parametrize("form", ["hinge", "squared", "weighted"])
@pytest.mark.parametrize("masks", ["none", "both"])
def test_gradcheck_and_gradgradcheck(form, masks):
    # Circle's Γ are constants for differentiation, so finite differences do not apply to it; its first
    # and second derivatives are checked against reference.py above and against a frozen-Γ oracle in
    # test_reference.py.
    pos, neg, pm, nm = _inputs((4, 3, 9), masks)
    pos.requires_grad_(), neg.requires_grad_()
    def fn(p, n):
        return F.oucl(p, n, form=form, beta=4.0, pos_mask=pm, neg_mask=nm, reduction="none", backend="cpp", **PARAMS)

    assert gradcheck(fn, (pos, neg), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(fn, (pos, neg), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_infinite_scores_follow_reference():
    pos, neg, _, _ = _inputs((2, 3, 5), "none")
    neg[0, 2] = math.inf
    for form in ("squared", "weighted"):
        want = R.oucl(pos, neg, form=form, reduction="none")
        got = F.oucl(pos, neg, form=form, reduction="none", backend="cpp")
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("form", FORMS)
def test_thread_count_independent(form):
    pos, neg, pm, nm = _inputs((64, 6, 700), "both", torch.float32)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(_flat(_both(pos, neg, pm, nm, vecs, form=form)[1]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_op_checks_its_stats():
    pos, neg, _, _ = _inputs((3, 2, 5), "none")
    grad_rows = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="stats"):
        torch.ops.metaug_fast.oucl_score_bwd(grad_rows, pos, neg, None, None, torch.zeros(3, 2, dtype=torch.float64),
                                             2, 16.0, 0.0, 0.0, 0.25, 0.0)


# ------------------------------------------------------------------------- the gradient with the forward
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", list(FORMS) + ["info_nce"])
def test_forward_with_gradient_is_the_forward_then_the_backward(form, dtype):
    # oucl_score_fwd_grad gives the two ops' results, masks, an invalid row and a NaN score included: the
    # forward's bitwise; the gradient bitwise where it runs the same row kernels block by block (hinge,
    # InfoNCE, bf16), to rounding where it reuses the forward's exponentials (exponential forms, fp32/fp64).
    from metaug_fast.contract import LossParams

    ops = torch.ops.metaug_fast
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(37, 5, generator=gen).to(dtype), torch.rand(37, 300, generator=gen).to(dtype)
    pm, nm = torch.rand(37, 5, generator=gen) > 0.3, torch.rand(37, 300, generator=gen) > 0.2
    pm[4] = False
    neg[7, 3], nm[7, 3] = float("nan"), True
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.rand(37, generator=gen, dtype=acc)
    params = LossParams.info_nce(0.1) if form == "info_nce" else LossParams(form, 16.0, 0.1, -0.05, 0.3, 0.2).op_args()
    rows, stats, gp, gn = ops.oucl_score_fwd_grad(pos, neg, pm, nm, g, *params)
    want_rows, want_stats = ops.oucl_score_fwd(pos, neg, pm, nm, *params)
    want_gp, want_gn = ops.oucl_score_bwd(g, pos, neg, pm, nm, want_stats, *params)
    for got, want in ((rows, want_rows), (stats, want_stats)):
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    reused = form in ("squared", "weighted", "circle") and dtype != torch.bfloat16
    for got, want in ((gp, want_gp), (gn, want_gn)):
        assert torch.equal(got.isnan(), want.isnan())
        if reused:
            tol = 1e-13 if dtype == torch.float64 else 2e-6
            torch.testing.assert_close(got.nan_to_num(7.0), want.nan_to_num(7.0), rtol=tol, atol=tol * 1e-3)
        else:
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    assert rows[7].isnan() and not rows[8].isnan() and gp[4].abs().max() == 0


class _CountBig(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that write a tensor of at least ``size`` elements (views write nothing)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves(out)
        if not func.is_view and any(isinstance(t, torch.Tensor) and t.numel() >= self.size for t in leaves):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_reduced_loss_writes_its_gradient_in_the_forward(reduction):
    # With a gradient to come, the forward's sweep writes it: loss.backward() then runs no pass over [B, K⁻]
    # (the gradient is returned as written), another seed one scaling pass, and a second derivative the fused
    # HVP; every result equal to reference.py's.
    gen = torch.Generator().manual_seed(1)
    pos = torch.rand(33, 4, dtype=torch.float64, generator=gen)
    neg = torch.rand(33, 200, dtype=torch.float64, generator=gen)
    nm = torch.rand(33, 200, generator=gen) > 0.2
    vn = torch.randn(33, 200, dtype=torch.float64, generator=gen)
    kw = dict(form="squared", beta=8.0, reduction=reduction, neg_mask=nm)
    want = _derivs(lambda p, n: R.oucl(p, n, **kw), pos, neg, vn)
    got = _derivs(lambda p, n: F.oucl(p, n, backend="cpp", **kw), pos, neg, vn)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for seed, passes in ((1.0, 0), (3.0, 1)):
        p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        loss = F.oucl(p, n, backend="cpp", **kw) * seed
        with _CountBig(neg.numel()) as count:
            loss.backward()
        assert len(count.ops) == passes, count.ops
        torch.testing.assert_close(n.grad, seed * want[2], rtol=1e-12, atol=1e-14)


def _derivs(fn, pos, neg, vn):
    """(loss, ∂/∂pos, ∂/∂neg, H·(0, vn) on neg) with a graph for the second derivative."""
    p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    loss = fn(p, n)
    gp, gn = torch.autograd.grad(loss, (p, n), create_graph=True)
    (h,) = torch.autograd.grad((gn * vn).sum(), n)
    return loss.detach(), gp.detach(), gn.detach(), h
