"""The contract every backend passes, one grid for all (tests/backends.py lists them: reference, cpp, Triton
under its interpreter, the CUDA kernels under the SIMT emulator, and on a GPU triton and cuda).

Against reference.py in fp64: values, gradients and Hessian-vector products of every op, score and label
mode, odd shapes, masks with empty and fully masked rows, label mode with and without a reference set and
with ``self_offset``, a constant reference set, non-contiguous inputs, empty batches, NaN propagation, the
third derivative (exact or a clear error). In fp32, fp16 and bf16 at β ∈ {1, 16, 64, 128, 256} (InfoNCE at
τ = 1/β, down to 0.004) on realistic scores (one high positive per row; two close views) and on uniform
ones: finite, and within the documented tolerances of fp64 (fp32: 1e-5 relative, 1e-4 where a GEMM
reorders sums; fp16/bf16: twice reference.py's own error in that dtype, plus one ulp).
Shapes are small: two of the backends interpret their kernels on the CPU.
"""
import pytest
import torch

from metaug_fast import reference as R

from backends import load, params
from helpers import FORMS, ULP, oracle, rel_err, score_data

PARAMS = dict(gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)
BETAS = (1.0, 16.0, 64.0, 128.0, 256.0)
LOW = (torch.float32, torch.float16, torch.bfloat16)
SCORE_OPS = FORMS + ("info_nce", "margins")
LABEL_OPS = FORMS + ("info_nce", "margins")


@pytest.fixture(scope="module", params=params())
def be(request):
    return load(*request.param)


def reference(op, *args, **kwargs):
    return getattr(R, op)(*args, **kwargs)


@pytest.fixture
def truth(be):
    """What ``be`` is compared with: reference.py, or for the reference entry itself the pair-explicit oracle
    of tests/helpers.py (reference.py against itself could not fail)."""
    return oracle if be.name == "reference" else reference


# ------------------------------------------------------------------------------------------- helpers
def score_fn(impl, op, pm=None, nm=None, beta=16.0, reduction="none"):
    """``op`` of score mode as a function of (pos, neg) on ``impl`` (a backend record or ``reference``)."""
    if op == "info_nce":
        return lambda p, n: impl("info_nce", p, n, temperature=1.0 / beta, pos_mask=pm, neg_mask=nm,
                                 reduction=reduction)
    if op == "margins":  # σ may be ±inf: a bounded function of them
        return lambda p, n: torch.stack(impl("margin_statistics", p, n, pm, nm)).clamp(-10, 10).square()
    return lambda p, n: impl("oucl", p, n, pos_mask=pm, neg_mask=nm, form=op, beta=beta, reduction=reduction,
                             **PARAMS)


def label_fn(impl, op, labels, ref_labels, similarity="shifted_cosine", beta=16.0, reduction="none", **extra):
    """``op`` of label mode as a function of (emb[, ref_emb])."""
    def fn(e, r=None):
        lab = labels.to(e.device)
        rlab = None if ref_labels is None else ref_labels.to(e.device)
        if op == "info_nce":
            return impl("info_nce_embeddings", e, lab, r, rlab, temperature=1.0 / beta, similarity=similarity,
                        reduction=reduction, **extra)
        if op == "margins":
            return torch.stack(impl("margin_statistics_embeddings", e, lab, r, rlab, similarity=similarity,
                                    **extra)).clamp(-10, 10).square()
        return impl("oucl_embeddings", e, lab, r, rlab, form=op, beta=beta, similarity=similarity,
                    reduction=reduction, **PARAMS, **extra)
    return fn


def run(fn, inputs, device="cpu", order=2, requires=None):
    """(output, gradients, Hessian-vector products) of ``Σ w·fn(*inputs)`` for fixed random weights w and
    directions v, on CPU in the inputs' dtype. ``order`` 1 stops after the gradients; ``requires`` says
    which inputs get gradients (default: all)."""
    gen = torch.Generator().manual_seed(7)
    requires = requires or (True,) * len(inputs)
    xs = [x.to(device).clone().requires_grad_(q) for x, q in zip(inputs, requires)]
    out = fn(*xs)
    w = torch.rand(out.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=out.dtype) + 0.5
    wrt = [x for x in xs if x.requires_grad]
    target = (out * w).sum()
    grads = torch.autograd.grad(target, wrt, create_graph=order > 1,
                                allow_unused=True) if target.requires_grad else [None] * len(wrt)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
    result = [out.detach()] + [g.detach() for g in grads]
    if order > 1:
        vecs = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x) for x in wrt]
        dot = sum((g * v).sum() for g, v in zip(grads, vecs))
        hv = torch.autograd.grad(dot, wrt, allow_unused=True) if dot.requires_grad else [None] * len(wrt)
        result += [torch.zeros_like(x) if h is None else h for x, h in zip(wrt, hv)]
    return [r.cpu() for r in result]


