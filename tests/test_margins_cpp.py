"""Score-mode margin statistics on the C++ backend against reference.py (values, tie-shared gradients,
second order), for every dtype, masks and empty sides."""

import pytest
import torch
from test_oucl_cpp import _inputs
from torch.autograd import gradcheck, gradgradcheck

import metaug_fast.functional as F

from conftest import requires_cpp

pytestmark = requires_cpp


def _run(backend, pos, neg, pm, nm):
    p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    sp, sn = F.margin_statistics(p, n, pm, nm, backend=backend)
    ok = torch.isfinite(sp)
    target = (1.5 * sp[ok]).sum() - (0.5 * sn[ok]).sum()
    grads = torch.autograd.grad(target, (p, n), allow_unused=True) if ok.any() else (None, None)
    return (sp, sn) + tuple(torch.zeros_like(x) if g is None else g for x, g in zip((p, n), grads))


def test_gradcheck_and_gradgradcheck():
    pos, neg, pm, nm = _inputs((4, 3, 6), "both")
    pos.requires_grad_(), neg.requires_grad_()
    fn = lambda p, n: torch.stack(F.margin_statistics(p, n, pm, nm, backend="cpp")).clamp(-9, 9)
    assert gradcheck(fn, (pos, neg)) and gradgradcheck(fn, (pos, neg))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_differentiable_gradient_path_matches_kernel(dtype):
    pos, neg, pm, nm = _inputs((9, 4, 30), "both", dtype)
    p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    sp, sn = F.margin_statistics(p, n, pm, nm, backend="cpp")
    ok = torch.isfinite(sp)
    target = (1.5 * sp[ok]).sum() - (0.5 * sn[ok]).sum()
    plain = torch.autograd.grad(target, (p, n), retain_graph=True)
    graph = torch.autograd.grad(target, (p, n), create_graph=True)
    for a, b in zip(plain, graph):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
