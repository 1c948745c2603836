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


# ------------------------------------------------------------------------------------------ label mode
def _label_run(backend, emb, labels, ref, ref_labels, **kw):
    e = emb.clone().requires_grad_()
    r = None if ref is None else ref.clone().requires_grad_()
    loss = F.info_nce_embeddings(e, labels, r, ref_labels, reduction="none", backend=backend, **kw)
    return (loss,) + torch.autograd.grad(loss.sum(), [x for x in (e, r) if x is not None])


@pytest.mark.parametrize("shape", [(1, 1), (9, None), (300, 530), (3, 1100)])
@pytest.mark.parametrize("similarity", ["cosine", "shifted_cosine"])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_label_mode_fp64_matches_reference(shape, similarity, temperature):
    B, M = shape
    emb, labels = torch.randn(B, 6, dtype=torch.float64), torch.randint(0, 4, (B,))
    ref = None if M is None else torch.randn(M, 6, dtype=torch.float64)
    ref_labels = None if M is None else torch.randint(0, 5, (M,))
    kw = dict(similarity=similarity, temperature=temperature)
    for g, w in zip(_label_run("cpp", emb, labels, ref, ref_labels, **kw),
                    _label_run("reference", emb, labels, ref, ref_labels, **kw)):
        assert rel_err(g, w) <= 1e-10


def test_label_mode_fp32_and_second_order():
    emb, labels = torch.randn(70, 16), torch.randint(0, 6, (70,))
    got = _label_run("cpp", emb, labels, None, None, temperature=0.1)
    want = _label_run("reference", emb.double(), labels, None, None, temperature=0.1)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and rel_err(g, w) <= 1e-4
    e = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 1, 0, 1, 2, 2])
    fn = lambda x: F.info_nce_embeddings(x, lab, temperature=0.5, reduction="none", backend="cpp")  # noqa: E731
    assert gradcheck(fn, (e,)) and gradgradcheck(fn, (e,))


def test_label_mode_two_views_equals_pml_ntxent_at_512():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb = torch.randn(512, 16, dtype=torch.float64)
    labels = torch.arange(256).repeat(2)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    want = pml.NTXentLoss(temperature=0.1)(e1, labels)
    got = F.info_nce_embeddings(e2, labels, temperature=0.1, backend="cpp")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    want.backward()
    got.backward()
    torch.testing.assert_close(e2.grad, e1.grad, rtol=1e-8, atol=1e-13)