def assert_close(got, want, tol, hv_from=None, what=""):
    """Each output within ``tol`` of the reference's largest entry. Hessian-vector products (outputs from
    index ``hv_from`` on) may vanish by cancellation: they are measured against the largest of them all."""
    hv_scale = max((w.abs().max().item() for w in want[hv_from:] if w.numel()), default=0.0) if hv_from else 0
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, w.shape, g.dtype, w.dtype)
        if not w.numel():
            continue
        scale = w.abs().max().item()
        if hv_from is not None and i >= hv_from:
            scale = max(scale, hv_scale)
        err = (g.double() - w.double()).abs().max().item()
        assert err <= tol * max(scale, 1e-300), f"{what} output {i}: error {err:.3g}, scale {scale:.3g}"


def low_precision_grid(test):
    """The low-precision tests' grid: every smooth op × β × dtype (the marks applied as three stacked
    ``parametrize`` decorators would be, bottom first)."""
    for mark in (pytest.mark.parametrize("op", FORMS + ("info_nce",)), pytest.mark.parametrize("beta", BETAS),
                 pytest.mark.parametrize("dtype", LOW, ids=str)):
        test = mark(test)
    return test


def assert_close_at_large_beta(got, want, hv_from):
    """fp64 at any β: finite, values and gradients to 1e-10; the Hessian-vector products (from index
    ``hv_from``) grow like β² and cancel, so 1e-8 of the largest."""
    assert all(torch.isfinite(g).all() for g in got)
    assert_close(got[:hv_from], want[:hv_from], 1e-10)
    assert_close(got, want, 1e-8, hv_from=hv_from)


def skip_self_referential(be, dtype=None):
    """A bound defined as twice reference.py's own error (fp16/bf16, or ``dtype`` None: fp32 where a test
    takes that rule) holds for the reference entry by definition: those cases run for the other backends
    only. The reference entry's fp32 cases with a fixed bound are held to the oracle."""
    if be.name == "reference" and dtype != torch.float32:
        pytest.skip("a bound of twice reference.py's own error: the reference entry meets it by definition")


def skip_untiled(be):
    """Large shapes test a fused backend's tiles; reference.py has none (it is one GEMM, held to the oracle at
    the grid's shapes, where the oracle's B×M×M pair tensors stay small)."""
    if be.name == "reference":
        pytest.skip("reference.py has no tiles to cross")


def realistic_scores(B, kn, gen):
    """One high positive per row in [0.6, 0.95] and negatives in [0.4, 0.9]: what a trained encoder scores
    with the shifted cosine, where β·score passes -88 (fp32's exp underflow) from β = 128 on."""
    pos = 0.6 + 0.35 * torch.rand(B, 1, generator=gen, dtype=torch.float64)
    return pos, 0.4 + 0.5 * torch.rand(B, kn, generator=gen, dtype=torch.float64)


def close_views(B, D, gen, noise=0.05):
    """Two close views of B samples, as label mode sees them: emb [2B, D], labels arange(B) twice."""
    z = torch.randn(B, D, generator=gen, dtype=torch.float64)
    return torch.cat([z, z + noise * torch.randn(B, D, generator=gen, dtype=torch.float64)]), torch.arange(B).repeat(2)


def low_precision_bound(got, low_ref, exact, dtype, fp32_tol):
    """The documented tolerance (docs/accuracy.md#accuracy): fp32 within ``fp32_tol``; fp16/bf16 within twice
    reference.py's own error in that dtype plus one ulp."""
    for i, (g, r, w) in enumerate(zip(got, low_ref, exact)):
        assert g.dtype == dtype, (i, g.dtype)
        assert torch.isfinite(g).all() == torch.isfinite(w).all(), f"output {i}: not finite"
        bound = fp32_tol if dtype == torch.float32 else 2 * rel_err(r, w) + ULP[dtype]
        err = rel_err(g, w)
        assert err <= bound, f"output {i}: relative error {err:.3g} > {bound:.3g}"


# ------------------------------------------------------------------------------------------ score mode
@pytest.mark.parametrize("op", SCORE_OPS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (19, 3, 40), (5, 1, 300)])
@pytest.mark.parametrize("masked", [False, True])
def test_score_fp64_values_gradients_hvp(be, truth, op, shape, masked):
    pos, neg, pm, nm = score_data(*shape, masked=masked)
    got = run(score_fn(be, op, *(m if m is None else m.to(be.device) for m in (pm, nm))), (pos, neg), be.device)
    want = run(score_fn(truth, op, pm, nm), (pos, neg))
    assert_close(got, want, 1e-10, hv_from=3)


@pytest.mark.parametrize("op", FORMS + ("info_nce",))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_score_reductions(be, truth, op, reduction):
    pos, neg, pm, nm = score_data(11, 4, 37)
    got = run(score_fn(be, op, pm.to(be.device), nm.to(be.device), reduction=reduction), (pos, neg), be.device)
    assert_close(got, run(score_fn(truth, op, pm, nm, reduction=reduction), (pos, neg)), 1e-10, hv_from=3)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("op", FORMS + ("info_nce",))
