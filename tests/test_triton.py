"""The Triton backend against reference.py, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1,
set in conftest.py): every op's values, gradients and Hessian-vector products; shapes that are not block
multiples, B or M = 1, singleton classes, fully masked rows, β from 1 to 256, fp32 and fp16, non-contiguous
inputs; and label mode allocates nothing of B×M. Shapes are small: the interpreter runs kernels in NumPy."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import metaug_fast
import metaug_fast.functional as F
from metaug_fast import reference as R

from helpers import FORMS, ULP, LargestAllocation, hvp, label_data, rel_err, score_data, score_hvp_run

pytestmark = pytest.mark.skipif("triton" not in metaug_fast.available_backends(),
                                reason="Triton not importable (or no CUDA and TRITON_INTERPRET unset)")
PARAMS = dict(gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)


def _close(got, want, tol):
    """Relative to each output's largest entry; Hessian-vector products (the outputs after the loss and
    the gradients) may vanish by cancellation, so they also get an absolute floor of tol/100."""
    n_hv = (len(want) - 1) // 2
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = w.abs().max().item() if w.numel() else 0.0
        if i >= len(want) - n_hv:
            scale = max(scale, 1e-2)
        assert (g - w).abs().max().item() <= tol * scale if w.numel() else True, rel_err(g, w)


# ------------------------------------------------------------------------------------------- score mode
def _score_fn(form, backend, pm, nm, beta=16.0, reduction="none"):
    if form == "info_nce":
        return lambda p, n: F.info_nce(p, n, temperature=1.0 / beta, pos_mask=pm, neg_mask=nm, reduction=reduction,
                                       backend=backend)
    if form == "margins":
        return lambda p, n: sum(s.clamp(-10, 10).square().sum()
                                for s in F.margin_statistics(p, n, pm, nm, backend=backend))
    return lambda p, n: F.oucl(p, n, form=form, beta=beta, pos_mask=pm, neg_mask=nm, reduction=reduction,
                               backend=backend, **PARAMS)


@pytest.mark.parametrize("form", FORMS + ("info_nce", "margins"))
@pytest.mark.parametrize("shape", [(1, 1, 1), (19, 3, 40), (5, 1, 300)])
@pytest.mark.parametrize("masked", [False, True])
def test_score_mode_fp64_values_gradients_hvp(form, shape, masked):
    pos, neg, pm, nm = score_data(*shape, masked=masked)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    want = score_hvp_run(_score_fn(form, "reference", pm, nm), pos, neg, vecs)
    got = score_hvp_run(_score_fn(form, "triton", pm, nm), pos, neg, vecs)
    _close(got, want, 1e-10)


@pytest.mark.parametrize("beta", [1.0, 80.0, 256.0])
@pytest.mark.parametrize("form", FORMS + ("info_nce",))
def test_score_mode_extreme_beta_and_reductions(beta, form):
    pos, neg, pm, nm = score_data(11, 4, 37)
    for reduction in ("mean", "sum"):
        vecs = (torch.randn_like(pos), torch.randn_like(neg))
        want = score_hvp_run(_score_fn(form, "reference", pm, nm, beta, reduction), pos, neg, vecs)
        got = score_hvp_run(_score_fn(form, "triton", pm, nm, beta, reduction), pos, neg, vecs)
        for g in got:
            assert torch.isfinite(g).all()
        # Values and gradients to 1e-10; at β = 256 the Hessian's terms grow like β² and cancel, and the C++
        # backend's HVP differs from reference.py by the same 1e-9.
        assert all(rel_err(g, w) <= 1e-10 for g, w in zip(got[:3], want[:3]))
        _close(got, want, 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", FORMS + ("info_nce",))
def test_score_mode_low_precision(dtype, form):
    pos, neg, pm, nm = score_data(33, 5, 70, dtype)
    res = {}
    for name, (p0, n0, backend) in {"exact": (pos.double(), neg.double(), "reference"), "ref": (pos, neg, "reference"),
                                    "triton": (pos, neg, "triton")}.items():
        p, n = p0.clone().requires_grad_(), n0.clone().requires_grad_()
        loss = _score_fn(form, backend, pm, nm)(p, n)
        res[name] = (loss,) + torch.autograd.grad(loss.sum(), (p, n))
    for g, r, w in zip(res["triton"], res["ref"], res["exact"]):
        assert g.dtype == dtype
        bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(r, w) + ULP[dtype]
        assert rel_err(g, w) <= bound


def test_score_mode_non_contiguous_nan_and_third_order():
    base = torch.rand(9, 12, dtype=torch.float64)
    pos, neg = base[:, ::4], base[:, 1::2]  # strided views
    for form in FORMS:
        want = F.oucl(pos, neg, form=form, backend="reference", reduction="none")
        torch.testing.assert_close(F.oucl(pos, neg, form=form, backend="triton", reduction="none"), want,
                                   rtol=1e-12, atol=1e-14)
    nan_pos = pos.clone()
    nan_pos[1, 0] = float("nan")
    mask = torch.ones_like(nan_pos, dtype=torch.bool)
    mask[2, 0] = False
    nan_pos[2, 0] = float("nan")  # masked: ignored
    rows = F.oucl(nan_pos, neg, pos_mask=mask, backend="triton", reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[torch.arange(9) != 1]).all()
    p = pos.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.oucl(p, neg, backend="triton"), p, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match="first and second derivatives only"):
        torch.autograd.grad(h.sum(), p)


def test_score_mode_gradcheck_and_gradgradcheck():
    pos, neg, pm, nm = score_data(6, 3, 8)
    p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    for form in ("weighted", "squared", "info_nce"):  # circle's Γ are constants: finite differences differ
        fn = _score_fn(form, "triton", pm, nm)
        assert gradcheck(fn, (p, n)) and gradgradcheck(fn, (p, n))


# ------------------------------------------------------------------------------------------- label mode
def _label_fn(op, backend, labels, ref_labels, similarity="shifted_cosine", beta=16.0, reduction="none"):
    def fn(e, r=None):
        if op == "info_nce":
            return F.info_nce_embeddings(e, labels, r, ref_labels, temperature=1.0 / beta, similarity=similarity,
                                         reduction=reduction, backend=backend)
        if op == "margins":
            return sum(s.clamp(-10, 10).square().sum()
                       for s in F.margin_statistics_embeddings(e, labels, r, ref_labels, similarity=similarity,
                                                               backend=backend))
        return F.oucl_embeddings(e, labels, r, ref_labels, form=op, beta=beta, similarity=similarity,
                                 reduction=reduction, backend=backend, **PARAMS)
    return fn


def _label_run(fn, emb, ref):
    inputs = (emb.clone().requires_grad_(),) + (() if ref is None else (ref.clone().requires_grad_(),))
    vecs = tuple(torch.randn_like(x) for x in inputs)
    loss, grads, hv = hvp(lambda *xs: fn(*xs).sum(), inputs, vecs)
    return (loss,) + grads + hv


@pytest.mark.parametrize("op", FORMS + ("info_nce", "margins"))
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine"])
@pytest.mark.parametrize("shape", [(1, 1), (21, None), (19, 37)])
def test_label_mode_fp64_values_gradients_hvp(op, similarity, shape):
    emb, labels, ref, ref_labels = label_data(*shape)
    torch.manual_seed(1)
    want = _label_run(_label_fn(op, "reference", labels, ref_labels, similarity), emb, ref)
    torch.manual_seed(1)
    got = _label_run(_label_fn(op, "triton", labels, ref_labels, similarity), emb, ref)
    _close(got, want, 1e-10)


@pytest.mark.parametrize("beta", [1.0, 80.0, 256.0])
def test_label_mode_extreme_beta_reductions_and_wide_features(beta):
    emb, labels, ref, ref_labels = label_data(17, 40, D=70, n_classes=6)  # D spans two feature chunks
    for op in FORMS + ("info_nce",):
        for reduction in ("mean", "sum"):
            want = _label_run(_label_fn(op, "reference", labels, ref_labels, beta=beta, reduction=reduction), emb, ref)
            got = _label_run(_label_fn(op, "triton", labels, ref_labels, beta=beta, reduction=reduction), emb, ref)
            for g in got[:3]:
                assert torch.isfinite(g).all()
            assert all(rel_err(g, w) <= 1e-10 for g, w in zip(got[:3], want[:3]))


def test_label_mode_singletons_and_no_valid_row():
    emb = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.arange(5)  # every class a singleton: no row has a positive
    for op in FORMS + ("info_nce",):
        got = _label_fn(op, "triton", labels, None)(emb)
        assert (got == 0).all()
    ref, ref_labels = torch.randn(1, 3, dtype=torch.float64), torch.tensor([2])  # M = 1
    for op in FORMS + ("info_nce", "margins"):
        want = _label_run(_label_fn(op, "reference", labels, ref_labels), emb, ref)
        got = _label_run(_label_fn(op, "triton", labels, ref_labels), emb, ref)
        _close(got, want, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", FORMS + ("info_nce",))
def test_label_mode_low_precision(dtype, op):
    emb, labels, ref, ref_labels = label_data(23, 45, D=16, dtype=dtype)
    res = {}
    for name, (e0, r0, backend) in {"exact": (emb.double(), ref.double(), "reference"), "ref": (emb, ref, "reference"),
                                    "triton": (emb, ref, "triton")}.items():
        e, r = e0.clone().requires_grad_(), r0.clone().requires_grad_()
        loss = _label_fn(op, backend, labels, ref_labels)(e, r)
        res[name] = (loss,) + torch.autograd.grad(loss.sum(), (e, r))
    for g, r, w in zip(res["triton"], res["ref"], res["exact"]):
        assert g.dtype == dtype
        bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(r, w) + ULP[dtype]
        assert rel_err(g, w) <= bound


def test_label_mode_non_contiguous_int32_labels_and_module():
    base = torch.randn(12, 10, dtype=torch.float64)
    emb = base[:, ::2]  # strided
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 3, 3, 0, 2], dtype=torch.int32)
    ref = torch.randn(5, 9, dtype=torch.float64).t()  # [9, 5], column-major
    ref_labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3], dtype=torch.int32)
    for args in ((emb, labels), (emb, labels, ref, ref_labels)):
        want = F.oucl_embeddings(*args, backend="reference")
        torch.testing.assert_close(F.oucl_embeddings(*args, backend="triton"), want, rtol=1e-12, atol=1e-14)
    loss_fn = metaug_fast.OUCLLoss(form="circle", beta=80.0, similarity="cosine", backend="triton")
    torch.testing.assert_close(loss_fn.embeddings(emb, labels), R.oucl_embeddings(emb, labels, form="circle", beta=80.0,
                                                                                  similarity="cosine"),
                               rtol=1e-12, atol=1e-14)


def test_label_mode_gradcheck_gradgradcheck_and_self_offset():
    emb, labels, ref, ref_labels = label_data(6, 8, D=3)
    e, r = emb.clone().requires_grad_(), ref.clone().requires_grad_()
    fn = _label_fn("weighted", "triton", labels, ref_labels)
    assert gradcheck(fn, (e, r)) and gradgradcheck(fn, (e, r))
    assert gradgradcheck(_label_fn("info_nce", "triton", labels, None), (e,))
    # self_offset: anchor i is reference row i + 2 (a rank's rows inside a gathered batch)
    whole = torch.cat([ref[:2], emb, ref[2:]])
    whole_labels = torch.cat([ref_labels[:2], labels, ref_labels[2:]])
    kw = dict(form="squared", beta=8.0, reduction="none", self_offset=2)
    from metaug_fast._ops.triton_label import oucl_embeddings_triton

    got = oucl_embeddings_triton(emb, labels, whole, whole_labels, similarity="cosine", gamma_pos=0.0, gamma_neg=0.0,
                                 margin=0.25, lam=0.0, **kw)
    want = R.oucl_embeddings(emb, labels, whole, whole_labels, similarity="cosine", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    from metaug_fast._ops.triton_label import info_nce_embeddings_triton

    got = info_nce_embeddings_triton(emb, labels, whole, whole_labels, temperature=0.2, similarity="cosine",
                                     reduction="none", self_offset=2)
    want = R.info_nce_embeddings(emb, labels, whole, whole_labels, temperature=0.2, reduction="none", self_offset=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine"])
def test_pairwise_similarity(dtype, similarity):
    a, b = torch.randn(19, 7, dtype=torch.float64).to(dtype), torch.randn(23, 7, dtype=torch.float64).to(dtype)
    torch.manual_seed(1)
    want = _label_run(lambda x, y: R.pairwise_similarity(x, y, similarity=similarity), a, b)
    torch.manual_seed(1)
    got = _label_run(lambda x, y: F.pairwise_similarity(x, y, similarity=similarity, backend="triton"), a, b)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4 * ULP[torch.float16]}[dtype]
    for g, w in zip(got, want):  # values, gradients and HVPs (the backward is PyTorch GEMMs)
        assert g.dtype == w.dtype and rel_err(g, w) <= tol
    # A zero row has similarity cos = 0 with everything (its 1/ε-scaled gradient matches reference.py's).
    a = a.double().clone()
    a[3] = 0
    a.requires_grad_()
    got, want = (fn(a, b.double(), similarity=similarity) for fn in
                 (lambda *x, **k: F.pairwise_similarity(*x, **k, backend="triton"), R.pairwise_similarity))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    grads = [torch.autograd.grad(x.sum(), a)[0] for x in (got, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=0)


@pytest.mark.parametrize("op", ["weighted", "info_nce", "margins"])
def test_label_mode_allocates_nothing_of_b_by_m(op):
    B, M, D = 40, 300, 8
    emb, labels, ref, ref_labels = label_data(B, M, D, dtype=torch.float32)
    e, r = emb.requires_grad_(), ref.requires_grad_()
    with LargestAllocation() as mode:
        _label_fn(op, "triton", labels, ref_labels, reduction="mean")(e, r).sum().backward()
    assert mode.largest <= M * D < B * M


@pytest.mark.parametrize("op", ["squared", "hinge", "info_nce", "margins"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_label_mode_second_order_in_row_chunks(monkeypatch, op, with_ref):
    # The meta step's path: the second derivative runs the Triton score-mode kernels over row chunks of the
    # scores (60 scores here: 1 row against 60 references, 4 rows without them), never B×M.
    from metaug_fast._ops import oucl_label

    monkeypatch.setattr(oucl_label, "_CHUNK_SCORES", 60)
    B, M = (13, 60) if with_ref else (15, 15)
    emb, labels, ref, ref_labels = label_data(B, M if with_ref else None, D=6)
    torch.manual_seed(1)
    want = _label_run(_label_fn(op, "reference", labels, ref_labels), emb, ref)
    torch.manual_seed(1)
    with LargestAllocation() as mode:
        got = _label_run(_label_fn(op, "triton", labels, ref_labels), emb, ref)
    _close(got, want, 1e-10)
    assert mode.largest <= max(B, M) * 6 < B * M  # the rows' gradients, never the scores


def test_backend_rules():
    with pytest.raises(ValueError, match="backend"):
        F.oucl(torch.rand(2, 2), torch.rand(2, 2), backend="trition")
    # auto never sends CPU tensors to the interpreter: it is for tests, not speed
    impls = metaug_fast._backend._IMPLS
    for op in ("oucl", "oucl_embeddings", "pairwise_similarity"):
        assert metaug_fast._backend.resolve(op, "auto", torch.device("cpu")) is not impls[op]["triton"]


def test_empty_batch_and_empty_reference_set():
    p, n = torch.rand(0, 3, dtype=torch.float64, requires_grad=True), torch.rand(0, 4, dtype=torch.float64)
    loss = F.oucl(p, n, backend="triton")
    loss.backward()
    assert loss.item() == 0 and p.grad.shape == (0, 3)
    emb = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    args = (emb, torch.arange(4), torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    for op in ("oucl_embeddings", "info_nce_embeddings"):
        got = getattr(F, op)(*args, backend="triton")
        torch.testing.assert_close(got, getattr(F, op)(*args, backend="reference"), rtol=0, atol=0)
        (g,) = torch.autograd.grad(got, emb)
        assert torch.equal(g, torch.zeros_like(emb))


@pytest.mark.parametrize("detach_margin", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_margin_injection_loss(detach_margin, masked):
    pos, neg, pm, nm = score_data(13, 6, 45, masked=masked)
    sp, sn = torch.rand(13, dtype=torch.float64), torch.rand(13, dtype=torch.float64)
    sp[4], sn[4] = float("inf"), float("-inf")  # a row without margins
    pos[1, 0] = sp[1]  # exactly at the hinge: relu'(0) = 0, as torch.relu
    inputs = (pos, neg, sp, sn)
    vecs = tuple(torch.randn_like(x) for x in inputs)
    for reduction in ("mean", "sum", "none"):
        out = []
        for backend in ("reference", "triton"):
            xs = tuple(x.clone().requires_grad_() for x in inputs)
            fn = lambda p, n, a, b: F.margin_injection_loss(p, n, a, b, pos_mask=pm, neg_mask=nm,  # noqa: E731,B023
                                                             detach_margin=detach_margin, reduction=reduction,
                                                             backend=backend).sum()
            loss = fn(*xs)
            grads = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
            out.append((loss,) + tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)))
            # Second order: the loss is piecewise linear, so the gradient of ⟨grad, v⟩ is 0 (or unused).
            dot = sum((g * v).sum() for g, v in zip(grads, vecs) if g is not None and g.requires_grad)
            if torch.is_tensor(dot):
                hv = torch.autograd.grad(dot, xs, allow_unused=True)
                assert all(h is None or torch.equal(h, torch.zeros_like(h)) for h in hv)
        for g, w in zip(out[1], out[0]):
            torch.testing.assert_close(g.detach(), w.detach(), rtol=1e-12, atol=1e-14)
    # fp16 scores accumulate in fp32
    got = F.margin_injection_loss(pos.half(), neg.half(), sp.half(), sn.half(), backend="triton")
    want = F.margin_injection_loss(pos.half(), neg.half(), sp.half(), sn.half(), backend="reference")
    assert got.dtype == torch.float16 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_label_mode_with_the_gpu_block_sizes(monkeypatch, dtype):
    # The GPU configuration (64×64 tiles, feature chunks of 64/128, many column splits) run by the
    # interpreter: masks at blocks larger than the data, several chunks of D, splits merged per row.
    from metaug_fast.kernels import oucl_label as K

    monkeypatch.setattr(K, "_interpreting", lambda: False)
    assert K.config(torch.empty(1, 70, dtype=dtype), 70)[0] in (32, 64)
    emb, labels, ref, ref_labels = label_data(37, 150, D=70, dtype=dtype)
    for op in ("weighted", "info_nce", "margins"):
        torch.manual_seed(1)
        want = _label_run(_label_fn(op, "reference", labels, ref_labels), emb, ref)
        torch.manual_seed(1)
        got = _label_run(_label_fn(op, "triton", labels, ref_labels), emb, ref)
        assert all(rel_err(g, w) <= (1e-10 if dtype == torch.float64 else 1e-5) for g, w in zip(got[:3], want[:3]))


@pytest.mark.parametrize("block_b, block_k", [(4, 128), (16, 512)])
def test_score_mode_with_the_gpu_block_sizes(monkeypatch, block_b, block_k):
    # Each configuration of the GPU autotuning space, forced on every score-mode kernel and run by the
    # interpreter (which otherwise uses one configuration).
    import triton

    from metaug_fast.kernels import oucl_score as K

    for name in dir(K):
        kernel = getattr(K, name)
        if isinstance(kernel, triton.runtime.Autotuner):
            monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_B": block_b, "BLOCK_K": block_k})])
            monkeypatch.setattr(kernel, "cache", {})
    pos, neg, pm, nm = score_data(13, 5, 600)
    for form in ("weighted", "squared", "info_nce"):
        vecs = (torch.randn_like(pos), torch.randn_like(neg))
        want = score_hvp_run(_score_fn(form, "reference", pm, nm), pos, neg, vecs)
        got = score_hvp_run(_score_fn(form, "triton", pm, nm), pos, neg, vecs)
        _close(got, want, 1e-10)
    sp, sn = torch.rand(13, dtype=torch.float64), torch.rand(13, dtype=torch.float64)
    for fn in (lambda b: F.margin_statistics(pos, neg, pm, nm, backend=b),
               lambda b: F.margin_injection_loss(pos, neg, sp, sn, pos_mask=pm, neg_mask=nm, backend=b)):
        torch.testing.assert_close(fn("triton"), fn("reference"), rtol=1e-12, atol=1e-14)
