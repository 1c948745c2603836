"""The C++ backend's score-mode OUCL against reference.py: values, gradients and Hessian-vector
products over forms, masks, β, odd shapes, dtypes and layouts; gradcheck/gradgradcheck in float64."""
import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import metaug_fast.functional as F
from metaug_fast import reference as R

from conftest import requires_cpp
from helpers import FORMS, ULP, hvp, rel_err

pytestmark = requires_cpp

# (B, K⁺, K⁻): single entries, K = 1, sizes that are not multiples of the 256-entry chunk or the SIMD width.
SHAPES = [(1, 1, 1), (5, 1, 7), (13, 6, 300), (9, 7, 1031)]
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
        fn = lambda p, n: F.oucl(p, n, pos_mask=pm, neg_mask=nm, reduction=reduction, backend=backend, **kw)  # noqa: E731
        out.append(hvp(fn, (p, n), vecs))
    return out


def _flat(result):
    loss, grads, hv = result
    return (loss,) + grads + hv


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("masks", ["none", "pos", "both"])
@pytest.mark.parametrize("beta", [1.0, 16.0, 80.0, 256.0])
def test_fp64_matches_reference(shape, form, masks, beta):
    pos, neg, pm, nm = _inputs(shape, masks)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    ref, cpp = _both(pos, neg, pm, nm, vecs, form=form, beta=beta, **PARAMS)
    for got, want in zip(_flat(cpp)[:3], _flat(ref)[:3]):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel_err(got, want) <= 1e-10
    # Hessian entries are O(β); where σ(A + C) saturates, the whole HVP is rounding noise on that scale
    # (reference.py itself is then off by 1e-6 relative from an exact mpmath value), so the absolute
    # floor is 1e-12·β·|t| rather than a fraction of the tiny result.
    floor = 1e-12 * beta * max(v.abs().max().item() for v in vecs)
    for got, want in zip(cpp[2], ref[2]):
        assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item() + floor


def _loss_and_grads(backend, pos, neg, pm, nm, reduction="none", **kw):
    p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    loss = F.oucl(p, n, pos_mask=pm, neg_mask=nm, reduction=reduction, backend=backend, **kw)
    return (loss,) + torch.autograd.grad(1.5 * loss.sum(), (p, n))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", FORMS)