def test_score_fp64_beta_range(be, truth, op, beta):
    gen = torch.Generator().manual_seed(3)
    for pos, neg in (realistic_scores(9, 40, gen), score_data(9, 4, 40, masked=False)[:2]):
        assert_close_at_large_beta(run(score_fn(be, op, beta=beta), (pos, neg), be.device),
                                   run(score_fn(truth, op, beta=beta), (pos, neg)), 3)


@low_precision_grid
def test_score_low_precision(be, truth, op, beta, dtype):
    skip_self_referential(be, dtype)
    gen = torch.Generator().manual_seed(5)
    for kind, (pos, neg) in (("realistic", realistic_scores(13, 70, gen)), ("uniform", score_data(13, 5, 70,
                                                                                                  masked=False)[:2])):
        pos, neg = pos.to(dtype), neg.to(dtype)
        exact = run(score_fn(truth, op, beta=beta), (pos.double(), neg.double()), order=1)
        low_ref = run(score_fn(reference, op, beta=beta), (pos, neg), order=1)
        got = run(score_fn(be, op, beta=beta), (pos, neg), be.device, order=1)
        low_precision_bound(got, low_ref, exact, dtype, 1e-5)


@pytest.mark.parametrize("beta", [16.0, 128.0, 256.0])
@pytest.mark.parametrize("op", ("squared", "weighted", "circle", "info_nce"))
def test_score_fp32_hvp_one_positive_per_row(be, truth, op, beta):
    # One positive per row: its share of the Hessian cancels exactly (e'·t - Σ w·e'·t with w = 1) only when
    # both products round alike; a fused multiply-add leaves about one ulp times β², relative error 1e-3.
    skip_self_referential(be)
    gen = torch.Generator().manual_seed(11)
    pos, neg = realistic_scores(13, 70, gen)
    pos32, neg32 = pos.float(), neg.float()
    exact = run(score_fn(truth, op, beta=beta), (pos32.double(), neg32.double()))
    low_ref = run(score_fn(reference, op, beta=beta), (pos32, neg32))
    got = run(score_fn(be, op, beta=beta), (pos32, neg32), be.device)
    assert all(torch.isfinite(g).all() for g in got)
    # As the fp16/bf16 rule: twice reference.py's own fp32 error (at least 1e-5), per output.
    for i, (g, r, w) in enumerate(zip(got, low_ref, exact)):
        bound = max(2 * rel_err(r, w), 1e-5)
        assert rel_err(g, w) <= bound, (i, rel_err(g, w), bound)


def test_score_masks_nan_and_non_contiguous(be, truth):
    base = torch.rand(9, 80, dtype=torch.float64)
    pos, neg = base[:, ::8], base[:, 1::2]  # strided views
    assert not pos.is_contiguous() and not neg.is_contiguous()
    for op in SCORE_OPS:
        got = run(score_fn(be, op), (pos, neg), be.device)
        assert_close(got, run(score_fn(truth, op), (pos, neg)), 1e-10, hv_from=3, what=op)
    nan_pos = pos.clone()
    nan_pos[1, 0] = float("nan")
    mask = torch.ones_like(nan_pos, dtype=torch.bool)
    mask[2, 0] = False
    nan_pos[2, 0] = float("nan")  # masked: ignored
    for op in FORMS + ("info_nce",):
        rows = score_fn(be, op, mask.to(be.device))(nan_pos.to(be.device), neg.to(be.device)).cpu()
        assert torch.isnan(rows[1]) and torch.isfinite(rows[torch.arange(9) != 1]).all(), op


def test_score_margin_ties_and_nan(be, truth):
    tied = torch.full((3, 64), 0.5, dtype=torch.float64)
    tied[:, ::5] = 0.25
    tied[2, 33] = float("nan")
    out = []
    for impl, device in ((be, be.device), (truth, "cpu")):
        p, n = tied.to(device).requires_grad_(), tied.to(device).requires_grad_()
        sp, sn = impl("margin_statistics", p, n, None, None)
        weights = torch.arange(1.0, 4.0, dtype=torch.float64, device=device)
        out.append([x.detach().cpu() for x in (sp, sn)] +
                   [g.cpu() for g in torch.autograd.grad((sp * weights).sum() - sn.sum(), (p, n))])
    for g, w in zip(*out):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_score_empty(be, truth):
    for shape in [(0, 3, 5), (3, 0, 5), (3, 4, 0)]:
        pos, neg = (torch.rand(shape[0], k, dtype=torch.float64) for k in shape[1:])
        for op in SCORE_OPS:
            got = run(score_fn(be, op, reduction="sum" if op != "margins" else "none"), (pos, neg), be.device, order=1)
            want = run(score_fn(truth, op, reduction="sum" if op != "margins" else "none"), (pos, neg), order=1)
            assert_close(got, want, 0.0, what=f"{op} {shape}")


