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
