"""reference.py against values worked out independently: explicit pair sums, hand-computed cases,
pytorch-metric-learning, and autograd's numerical checks."""
import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from metaug_fast import reference as R

from helpers import FORMS, assert_equals_pml_ntxent, explicit_label_scores, explicit_rows, hvp, reduce_rows

f64 = torch.float64


def _scores(B, kp, kn, masked):
    pos = torch.rand(B, kp, dtype=f64)
    neg = torch.rand(B, kn, dtype=f64)
    if not masked:
        return pos, neg, None, None
    pm = torch.rand(B, kp) < 0.6
    nm = torch.rand(B, kn) < 0.6
    pm[0] = False  # a row without positives
    nm[1] = False  # a row without negatives
    pm[2], nm[2] = True, True
    return pos, neg, pm, nm


# --------------------------------------------------------------------------------------- hand-computed
def test_hand_computed_cases():
    one, zero = torch.ones(1, 1, dtype=f64), torch.zeros(1, 1, dtype=f64)
    # weighted, β = 1: log(1 + e^{0 - 1})
    assert R.oucl(one, zero, beta=1.0).item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-15)
    # default weighted, β = 16, p = n: log(2)/16
    assert R.oucl(one * 0.3, one * 0.3).item() == pytest.approx(math.log(2) / 16, abs=1e-15)
    # squared, β = 2, m = 0.25, p = 1, n = 0: (1/2) log(1 + e^{2·(0 + 0 - 0.125)})
    got = R.oucl(one, zero, form="squared", beta=2.0, margin=0.25).item()
    assert got == pytest.approx(0.5 * math.log1p(math.exp(-0.25)), abs=1e-15)
    # hinge: [0.75 - (0.5 + 0.25) + 0.1]_+ = 0.1
    p = torch.tensor([[0.5, 0.25]], dtype=f64)
    n = torch.tensor([[0.75]], dtype=f64)
    assert R.oucl(p, n, form="hinge", lam=0.1).item() == pytest.approx(0.1, abs=1e-15)
    assert R.oucl(p, n, form="hinge", lam=-0.1).item() == 0.0
    # circle, β = 4, m = 0.25, p = 0.5, n = 0.5: Γ⁺ = 0.75, Γ⁻ = 0.75,
    # exponent 4·(0.75·(0.5 - 0.25) - 0.75·(0.5 - 0.75)) = 1.5
    got = R.oucl(one * 0.5, one * 0.5, form="circle", beta=4.0).item()
    assert got == pytest.approx(math.log1p(math.exp(1.5)) / 4, abs=1e-15)
    # two positives, two negatives, weighted β = 1: log(1 + Σ e^{n - p}) over the 4 pairs
    p = torch.tensor([[0.9, 0.6]], dtype=f64)
    n = torch.tensor([[0.1, 0.4]], dtype=f64)
    want = math.log1p(sum(math.exp(b - a) for a in (0.9, 0.6) for b in (0.1, 0.4)))
    assert R.oucl(p, n, beta=1.0).item() == pytest.approx(want, abs=1e-15)


def test_info_nce_hand_computed():
    p = torch.tensor([[0.8]], dtype=f64)
    n = torch.tensor([[0.1, -0.2]], dtype=f64)
    t = 0.5
    want = -math.log(math.exp(0.8 / t) / (math.exp(0.8 / t) + math.exp(0.1 / t) + math.exp(-0.2 / t)))
    assert R.info_nce(p, n, temperature=t).item() == pytest.approx(want, abs=1e-14)