def third_derivative_is_exact_or_raises(be, truth, loss_of, x, rtol):
    """∂³ of ``loss_of(impl, device)(x)`` along one path on ``be`` equals ``truth``'s, or ``be`` raises a clear
    error; ``loss_of(impl, device)`` is the loss as a function of x on that device."""
    results = []
    for impl, device in ((be, be.device), (truth, "cpu")):
        xs = x.to(device).requires_grad_()
        (g,) = torch.autograd.grad(loss_of(impl, device)(xs), xs, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), xs, create_graph=True)
        try:
            # Another path from x must not let a missing third-order term go unnoticed.
            results.append(torch.autograd.grad(h.sum() + (xs * xs).sum(), xs)[0].cpu())
        except RuntimeError as exc:
            assert "third" in str(exc) and impl is be
            return
    torch.testing.assert_close(results[0], results[1], rtol=rtol, atol=1e-12)


def test_score_third_derivative_is_exact_or_raises(be, truth):
    pos, neg, _, _ = score_data(5, 2, 7)
    third_derivative_is_exact_or_raises(
        be, truth, lambda impl, device: lambda p: score_fn(impl, "weighted", beta=4.0, reduction="sum")(
            p, neg.to(device)), pos, 1e-10)


@pytest.mark.parametrize("detach_margin", [False, True])
def test_margin_injection_loss(be, truth, detach_margin):
    if not be.has("margin_injection_loss"):
        pytest.skip(f"{be.name} has no margin_injection_loss (the public function falls back to reference)")
    pos, neg, pm, nm = score_data(13, 6, 45)
    sp, sn = torch.rand(13, dtype=torch.float64), torch.rand(13, dtype=torch.float64)
    sp[4], sn[4] = float("inf"), float("-inf")  # a row without margins
    pos[1, 0] = sp[1]  # exactly at the hinge: relu'(0) = 0, as torch.relu
    for reduction in ("mean", "sum", "none"):
        def fn(impl, masks):
            return lambda p, n, a, b: impl("margin_injection_loss", p, n, a, b, detach_margin=detach_margin,
                                           reduction=reduction, pos_mask=masks[0], neg_mask=masks[1])
        got = run(fn(be, (pm.to(be.device), nm.to(be.device))), (pos, neg, sp, sn), be.device)
        want = run(fn(truth, (pm, nm)), (pos, neg, sp, sn))
        assert_close(got, want, 1e-12, what=reduction)  # piecewise linear: the HVPs are 0 on both


# ------------------------------------------------------------------------------------------ label mode
def _label_data(B, M, D=5, n_classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, n_classes, (B,), generator=gen)
    if M is None:
        return emb, labels, None, None
    # Reference labels include a class that no anchor has.
    return emb, labels, torch.randn(M, D, generator=gen, dtype=torch.float64), torch.randint(0, n_classes + 1, (M,),
                                                                                             generator=gen)


def _label_inputs(emb, ref):
    return (emb,) if ref is None else (emb, ref)


@pytest.mark.parametrize("op", LABEL_OPS)
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine"])
@pytest.mark.parametrize("shape", [(1, 1), (21, None), (19, 37)])
def test_label_fp64_values_gradients_hvp(be, truth, op, similarity, shape):
    emb, labels, ref, ref_labels = _label_data(*shape)
    got = run(label_fn(be, op, labels, ref_labels, similarity), _label_inputs(emb, ref), be.device)
    want = run(label_fn(truth, op, labels, ref_labels, similarity), _label_inputs(emb, ref))
    assert_close(got, want, 1e-10, hv_from=1 + len(_label_inputs(emb, ref)))


@pytest.mark.parametrize("op", LABEL_OPS)
def test_label_dot_similarity(be, truth, op):
    # "dot": the rows' inner products as given, no normalization (scaled rows, so that scores spread).
    for shape in ((21, None), (19, 37)):
        emb, labels, ref, ref_labels = _label_data(*shape)
        inputs = tuple(0.4 * x for x in _label_inputs(emb, ref))
        got = run(label_fn(be, op, labels, ref_labels, "dot"), inputs, be.device)
        want = run(label_fn(truth, op, labels, ref_labels, "dot"), inputs)
        assert_close(got, want, 1e-10, hv_from=1 + len(inputs), what=str(shape))