def test_reductions(reduction, form):
    pos, neg, pm, nm = _inputs((11, 4, 37), "both")
    want = _loss_and_grads("reference", pos, neg, pm, nm, reduction, form=form, **PARAMS)
    got = _loss_and_grads("cpp", pos, neg, pm, nm, reduction, form=form, **PARAMS)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("shape", [(13, 6, 300), (9, 7, 1031)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [1.0, 16.0, 80.0, 256.0])
@pytest.mark.parametrize("masks", ["none", "both"])
def test_fp32_within_1e5_of_fp64(shape, form, beta, masks):
    pos, neg, pm, nm = _inputs(shape, masks, torch.float32)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    p32, n32 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    got = hvp(lambda p, n: F.oucl(p, n, form=form, beta=beta, pos_mask=pm, neg_mask=nm, reduction="none",
                                  backend="cpp", **PARAMS).sum(), (p32, n32), vecs)
    p64, n64 = pos.double().requires_grad_(), neg.double().requires_grad_()
    want = hvp(lambda p, n: R.oucl(p, n, form=form, beta=beta, pos_mask=pm, neg_mask=nm, reduction="none",
                                   **PARAMS).sum(), (p64, n64), tuple(v.double() for v in vecs))
    assert got[0].dtype == torch.float32
    names = ["loss", "grad_pos", "grad_neg"]
    for name, g, w in zip(names, _flat(got)[:3], _flat(want)[:3]):
        assert rel_err(g, w) <= 1e-5, f"{name}: {rel_err(g, w):.2e}"
    # The HVP multiplies by β once more (u' = ±β), so its error is the gradient's times up to β.
    for g, w in zip(got[2], want[2]):
        assert rel_err(g, w) <= 1e-5 * max(1.0, beta / 16), f"hvp: {rel_err(g, w):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [1.0, 16.0, 80.0])
def test_half_precision_within_twice_reference_error(dtype, form, beta):
    """DESIGN tolerance: the fused result's error against fp64 is at most twice reference.py's in that dtype."""
    pos, neg, pm, nm = _inputs((13, 6, 300), "both", dtype)
    kw = dict(form=form, beta=beta, **PARAMS)
    exact = _loss_and_grads("reference", pos.double(), neg.double(), pm, nm, **kw)
    ref = _loss_and_grads("reference", pos, neg, pm, nm, **kw)
    got = _loss_and_grads("cpp", pos, neg, pm, nm, **kw)
    assert all(t.dtype == dtype for t in got)
    for g, r, w in zip(got, ref, exact):
        assert rel_err(g, w) <= 2 * rel_err(r, w) + ULP[dtype], (rel_err(g, w), rel_err(r, w))


@pytest.mark.parametrize("form", ["hinge", "squared", "weighted"])
@pytest.mark.parametrize("masks", ["none", "both"])
def test_gradcheck_and_gradgradcheck(form, masks):
    # Circle's Γ are constants for differentiation, so finite differences do not apply to it; its first
    # and second derivatives are checked against reference.py above and against a frozen-Γ oracle in
    # test_reference.py.
    pos, neg, pm, nm = _inputs((4, 3, 9), masks)
    pos.requires_grad_(), neg.requires_grad_()
    fn = lambda p, n: F.oucl(p, n, form=form, beta=4.0, pos_mask=pm, neg_mask=nm, reduction="none", backend="cpp", **PARAMS)  # noqa: E731
    assert gradcheck(fn, (pos, neg), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(fn, (pos, neg), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_non_contiguous_inputs():
    base_p = torch.rand(20, 14, dtype=torch.float64)
    base_n = torch.rand(300, 10, dtype=torch.float64)
    pos, neg = base_p[::2, ::2], base_n.T  # strided rows and a transposed matrix
    pm = (torch.rand(20, 14) < 0.8)[::2, ::2]
    assert not pos.is_contiguous() and not neg.is_contiguous() and not pm.is_contiguous()
    vecs = (torch.randn(10, 7, dtype=torch.float64).T.contiguous().T, torch.randn(10, 300, dtype=torch.float64))
    for form in FORMS:
        ref, cpp = _both(pos, neg, pm, None, vecs, form=form, beta=16.0)
        for got, want in zip(_flat(cpp), _flat(ref)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_empty_sides_and_batches():
    for shape in [(3, 0, 5), (3, 4, 0), (0, 4, 5)]:
        pos, neg, _, _ = _inputs(shape, "none")
        pos.requires_grad_(), neg.requires_grad_()
        for form in FORMS:
            out = F.oucl(pos, neg, form=form, backend="cpp")
            assert out.item() == 0.0
            out.backward()
        assert (neg.grad == 0).all() and (pos.grad == 0).all()


def test_nan_propagates_and_masked_nan_is_ignored():
    pos, neg, _, _ = _inputs((3, 4, 300), "none")
    neg[1, 123] = math.nan
    nm = torch.ones_like(neg, dtype=torch.bool)
    for form in FORMS:
        rows = F.oucl(pos, neg, form=form, reduction="none", backend="cpp")
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
        assert torch.isnan(F.oucl(pos, neg, form=form, backend="cpp"))
        nm[1, 123] = False
        n = neg.clone().requires_grad_()
        rows = F.oucl(pos, n, form=form, neg_mask=nm, reduction="none", backend="cpp")
        assert torch.isfinite(rows).all()
        rows.sum().backward()
        assert torch.isfinite(n.grad).all() and n.grad[1, 123] == 0
        nm[1, 123] = True


def test_infinite_scores_follow_reference():
    pos, neg, _, _ = _inputs((2, 3, 5), "none")
    neg[0, 2] = math.inf
    for form in ("squared", "weighted"):
        want = R.oucl(pos, neg, form=form, reduction="none")
        got = F.oucl(pos, neg, form=form, reduction="none", backend="cpp")
        torch.testing.assert_close(got, want)


def test_third_derivative_raises():
    pos, neg, _, _ = _inputs((3, 2, 5), "none")
    pos.requires_grad_()
    loss = F.oucl(pos, neg, backend="cpp")
    (g,) = torch.autograd.grad(loss, pos, create_graph=True)
    (h,) = torch.autograd.grad((g * g).sum(), pos, create_graph=True)
    # Another path from pos must not let the third-order term go missing silently.
    with pytest.raises(RuntimeError, match="third-order"):
        torch.autograd.grad(h.sum() + (pos * pos).sum(), pos)


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


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_label_mode_on_cpp_matches_reference(form, with_ref):
    emb = torch.randn(10, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2, 1])
    ref = torch.randn(7, 5, dtype=torch.float64) if with_ref else None
    ref_labels = torch.tensor([0, 4, 1, 1, 2, 0, 5]) if with_ref else None
    out = []
    for backend in ("reference", "cpp"):
        e = emb.clone().requires_grad_()
        loss = F.oucl_embeddings(e, labels, ref, ref_labels, form=form, backend=backend, **PARAMS)
        (g,) = torch.autograd.grad(loss, e, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), e)
        out.append((loss, g, h))
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_op_checks_its_stats():
    pos, neg, _, _ = _inputs((3, 2, 5), "none")
    grad_rows = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="stats"):
        torch.ops.metaug_fast.oucl_score_bwd(grad_rows, pos, neg, None, None, torch.zeros(3, 2, dtype=torch.float64),
                                             2, 16.0, 0.0, 0.0, 0.25, 0.0)
