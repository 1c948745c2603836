"""Score-mode InfoNCE on the C++ backend against reference.py, to second order."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import metaug_fast.functional as F

from conftest import requires_cpp
from helpers import ULP, hvp, rel_err
from test_oucl_cpp import SHAPES, _inputs

pytestmark = requires_cpp


def _both(pos, neg, pm, nm, vecs, **kw):
    out = []
    for backend in ("reference", "cpp"):
        p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        fn = lambda p, n: F.info_nce(p, n, pos_mask=pm, neg_mask=nm, backend=backend, **kw).sum()  # noqa: E731
        loss, grads, hv = hvp(fn, (p, n), vecs)
        out.append((loss,) + grads + hv)
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masks", ["none", "pos", "both"])
@pytest.mark.parametrize("temperature", [0.05, 0.07, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp64_matches_reference(shape, masks, temperature, reduction):
    pos, neg, pm, nm = _inputs(shape, masks)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    ref, cpp = _both(pos, neg, pm, nm, vecs, temperature=temperature, reduction=reduction)
    for g, w in zip(cpp[:3], ref[:3]):
        assert rel_err(g, w) <= 1e-10
    floor = 1e-12 / temperature**2 * max(v.abs().max().item() for v in vecs)
    for g, w in zip(cpp[3:], ref[3:]):
        assert (g - w).abs().max().item() <= 1e-10 * w.abs().max().item() + floor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    pos, neg, pm, nm = _inputs((13, 6, 300), "both", dtype)
    results = {}
    for name, (p0, n0, backend) in {"exact": (pos.double(), neg.double(), "reference"), "ref": (pos, neg, "reference"),
                                    "cpp": (pos, neg, "cpp")}.items():
        p, n = p0.clone().requires_grad_(), n0.clone().requires_grad_()
        loss = F.info_nce(p, n, pos_mask=pm, neg_mask=nm, reduction="none", backend=backend)
        results[name] = (loss,) + torch.autograd.grad(loss.sum(), (p, n))
    for g, r, w in zip(results["cpp"], results["ref"], results["exact"]):
        assert g.dtype == dtype
        bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(r, w) + ULP[dtype]
        assert rel_err(g, w) <= bound


@pytest.mark.parametrize("masks", ["none", "both"])
def test_gradcheck_and_gradgradcheck(masks):
    pos, neg, pm, nm = _inputs((4, 3, 9), masks)
    pos.requires_grad_(), neg.requires_grad_()
    fn = lambda p, n: F.info_nce(p, n, temperature=0.3, pos_mask=pm, neg_mask=nm, reduction="none", backend="cpp")  # noqa: E731
    assert gradcheck(fn, (pos, neg), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(fn, (pos, neg), eps=1e-6, atol=1e-7, rtol=1e-5)
