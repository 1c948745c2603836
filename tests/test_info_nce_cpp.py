"""InfoNCE on the C++ backend beyond the contract suite: gradcheck/gradgradcheck, label-mode second order
and the equivalence with pytorch-metric-learning's NTXentLoss."""
import pytest
import torch
from test_oucl_cpp import _inputs
from torch.autograd import gradcheck, gradgradcheck

import metaug_fast.functional as F

from conftest import requires_cpp
from helpers import assert_equals_pml_ntxent, hvp, rel_err

pytestmark = requires_cpp


def _both(pos, neg, pm, nm, vecs, **kw):
    out = []
    for backend in ("reference", "cpp"):
        p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        fn = lambda p, n: F.info_nce(p, n, pos_mask=pm, neg_mask=nm, backend=backend, **kw).sum()
        loss, grads, hv = hvp(fn, (p, n), vecs)
        out.append((loss,) + grads + hv)
    return out


@pytest.mark.parametrize("masks", ["none", "both"])
def test_gradcheck_and_gradgradcheck(masks):
    pos, neg, pm, nm = _inputs((4, 3, 9), masks)
    pos.requires_grad_(), neg.requires_grad_()
    fn = lambda p, n: F.info_nce(p, n, temperature=0.3, pos_mask=pm, neg_mask=nm, reduction="none", backend="cpp")
    assert gradcheck(fn, (pos, neg), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(fn, (pos, neg), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------ label mode
def _label_run(backend, emb, labels, ref, ref_labels, **kw):
    e = emb.clone().requires_grad_()
    r = None if ref is None else ref.clone().requires_grad_()
    loss = F.info_nce_embeddings(e, labels, r, ref_labels, reduction="none", backend=backend, **kw)
    return (loss,) + torch.autograd.grad(loss.sum(), [x for x in (e, r) if x is not None])


def test_label_mode_fp32_and_second_order():
    emb, labels = torch.randn(70, 16), torch.randint(0, 6, (70,))
    got = _label_run("cpp", emb, labels, None, None, temperature=0.1)
    want = _label_run("reference", emb.double(), labels, None, None, temperature=0.1)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and rel_err(g, w) <= 1e-4
    e = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 1, 0, 1, 2, 2])
    fn = lambda x: F.info_nce_embeddings(x, lab, temperature=0.5, reduction="none", backend="cpp")
    assert gradcheck(fn, (e,)) and gradgradcheck(fn, (e,))


def test_label_mode_two_views_equals_pml_ntxent_at_512():
    assert_equals_pml_ntxent(lambda e, lab: F.info_nce_embeddings(e, lab, temperature=0.1, backend="cpp"), 256, 16,
                             1e-10, 1e-8)