@pytest.mark.parametrize("average", ["anchor", "pair"])
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine", "dot"])
def test_info_nce_temperature_tensor_and_average(be, truth, similarity, average):
    # A 0-d temperature gets its gradient (and second derivatives); "pair" weights rows by their positives.
    gen = torch.Generator().manual_seed(11)
    tau = torch.tensor(0.2, dtype=torch.float64)
    emb, labels, ref, ref_labels = _label_data(19, 23, n_classes=3)
    for r, rl in ((None, None), (ref, ref_labels)):
        inputs = _label_inputs(0.5 * emb, None if r is None else 0.5 * r) + (tau,)

        def fn(impl):
            def loss(e, *rest):
                *rr, t = rest
                return impl("info_nce_embeddings", e, labels.to(e.device), *(rr or [None]),
                            None if rl is None else rl.to(e.device), temperature=t.to(e.device),
                            similarity=similarity, reduction="mean", average=average)
            return loss
        got = run(fn(be), inputs, be.device)
        assert_close(got, run(fn(truth), inputs), 1e-10, hv_from=1 + len(inputs))
    if similarity != "shifted_cosine":
        return
    pos, neg = torch.rand(13, 4, generator=gen, dtype=torch.float64), torch.rand(13, 9, generator=gen,
                                                                                 dtype=torch.float64)
    pm, nm = torch.rand(13, 4, generator=gen) < 0.6, torch.rand(13, 9, generator=gen) < 0.8
    pos[~pm] = float("nan")  # masked entries give τ no NaN

    def score(impl):
        return lambda p, n, t: impl("info_nce", p, n, temperature=t, pos_mask=pm.to(p.device),
                                    neg_mask=nm.to(p.device), reduction="sum", average=average)
    got = run(score(be), (pos, neg, tau), be.device)
    want = run(score(truth), (pos, neg, tau))
    assert all(torch.isfinite(w).all() for w in want[2:])
    assert_close([torch.nan_to_num(g) for g in got], [torch.nan_to_num(w) for w in want], 1e-10, hv_from=4)


@pytest.mark.parametrize("op", LABEL_OPS)
@pytest.mark.parametrize("shape", [(300, 530), (3, 1100), (260, None), (4096, None), (64, 20000)])
def test_label_large_shapes(be, truth, op, shape):
    # Several tiles of every compiled backend (the C++ tiles are 256 rows × 512 columns, the GPU ones 64×64
    # with column splits); the interpreted backends run small shapes only, and the largest run on a GPU.
    skip_untiled(be)
    if be.interpreted or (shape[0] * (shape[1] or shape[0]) > 1_000_000 and be.device != "cuda"):
        pytest.skip("too large for this backend here")
    emb, labels, ref, ref_labels = _label_data(*shape, D=32, n_classes=20)
    got = run(label_fn(be, op, labels, ref_labels), _label_inputs(emb, ref), be.device, order=1)
    assert_close(got, run(label_fn(truth, op, labels, ref_labels), _label_inputs(emb, ref), order=1), 1e-10)


@pytest.mark.parametrize("op", FORMS + ("info_nce",))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_label_reductions_and_wide_features(be, truth, op, reduction):
    emb, labels, ref, ref_labels = _label_data(17, 40, D=70, n_classes=6)  # D spans feature chunks
    got = run(label_fn(be, op, labels, ref_labels, reduction=reduction), (emb, ref), be.device, order=1)
    assert_close(got, run(label_fn(truth, op, labels, ref_labels, reduction=reduction), (emb, ref), order=1),
                 1e-10)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("op", FORMS + ("info_nce",))
def test_label_fp64_beta_range(be, truth, op, beta):
    gen = torch.Generator().manual_seed(2)
    emb, labels = close_views(8, 6, gen)
    ref, ref_labels = emb[:9].flip(0).contiguous(), labels[:9].flip(0).contiguous()
    for inputs, rl in (((emb,), None), ((emb, ref), ref_labels)):
        assert_close_at_large_beta(run(label_fn(be, op, labels, rl, beta=beta), inputs, be.device),
                                   run(label_fn(truth, op, labels, rl, beta=beta), inputs), 1 + len(inputs))


@low_precision_grid
def test_label_low_precision(be, truth, op, beta, dtype):
    skip_self_referential(be, dtype)
    gen = torch.Generator().manual_seed(4)
    # One 16×16 tile each way for the interpreted backends (the fp64 tests cross tiles); more elsewhere.
    n, m = (8, 16) if be.interpreted else (12, 30)
    emb, labels = close_views(n, 16, gen)
    ref, ref_labels = torch.randn(m, 16, generator=gen, dtype=torch.float64), torch.randint(0, n, (m,), generator=gen)
    for inputs, rl in (((emb,), None), ((emb, ref), ref_labels)):
        low = tuple(x.to(dtype) for x in inputs)
        exact = run(label_fn(truth, op, labels, rl, beta=beta), tuple(x.double() for x in low), order=1)
        low_ref = run(label_fn(reference, op, labels, rl, beta=beta), low, order=1)
        got = run(label_fn(be, op, labels, rl, beta=beta), low, be.device, order=1)
        low_precision_bound(got, low_ref, exact, dtype, 1e-4)  # 1e-4: the GEMM reorders sums


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("op", FORMS + ("info_nce",))
def test_label_low_precision_interior_tiles(be, truth, op, dtype):
    # The fast path as a real run takes it: half inputs over many interior tiles (on a GPU, N = 2048 in self
    # mode and a 600 × 3000 reference set at D = 128: wgmma tiles, resident rows, TWO_WAY, G rounded to the
    # input dtype), loss and gradients against fp64 within the documented bound. Smaller where the kernels
    # are interpreted or on the CPU (whose tiles are 256 rows: two full blocks and a partial one).
    skip_self_referential(be, dtype)
    gen = torch.Generator().manual_seed(5)
    n, (b, m), d = ((24, (20, 60), 32) if be.interpreted else (1024, (600, 3000), 128) if be.device == "cuda"
                    else (300, (150, 700), 64))
    emb, labels = close_views(n, d, gen)
    queries, query_labels = torch.randn(b, d, generator=gen, dtype=torch.float64), torch.randint(0, b // 2, (b,),
                                                                                                 generator=gen)
    ref, ref_labels = torch.randn(m, d, generator=gen, dtype=torch.float64), torch.randint(0, b // 2, (m,),
                                                                                           generator=gen)
    for inputs, lab, rl in (((emb,), labels, None), ((queries, ref), query_labels, ref_labels)):
        low = tuple(x.to(dtype) for x in inputs)
        exact = run(label_fn(truth, op, lab, rl), tuple(x.double() for x in low), order=1)
        low_ref = run(label_fn(reference, op, lab, rl), low, order=1)
        got = run(label_fn(be, op, lab, rl), low, be.device, order=1)
        low_precision_bound(got, low_ref, exact, dtype, 1e-4)