# ----------------------------------------------------------------------------------- explicit pair sums
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", [1.0, 16.0, 80.0])
def test_oucl_matches_explicit_pairs(form, masked, reduction, beta):
    pos, neg, pm, nm = _scores(6, 3, 5, masked)
    kw = dict(form=form, beta=beta, gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)
    rows = explicit_rows(pos, neg, pm, nm, **kw)
    valid = R.valid_rows(pos, neg, pm, nm)
    want = reduce_rows(rows, valid, reduction)
    got = R.oucl(pos, neg, pos_mask=pm, neg_mask=nm, reduction=reduction, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("beta", [128.0, 256.0])
def test_oucl_extreme_beta_is_finite_and_exact(beta):
    # Pair sums overflow a float64 exp near β·2 > 709; compare in log space instead.
    pos = torch.tensor([[0.0, 0.1]], dtype=f64)
    neg = torch.tensor([[1.0, 0.9, 0.5]], dtype=f64)
    got = R.oucl(pos, neg, beta=beta)
    exps = torch.tensor([beta * (n - p) for p in (0.0, 0.1) for n in (1.0, 0.9, 0.5)], dtype=f64)
    want = torch.logaddexp(torch.logsumexp(exps, 0), torch.zeros((), dtype=f64)) / beta
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine"])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_mode_matches_explicit(form, similarity, with_ref, reduction):
    emb = torch.randn(7, 4, dtype=f64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # class 3 has one member
    ref_emb = torch.randn(9, 4, dtype=f64) if with_ref else None
    ref_labels = torch.tensor([0, 0, 1, 2, 2, 4, 1, 0, 5]) if with_ref else None
    S, pm, nm = explicit_label_scores(emb, labels, ref_emb, ref_labels, similarity)
    kw = dict(form=form, beta=16.0, margin=0.25, lam=0.1)
    want = reduce_rows(explicit_rows(S, S, pm, nm, **kw), pm.any(1) & nm.any(1), reduction)
    got = R.oucl_embeddings(emb, labels, ref_emb, ref_labels, similarity=similarity, reduction=reduction, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_two_views_are_label_mode_on_the_concatenation():
    z1, z2 = torch.randn(5, 8, dtype=f64), torch.randn(5, 8, dtype=f64)
    emb, labels = torch.cat([z1, z2]), torch.arange(5).repeat(2)
    S, pm, nm = explicit_label_scores(emb, labels)
    assert pm.sum(1).eq(1).all() and nm.sum(1).eq(8).all()
    want = explicit_rows(S, S, pm, nm).mean()
    torch.testing.assert_close(R.oucl_embeddings(emb, labels), want, rtol=1e-12, atol=1e-13)


def test_pairwise_similarity_explicit():
    a, b = torch.randn(4, 3, dtype=f64), torch.randn(5, 3, dtype=f64)
    for sim in ("shifted_cosine", "cosine"):
        S, _, _ = explicit_label_scores(a, torch.arange(4), b, torch.arange(5), sim)
        torch.testing.assert_close(R.pairwise_similarity(a, b, similarity=sim), S, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_matches_explicit(masked, reduction):
    pos, neg, pm, nm = _scores(6, 3, 5, masked)
    t = 0.2
    rows = []
    for i in range(6):
        ps = [float(pos[i, k]) for k in range(3) if pm is None or pm[i, k]]
        ns = [float(neg[i, j]) for j in range(5) if nm is None or nm[i, j]]
        if not ps or not ns:
            rows.append(0.0)
            continue
        den_n = sum(math.exp(x / t) for x in ns)
        rows.append(sum(-math.log(math.exp(p / t) / (math.exp(p / t) + den_n)) for p in ps) / len(ps))
    want = reduce_rows(torch.tensor(rows, dtype=f64), R.valid_rows(pos, neg, pm, nm), reduction)
    got = R.info_nce(pos, neg, temperature=t, pos_mask=pm, neg_mask=nm, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("masked", [False, True])
def test_margin_statistics_explicit(masked):
    pos, neg, pm, nm = _scores(6, 3, 5, masked)
    sp, sn = R.margin_statistics(pos, neg, pm, nm)
    for i in range(6):
        ps = [float(pos[i, k]) for k in range(3) if pm is None or pm[i, k]]
        ns = [float(neg[i, j]) for j in range(5) if nm is None or nm[i, j]]
        if not ps or not ns:
            assert sp[i] == math.inf and sn[i] == -math.inf
        else:
            assert sp[i].item() == min(min(ps), max(ns)) and sn[i].item() == max(min(ps), max(ns))


def test_margin_statistics_gradient_reaches_the_arg_entries():
    pos = torch.tensor([[0.9, 0.3, 0.7]], dtype=f64, requires_grad=True)
    neg = torch.tensor([[0.1, 0.5, 0.2]], dtype=f64, requires_grad=True)
    sp, sn = R.margin_statistics(pos, neg)  # p_min = 0.3, n_max = 0.5: σ⁺ = 0.3, σ⁻ = 0.5
    (2 * sp + 3 * sn).sum().backward()
    torch.testing.assert_close(pos.grad, torch.tensor([[0.0, 2.0, 0.0]], dtype=f64))
    torch.testing.assert_close(neg.grad, torch.tensor([[0.0, 3.0, 0.0]], dtype=f64))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_margin_injection_explicit(reduction, masked):
    P, N, pm, nm = _scores(5, 3, 4, masked)
    sp, sn = torch.rand(5, dtype=f64), torch.rand(5, dtype=f64)
    sp[3], sn[3] = math.inf, -math.inf  # an unconstrained row
    rows = []
    for i in range(5):
        ps = [float(P[i, k]) for k in range(3) if pm is None or pm[i, k]]
        ns = [float(N[i, j]) for j in range(4) if nm is None or nm[i, j]]
        tp = sum(max(p - float(sp[i]), 0.0) for p in ps) / max(len(ps), 1)
        tn = sum(max(float(sn[i]) - n, 0.0) for n in ns) / max(len(ns), 1)
        rows.append(tp + tn)
    rows = torch.tensor(rows, dtype=f64)
    want = rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.mean()
    got = R.margin_injection_loss(P, N, sp, sn, reduction=reduction, pos_mask=pm, neg_mask=nm)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_margin_injection_detach_margin():
    P, N = torch.rand(4, 3, dtype=f64), torch.rand(4, 2, dtype=f64)
    sp = torch.full((4,), 0.2, dtype=f64, requires_grad=True)
    sn = torch.full((4,), 0.8, dtype=f64, requires_grad=True)
    R.margin_injection_loss(P, N, sp, sn).backward()
    assert sp.grad.abs().sum() > 0 and sn.grad.abs().sum() > 0
    sp.grad = sn.grad = None
    loss = R.margin_injection_loss(P, N, sp, sn, detach_margin=True)
    assert not loss.requires_grad


# ------------------------------------------------------------------------------------ rows and reductions
def test_invalid_rows_contribute_nothing():
    pos = torch.rand(3, 2, dtype=f64, requires_grad=True)
    neg = torch.rand(3, 4, dtype=f64, requires_grad=True)
    pm = torch.tensor([[True, True], [False, False], [True, False]])
    nm = torch.tensor([[True] * 4, [True] * 4, [False] * 4])
    for form in FORMS:
        rows = R.oucl(pos, neg, form=form, lam=1.0, pos_mask=pm, neg_mask=nm, reduction="none")
        assert rows[1] == 0 and rows[2] == 0 and rows[0] > 0
        mean = R.oucl(pos, neg, form=form, lam=1.0, pos_mask=pm, neg_mask=nm)
        torch.testing.assert_close(mean, rows[0])
        gp, gn = torch.autograd.grad(mean, (pos, neg))
        assert torch.isfinite(gp).all() and torch.isfinite(gn).all()
        assert gp[1:].abs().sum() == 0 and gn[1:].abs().sum() == 0


def test_no_valid_row_gives_zero():
    pos = torch.rand(2, 0, dtype=f64, requires_grad=True)
    neg = torch.rand(2, 3, dtype=f64, requires_grad=True)
    for form in FORMS:
        out = R.oucl(pos, neg, form=form)
        assert out.item() == 0.0
        out.backward()
    assert (neg.grad == 0).all()


def test_nan_propagates_and_masked_nan_is_ignored():
    pos = torch.rand(2, 3, dtype=f64)
    neg = torch.rand(2, 4, dtype=f64)
    pos[0, 1] = math.nan
    for form in FORMS:
        rows = R.oucl(pos, neg, form=form, reduction="none")
        assert torch.isnan(rows[0]) and torch.isfinite(rows[1])
        pm = torch.ones(2, 3, dtype=torch.bool)
        pm[0, 1] = False
        p = pos.clone().requires_grad_()
        rows = R.oucl(p, neg, form=form, pos_mask=pm, reduction="none")
        assert torch.isfinite(rows).all()
        rows.sum().backward()
        assert torch.isfinite(p.grad).all() and p.grad[0, 1] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_accumulates_in_fp32(dtype):
    pos, neg = torch.rand(8, 6), torch.rand(8, 3000)
    for form in FORMS:
        got = R.oucl(pos.to(dtype), neg.to(dtype), form=form, beta=64.0, reduction="none")
        assert got.dtype == dtype
        want = R.oucl(pos.to(dtype).double(), neg.to(dtype).double(), form=form, beta=64.0, reduction="none")
        # Only the final rounding to `dtype` remains: a half-precision accumulation over 3000 terms would not.
        torch.testing.assert_close(got.double(), want, rtol=2.0**-7 if dtype == torch.bfloat16 else 2e-3, atol=1e-6)


# ----------------------------------------------------------------------------- gradients, first and second
def _check(fn, *inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("form", ["hinge", "squared", "weighted"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_oucl_score(form, masked):
    pos, neg, pm, nm = _scores(4, 3, 5, masked)
    pos.requires_grad_(), neg.requires_grad_()
    _check(lambda p, n: R.oucl(p, n, form=form, beta=4.0, lam=0.5, pos_mask=pm, neg_mask=nm, reduction="none"), pos,
           neg)


@pytest.mark.parametrize("form", ["hinge", "squared", "weighted"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_gradcheck_oucl_label_mode(form, with_ref):
    emb = torch.randn(5, 3, dtype=f64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2])
    if with_ref:
        ref = torch.randn(4, 3, dtype=f64, requires_grad=True)
        ref_labels = torch.tensor([1, 0, 2, 3])
        _check(lambda e, r: R.oucl_embeddings(e, labels, r, ref_labels, form=form, beta=4.0, lam=1.0), emb, ref)
    else:
        _check(lambda e: R.oucl_embeddings(e, labels, form=form, beta=4.0, lam=1.0), emb)


def test_gradcheck_other_ops():
    pos, neg, pm, nm = _scores(4, 3, 5, True)
    pos.requires_grad_(), neg.requires_grad_()
    _check(lambda p, n: R.info_nce(p, n, temperature=0.5, pos_mask=pm, neg_mask=nm), pos, neg)
    _check(lambda p, n: torch.stack(R.margin_statistics(p, n, pm, nm)).clamp(-9, 9), pos, neg)
    sp = torch.rand(4, dtype=f64, requires_grad=True)
    sn = torch.rand(4, dtype=f64, requires_grad=True)
    _check(lambda p, n, a, b: R.margin_injection_loss(p, n, a, b), pos, neg, sp, sn)
    a = torch.randn(3, 4, dtype=f64, requires_grad=True)
    b = torch.randn(5, 4, dtype=f64, requires_grad=True)
    _check(lambda x, y: R.pairwise_similarity(x, y), a, b)
    emb = torch.randn(6, 3, dtype=f64, requires_grad=True)
    _check(lambda e: R.info_nce_embeddings(e, torch.arange(3).repeat(2), temperature=0.5), emb)


@pytest.mark.parametrize("masked", [False, True])
def test_circle_derivatives_hold_gamma_constant(masked):
    """Γ⁺, Γ⁻ are constants for differentiation: circle's gradient and Hessian are those of the
    weighted-form expression with Γ frozen at the evaluation point (which gradcheck verifies)."""
    pos, neg, pm, nm = _scores(4, 3, 5, masked)
    beta, m = 8.0, 0.25
    gp, gn = torch.relu(1 + m - pos), torch.relu(neg + m)
    pmask = torch.ones_like(pos, dtype=torch.bool) if pm is None else pm
    nmask = torch.ones_like(neg, dtype=torch.bool) if nm is None else nm
    valid = pmask.any(1) & nmask.any(1)

    def frozen(p, n):
        u = torch.where(pmask, -beta * gp * (p - (1 - m)), -math.inf)
        v = torch.where(nmask, beta * gn * (n - m), -math.inf)
        u, v = u[valid], v[valid]
        return torch.nn.functional.softplus(torch.logsumexp(u, 1) + torch.logsumexp(v, 1), threshold=100).sum() / beta

    p_, n_ = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    _check(frozen, p_, n_)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    want = hvp(frozen, (p_, n_), vecs)
    got = hvp(lambda p, n: R.oucl(p, n, form="circle", beta=beta, margin=m, pos_mask=pm, neg_mask=nm, reduction="sum"),
              (p_, n_), vecs)
    for g, w in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------- pytorch-metric-learning
def test_circle_cosine_equals_pml_circle_loss():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb = torch.randn(12, 6, dtype=f64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 0, 4])  # class 4 is a singleton
    for m, gamma in [(0.25, 80.0), (0.4, 16.0)]:
        e1 = emb.clone().requires_grad_()
        e2 = emb.clone().requires_grad_()
        want = pml.CircleLoss(m=m, gamma=gamma)(e1, labels)
        got = gamma * R.oucl_embeddings(e2, labels, form="circle", similarity="cosine", beta=gamma, margin=m)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        want.backward()
        got.backward()
        torch.testing.assert_close(e2.grad, e1.grad, rtol=1e-8, atol=1e-12)


def test_info_nce_two_views_equals_pml_ntxent():
    assert_equals_pml_ntxent(lambda e, lab: R.info_nce_embeddings(e, lab, temperature=0.1, similarity="cosine"), 8, 5,
                             1e-10, 1e-8)


def test_margin_statistics_embeddings_explicit():
    emb, ref = torch.randn(6, 3, dtype=f64), torch.randn(8, 3, dtype=f64)
    labels, ref_labels = torch.tensor([0, 1, 2, 0, 1, 7]), torch.tensor([0, 0, 1, 2, 2, 3, 1, 0])
    S, pm, nm = explicit_label_scores(emb, labels, ref, ref_labels)
    sp, sn = R.margin_statistics_embeddings(emb, labels, ref, ref_labels)
    for i in range(6):
        ps = [float(S[i, j]) for j in range(8) if pm[i, j]]
        ns = [float(S[i, j]) for j in range(8) if nm[i, j]]
        if not ps or not ns:
            assert sp[i] == math.inf and sn[i] == -math.inf
        else:
            assert sp[i].item() == pytest.approx(min(min(ps), max(ns)), abs=1e-14)
            assert sn[i].item() == pytest.approx(max(min(ps), max(ns)), abs=1e-14)