@pytest.mark.parametrize("op", FORMS + ("info_nce",))
def test_label_self_offset_and_constant_reference(be, truth, op):
    # A rank's rows inside a gathered batch: anchor i is reference row i + 13 (its own pair excluded); a
    # memory bank is a constant reference set.
    emb, labels, ref, ref_labels = _label_data(10, 45, D=6)
    ref[13:23], ref_labels[13:23] = emb, labels
    for requires in ((True, True), (True, False)):
        got = run(label_fn(be, op, labels, ref_labels, self_offset=13), (emb, ref), be.device, requires=requires)
        want = run(label_fn(truth, op, labels, ref_labels, self_offset=13), (emb, ref), requires=requires)
        assert_close(got, want, 1e-10, hv_from=1 + sum(requires))


@pytest.mark.parametrize("op", FORMS + ("info_nce",))
def test_label_self_offset_pair_of_another_label_stays_a_negative(be, truth, op):
    # The excluded pair (i, i + self_offset) is never a positive; when its labels differ (anchors 0-2 here) it
    # is a negative like any pair of different labels, on every backend as in reference.py.
    emb, labels, ref, ref_labels = _label_data(10, 45, D=6)
    ref[13:23], ref_labels[13:23] = emb, labels
    ref_labels[13:16] = labels[:3] + 100
    got = run(label_fn(be, op, labels, ref_labels, self_offset=13), (emb, ref), be.device)
    want = run(label_fn(truth, op, labels, ref_labels, self_offset=13), (emb, ref))
    assert_close(got, want, 1e-10, hv_from=3)


def test_label_unit_reference_rows(be, truth):
    # A memory bank keeps unit rows: ref_unit=True skips their normalization and must not change a result.
    if be.name == "reference":
        pytest.skip("the bank scores reference.py in chunks (metaug_fast.chunked), never with ref_unit")
    emb, labels, ref, ref_labels = _label_data(9, 20, D=6)
    ref = torch.nn.functional.normalize(ref, dim=1)
    fused = be.impls["oucl_embeddings"]
    kw = dict(similarity="cosine", form="circle", beta=32.0, reduction="none", **PARAMS)
    want = truth("oucl_embeddings", emb, labels, ref, ref_labels, **kw)
    dev = be.device
    got = fused(emb.to(dev), labels.to(dev), ref.to(dev), ref_labels.to(dev), ref_unit=True, **kw).cpu()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_label_singletons_and_single_reference_row(be, truth):
    emb = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.arange(5)  # every class a singleton: no row has a positive
    for op in FORMS + ("info_nce",):
        assert (label_fn(be, op, labels, None)(emb.to(be.device)).cpu() == 0).all(), op
    ref, ref_labels = torch.randn(1, 3, dtype=torch.float64), torch.tensor([2])
    for op in LABEL_OPS:
        got = run(label_fn(be, op, labels, ref_labels), (emb, ref), be.device)
        assert_close(got, run(label_fn(truth, op, labels, ref_labels), (emb, ref)), 1e-10, hv_from=3, what=op)


def test_label_non_contiguous_and_int32_labels(be, truth):
    base = torch.randn(12, 10, dtype=torch.float64)
    emb = base[:, ::2]
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 3, 3, 0, 2], dtype=torch.int32)
    ref = torch.randn(5, 9, dtype=torch.float64).t()  # [9, 5], column-major
    ref_labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3], dtype=torch.int32)
    for op in LABEL_OPS:
        for inputs, rl in (((emb,), None), ((emb, ref), ref_labels)):
            got = run(label_fn(be, op, labels, rl), inputs, be.device, order=1)
            assert_close(got, run(label_fn(truth, op, labels, rl), inputs, order=1), 1e-10, what=op)


def test_label_empty_batch_and_reference_set(be, truth):
    emb, labels, ref, ref_labels = _label_data(6, 4, D=3)
    for op in LABEL_OPS:
        assert label_fn(be, op, labels[:0], ref_labels)(emb[:0].to(be.device), ref.to(be.device)).numel() == 0
        # No reference rows: losses 0 with zero gradients, margin statistics ±inf (clamped here).
        got = run(label_fn(be, op, labels, ref_labels[:0]), (emb, ref[:0]), be.device, order=1)
        assert_close(got, run(label_fn(truth, op, labels, ref_labels[:0]), (emb, ref[:0]), order=1), 0.0,
                     what=op)


# InfoNCE's positives by dot products (the C++ backend, when a row has few positives among many columns)
def _sparse_views(B, M, D=12, seed=5):
    """Two close views of B samples (one positive per anchor) and, with M, a reference set whose rows
    0 .. B-1 are third views of them and the rest other samples."""
    gen = torch.Generator().manual_seed(seed)
    emb, labels = close_views(B, D, gen)
    if M is None:
        return emb, labels, None, None
    ref = torch.cat([emb[:B] + 0.05 * torch.randn(B, D, generator=gen, dtype=torch.float64),
                     torch.randn(M - B, D, generator=gen, dtype=torch.float64)])
    return emb, labels, ref, torch.cat([torch.arange(B), torch.arange(B, M)])


@pytest.mark.parametrize("shape", [(40, None), (24, 300), (3, 100)])
def test_info_nce_sparse_positives(be, truth, shape):
    if be.interpreted and shape[1] == 300:
        pytest.skip("too large for this backend here")
    emb, labels, ref, ref_labels = _sparse_views(*shape)
    for average in ("anchor", "pair"):
        got = run(label_fn(be, "info_nce", labels, ref_labels, average=average), _label_inputs(emb, ref), be.device)
        want = run(label_fn(truth, "info_nce", labels, ref_labels, average=average), _label_inputs(emb, ref))
        assert_close(got, want, 1e-10, hv_from=1 + len(_label_inputs(emb, ref)), what=average)
    if ref is not None:  # a rank's rows inside a gathered batch: the self-pair among the positive columns
        emb, labels = ref[5:5 + 2 * shape[0]], ref_labels[5:5 + 2 * shape[0]].clone()
        got = run(label_fn(be, "info_nce", labels, ref_labels, self_offset=5), (emb, ref), be.device, order=1)
        want = run(label_fn(truth, "info_nce", labels, ref_labels, self_offset=5), (emb, ref), order=1)
        assert_close(got, want, 1e-10, what="self_offset")


# ------------------------------------------------------------- symmetric InfoNCE (CLIP: both directions)
def symmetric_fn(impl, labels, ref_labels, similarity="cosine", beta=16.0, reduction="mean", average="anchor"):
    """symmetric_info_nce as a function of (emb, ref_emb[, temperature])."""
    def fn(e, r, t=None):
        lab, rlab = ((torch.arange(e.shape[0]), torch.arange(r.shape[0])) if labels is None  # pairs i <-> i
                     else (labels, ref_labels))
        lab, rlab = lab.to(e.device), rlab.to(e.device)
        return impl("symmetric_info_nce", e, r, lab, rlab, temperature=1.0 / beta if t is None else t.to(e.device),
                    similarity=similarity, reduction=reduction, average=average)
    return fn


def _pairs(B, M, n_classes=None, D=6, seed=3):
    """(emb, ref_emb, labels, ref_labels): close pairs i <-> i (labels None: arange), or random classes."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=gen, dtype=torch.float64)
    ref = torch.randn(M, D, generator=gen, dtype=torch.float64)
    n = min(B, M)
    ref[:n] = emb[:n] + 0.3 * ref[:n]
    if n_classes is None:
        return emb, ref, None, None
    return emb, ref, torch.randint(0, n_classes, (B,), generator=gen), torch.randint(0, n_classes, (M,), generator=gen)


@pytest.mark.parametrize("average", ["anchor", "pair"])
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine", "dot"])
@pytest.mark.parametrize("shape", [(1, 1, None), (19, 37, None), (21, 17, 3)])
def test_symmetric_info_nce_fp64(be, truth, shape, similarity, average):
    if be.interpreted and average != "pair":
        pytest.skip("the average is a weighting in PyTorch: the compiled backends cover both")
    if be.name == "triton" and shape == (19, 37, None) and similarity != "cosine":
        # The similarity changes one constexpr (its affine map), which the other shapes run for each one.
        pytest.skip("the interpreter's slowest shape runs one similarity")
    emb, ref, labels, ref_labels = _pairs(*shape)
    tau = torch.tensor(0.25, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        for inputs in ((emb, ref), (emb, ref, tau)):
            fn = symmetric_fn(be, labels, ref_labels, similarity, reduction=reduction, average=average)
            want_fn = symmetric_fn(truth, labels, ref_labels, similarity, reduction=reduction, average=average)
            want = run(want_fn, inputs)
            if not (be.interpreted and reduction == "sum"):  # the reduction is PyTorch's: one HVP run covers it
                got = run(fn, inputs, be.device)
                assert_close(got, want, 1e-10, hv_from=1 + len(inputs), what=f"{reduction} {len(inputs)}")
            # Without create_graph the gradient takes the fused backward (both directions at once), not the
            # differentiable one above.
            assert_close(run(fn, inputs, be.device, order=1), want[:1 + len(inputs)], 1e-10, what="first order")
    # one side constant (a frozen text tower): its gradient is not taken
    got = run(symmetric_fn(be, labels, ref_labels, similarity), (emb, ref), be.device, requires=(True, False))
    want = run(symmetric_fn(truth, labels, ref_labels, similarity), (emb, ref), requires=(True, False))
    assert_close(got, want, 1e-10, hv_from=2)


@pytest.mark.parametrize("shape", [(600, 530, None), (300, 1100, 5), (3, 1100, None), (1100, 3, None)])
def test_symmetric_info_nce_large_shapes(be, truth, shape):
    # Several 256×512 tiles with partial ones at both edges; dense positives (5 classes) take the second sweep.
    skip_untiled(be)
    if be.interpreted:
        pytest.skip("too large for this backend here")
    emb, ref, labels, ref_labels = _pairs(*shape, D=24)  # (B, M, classes)
    got = run(symmetric_fn(be, labels, ref_labels), (emb, ref), be.device, order=1)
    assert_close(got, run(symmetric_fn(truth, labels, ref_labels), (emb, ref), order=1), 1e-10)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("beta", BETAS)
def test_symmetric_info_nce_low_precision(be, truth, beta, dtype):
    skip_self_referential(be, dtype)
    # CLIP at τ down to 1/256 on close pairs, normalized (cosine) and raw (dot) features.
    gen = torch.Generator().manual_seed(6)
    n = 12 if be.interpreted else 70
    emb = torch.randn(n, 16, generator=gen, dtype=torch.float64)
    ref = emb + 0.05 * torch.randn(n, 16, generator=gen, dtype=torch.float64)
    for similarity, scale in (("cosine", 1.0), ("dot", 0.25)):
        low = tuple((scale * x).to(dtype) for x in (emb, ref))
        fn = lambda impl: symmetric_fn(impl, None, None, similarity, beta=beta)
        exact = run(fn(truth), tuple(x.double() for x in low), order=1)
        low_ref = run(fn(reference), low, order=1)
        got = run(fn(be), low, be.device, order=1)
        low_precision_bound(got, low_ref, exact, dtype, 1e-4)


def test_symmetric_info_nce_empty_sides(be, truth):
    emb, ref, _, _ = _pairs(5, 4)
    for e, r in ((emb[:0], ref), (emb, ref[:0]), (emb[:0], ref[:0])):
        got = run(symmetric_fn(be, None, None), (e, r), be.device, order=1)
        assert_close(got, run(symmetric_fn(truth, None, None), (e, r), order=1), 0.0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_symmetric_info_nce_keeps_the_input_dtype(be, dtype):
    # A temperature tensor scales the rows in the accumulation dtype: the loss still comes back in the inputs'.
    emb, ref, _, _ = _pairs(5, 4)
    got = symmetric_fn(be, None, None)(emb.to(dtype).to(be.device), ref.to(dtype).to(be.device),
                                       torch.tensor(0.2, dtype=dtype))
    assert got.dtype == dtype


def test_label_third_derivative_is_exact_or_raises(be, truth):
    emb, labels, _, _ = _label_data(6, None, D=3)
    third_derivative_is_exact_or_raises(
        be, truth, lambda impl, device: label_fn(impl, "weighted", labels, None, beta=4.0, reduction="sum"), emb, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine", "dot"])
def test_pairwise_similarity(be, truth, dtype, similarity):
    a, b = torch.randn(19, 7, dtype=torch.float64).to(dtype), torch.randn(23, 7, dtype=torch.float64).to(dtype)
    fn = lambda impl: lambda x, y: impl("pairwise_similarity", x, y, similarity=similarity)
    got = run(fn(be), (a, b), be.device)
    want = run(fn(truth), (a, b))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4 * ULP[torch.float16]}[dtype]
    for i, (g, w) in enumerate(zip(got, want)):  # values, gradients and HVPs
        assert g.dtype == w.dtype and rel_err(g, w) <= tol, (i, rel_err(g, w))
    # A zero row has cos = 0 with everything; its 1/ε-scaled gradient matches reference.py's.
    a = a.double()
    a[3] = 0
    assert_close(run(fn(be), (a, b.double()), be.device, order=1), run(fn(truth), (a, b.double()), order=1), 1e-10)
