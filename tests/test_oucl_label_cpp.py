"""What is specific to fused label mode on the C++ backend (the shared grid is the contract suite, whose
large-shape test crosses the 256-row / 512-column tiles): gradcheck, threads, self mode's symmetric tiles,
the peer equivalence at N = 512, the second derivative in row chunks, and no B×M buffer."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import metaug_fast.functional as F
from metaug_fast import OUCLLoss
from metaug_fast import reference as R
from metaug_fast.backends.cpp import KERNELS
from metaug_fast.contract import Form, Stat

from conftest import requires_cpp
from helpers import FORMS, LargestAllocation, hvp, label_data, rel_err

pytestmark = requires_cpp
PARAMS = dict(gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)


def _unit(x):
    """Unit inverse norms of rows that are normalized already, as the label ops take them."""
    return torch.ones(x.shape[0], dtype=x.dtype)


def _run(backend, emb, labels, ref, ref_labels, reduction="none", **kw):
    e = emb.clone().requires_grad_()
    r = None if ref is None else ref.clone().requires_grad_()
    loss = F.oucl_embeddings(e, labels, r, ref_labels, reduction=reduction, backend=backend, **kw)
    grads = torch.autograd.grad(loss.sum(), [x for x in (e, r) if x is not None])
    return (loss,) + grads


@pytest.mark.parametrize("form", ["hinge", "squared", "weighted"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_gradcheck_and_gradgradcheck(form, with_ref):
    emb, labels, ref, ref_labels = label_data(6, 5 if with_ref else None, D=3, n_classes=3)
    inputs = [emb.requires_grad_()] + ([ref.requires_grad_()] if with_ref else [])

    def fn(*xs):
        r = xs[1] if with_ref else None
        return F.oucl_embeddings(xs[0], labels, r, ref_labels, form=form, beta=4.0, reduction="none", backend="cpp",
                                 **PARAMS)

    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_second_order_matches_reference_for_circle():
    emb, labels, ref, ref_labels = label_data(9, 13, D=4)
    out = []
    for backend in ("reference", "cpp"):
        e = emb.clone().requires_grad_()
        loss = F.oucl_embeddings(e, labels, ref, ref_labels, form="circle", beta=32.0, backend=backend)
        (g,) = torch.autograd.grad(loss, e, create_graph=True)
        (h,) = torch.autograd.grad((g * torch.arange(4.0, dtype=torch.float64)).sum(), e)
        out.append((g, h))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def _same_with_1_and_2_threads(run):
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):  # only ATen's GEMMs may regroup fp32 sums across threads
        assert rel_err(a, b) <= 1e-6, rel_err(a, b)


def test_thread_count_independent():
    # A small batch against many columns: with 2 threads the columns are split, with 1 they are not.
    emb, labels, ref, ref_labels = label_data(10, 3000, D=8, dtype=torch.float32)
    _same_with_1_and_2_threads(lambda: _run("cpp", emb, labels, ref, ref_labels, form="circle", beta=32.0))


# ------------------------------------------------------------------ cross mode (both directions at once)
def _cross_case(n_classes):
    """(zn [600,D], rn [530,D], labels, ref_labels): 3×2 tiles with partial ones; n_classes None: pairs
    i <-> i (sparse positives), else random classes (dense)."""
    gen = torch.Generator().manual_seed(9)
    zn = torch.nn.functional.normalize(torch.randn(600, 8, generator=gen, dtype=torch.float64), dim=1)
    rn = torch.nn.functional.normalize(torch.randn(530, 8, generator=gen, dtype=torch.float64), dim=1)
    if n_classes is None:
        return zn, rn, torch.arange(600), torch.arange(530)
    return zn, rn, torch.randint(0, n_classes, (600,), generator=gen), torch.randint(0, n_classes + 1, (530,),
                                                                                     generator=gen)


@pytest.mark.parametrize("n_classes", [None, 7])
@pytest.mark.parametrize("tau", [0.5, 1 / 256])
def test_cross_ops_equal_two_label_calls(n_classes, tau):
    # The cross op's rows, stats and gradients are those of one label op per direction, with invalid rows
    # (a class absent from the other side) and both ways of taking the positives.
    from metaug_fast.contract import LossParams
    ops = torch.ops.metaug_fast
    params = LossParams.info_nce(tau)
    zn, rn, lab, rlab = _cross_case(n_classes)
    gen = torch.Generator().manual_seed(1)
    g_z, g_r = torch.rand(600, generator=gen, dtype=torch.float64), torch.rand(530, generator=gen, dtype=torch.float64)
    iz, ir = _unit(zn), _unit(rn)  # normalized rows: unit inverse norms
    rows_z, stats_z, rows_r, stats_r = ops.oucl_label_cross_fwd(zn, iz, rn, ir, lab, rlab, 1, *params)
    want_z, want_sz = ops.oucl_label_fwd(zn, iz, rn, ir, lab, rlab, -1, 1, *params)
    want_r, want_sr = ops.oucl_label_fwd(rn, ir, zn, iz, rlab, lab, -1, 1, *params)
    assert not (torch.cat([stats_z, stats_r])[:, Stat.VALID] > 0).all()
    for got, want in ((rows_z, want_z), (stats_z, want_sz), (rows_r, want_r), (stats_r, want_sr)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cross = ops.oucl_label_cross_bwd(g_z, g_r, zn, iz, rn, ir, lab, rlab, stats_z, stats_r, 1, *params)
    a_z, a_iz, a_r, a_ir = ops.oucl_label_bwd(g_z, zn, iz, rn, ir, lab, rlab, stats_z, -1, 1, *params)
    b_r, b_ir, b_z, b_iz = ops.oucl_label_bwd(g_r, rn, ir, zn, iz, rlab, lab, stats_r, -1, 1, *params)
    for got, want in zip(cross, (a_z + b_z, a_iz + b_iz, a_r + b_r, a_ir + b_ir)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_cross_ops_run_infonce_only():
    zn, rn, lab, rlab = _cross_case(None)
    with pytest.raises(RuntimeError, match="cross mode runs InfoNCE"):
        torch.ops.metaug_fast.oucl_label_cross_fwd(zn, _unit(zn), rn, _unit(rn), lab, rlab, 0, int(Form.CIRCLE), 16.0,
                                                   0.0, 0.0, 0.2, 0.0)


def _clip(B, M, D):
    gen = torch.Generator().manual_seed(2)
    image, text = torch.randn(B, D, generator=gen), torch.randn(M, D, generator=gen)

    def run():
        a, b = image.clone().requires_grad_(), text.clone().requires_grad_()
        loss = F.symmetric_info_nce(a, b, temperature=0.05, similarity="dot", backend="cpp")
        return (loss.detach(), *torch.autograd.grad(loss, (a, b)))
    return run


def test_symmetric_info_nce_thread_count_independent():
    # Cross mode: 2 threads split rows and columns into items, 1 runs them in turn.
    _same_with_1_and_2_threads(_clip(1300, 1100, 32))


def test_symmetric_info_nce_stays_far_below_b_by_m():
    from bench.common import peak_extra_mb

    run = _clip(4096, 4096, 16)
    run()
    assert peak_extra_mb(run) < 4096 * 4096 * 4 / 2**20 / 4  # a quarter of one fp32 B×M matrix


def test_circle_cosine_equals_pml_at_512():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb = torch.randn(512, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (512,))
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    want = pml.CircleLoss(m=0.25, gamma=80.0)(e1, labels)
    loss_fn = OUCLLoss(form="circle", similarity="cosine", beta=80.0, margin=0.25, backend="cpp")
    got = loss_fn.embeddings(e2, labels)
    torch.testing.assert_close(got, want / 80.0, rtol=1e-10, atol=1e-13)
    want.backward()
    got.backward()
    torch.testing.assert_close(e2.grad, e1.grad / 80.0, rtol=1e-8, atol=1e-13)


def test_fused_forward_backward_stays_far_below_b_by_m():
    from bench.common import peak_extra_mb

    B = M = 4096
    emb = torch.randn(B, 16, requires_grad=True)
    labels = torch.randint(0, 100, (B,))
    bxm_mb = B * M * 4 / 2**20  # 64 MiB for one fp32 B×M matrix

    def run():
        F.oucl_embeddings(emb, labels, form="circle", beta=32.0, backend="cpp").backward()

    run()
    emb.grad = None
    assert peak_extra_mb(run) < bxm_mb / 4


# ---------------------------------------------------------------------------------- margin statistics
def _margins(backend, emb, labels, ref, ref_labels, similarity="shifted_cosine"):
    e = emb.clone().requires_grad_()
    r = None if ref is None else ref.clone().requires_grad_()
    sp, sn = F.margin_statistics_embeddings(e, labels, r, ref_labels, similarity=similarity, backend=backend)
    finite = torch.isfinite(sp)
    target = (sp[finite] * 1.5).sum() + (sn[finite] * -0.5).sum()
    grads = torch.autograd.grad(target, [x for x in (e, r) if x is not None]) if finite.any() else ()
    return (sp, sn) + tuple(grads)


def test_margin_statistics_ties_share_the_gradient():
    # Integer rows of norm 4 (scaled by powers of two): every score is a multiple of 1/16, so the ties are
    # exact whatever order a kernel or a BLAS sums in. Rows 3 and 4 duplicate row 0.
    base = torch.tensor([[3, 1, 1, 1, 1, 1, 1, 1], [2, 2, 2, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 2, 3]])
    emb = torch.cat([base, base[:1], base[:1]]).double() * torch.tensor([[1.0], [0.5], [2.0], [4.0], [0.25]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    for g, w in zip(_margins("cpp", emb, labels, None, None), _margins("reference", emb, labels, None, None)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_margin_statistics_second_order_and_gradcheck():
    emb, labels, ref, ref_labels = label_data(6, 7, D=3, n_classes=3)
    emb.requires_grad_()
    fn = lambda e: torch.stack(F.margin_statistics_embeddings(e, labels, ref, ref_labels, backend="cpp")).clamp(-9, 9)
    assert gradcheck(fn, (emb,)) and gradgradcheck(fn, (emb,))


# ------------------------------------------------------------------- second order in row chunks (meta step)
def _label_op(op, backend, **extra):
    """op(emb, labels, ref, ref_labels) -> a scalar mixing every output, on ``backend`` ("reference" or "cpp",
    whose label functions also take the distributed callers' ``self_offset``)."""
    from functools import partial

    from metaug_fast._ops import label as C

    def fused(f):
        return partial(f, kernels=KERNELS)

    if op == "margins":
        fn = R.margin_statistics_embeddings if backend == "reference" else fused(C.margin_statistics_embeddings_fused)
        return lambda *a: sum((k + 1.5) * s.clamp(-9, 9).square().sum() for k, s in
                              enumerate(fn(*a, similarity="shifted_cosine")))
    if op == "info_nce":
        fn = R.info_nce_embeddings if backend == "reference" else fused(C.info_nce_embeddings_fused)
        return lambda *a: fn(*a, temperature=0.2, similarity="shifted_cosine", reduction="sum", **extra)
    fn = R.oucl_embeddings if backend == "reference" else fused(C.oucl_embeddings_fused)
    return lambda *a: fn(*a, form=op, beta=16.0, similarity="shifted_cosine", reduction="sum", **PARAMS, **extra)


@pytest.mark.parametrize("op", FORMS + ("info_nce", "margins"))
@pytest.mark.parametrize("mode", ["self", "ref", "constant_ref", "self_offset"])
def test_hessian_vector_products_in_row_chunks_match_reference(monkeypatch, op, mode):
    # Chunks of 40 scores: 1 row at a time against 30 references, 5 rows at a time without them.
    from metaug_fast._ops import label as label_ops

    monkeypatch.setattr(label_ops, "_CHUNK_SCORES", 40)
    if op == "margins" and mode == "self_offset":
        pytest.skip("margin statistics take no self_offset")
    emb, labels, ref, ref_labels = label_data(11, None if mode == "self" else 30, D=4, n_classes=3)
    extra = {}
    if mode == "self_offset":
        ref[7:18], ref_labels[7:18] = emb, labels
        extra = dict(self_offset=7)
    vecs = [torch.randn_like(emb)] + ([torch.randn_like(ref)] if mode in ("ref", "self_offset") else [])
    out = []
    for backend in ("reference", "cpp"):
        fn = _label_op(op, backend, **extra)
        xs = [emb.clone().requires_grad_()] + ([ref.clone().requires_grad_()] if len(vecs) == 2 else [])

        def loss(*xs):
            r = xs[1] if len(xs) == 2 else (ref if mode == "constant_ref" else None)
            return fn(xs[0], labels, r, None if r is None else ref_labels)

        out.append(hvp(loss, xs, vecs))
    (l_w, g_w, h_w), (l_g, g_g, h_g) = out
    torch.testing.assert_close(l_g, l_w, rtol=1e-10, atol=0)
    for g, w in zip(g_g + h_g, g_w + h_w):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_second_order_in_row_chunks_gradgradcheck_and_third_order_raises(monkeypatch):
    from metaug_fast._ops import label as label_ops

    monkeypatch.setattr(label_ops, "_CHUNK_SCORES", 7)
    emb, labels, ref, ref_labels = label_data(5, 6, D=3, n_classes=3)
    e, r = emb.requires_grad_(), ref.requires_grad_()
    for op in ("squared", "info_nce", "margins"):  # not circle: its Γ weights are constants, not differentiated
        fn = _label_op(op, "cpp")
        assert gradgradcheck(lambda e, r: fn(e, labels, r, ref_labels), (e, r), eps=1e-6, atol=1e-7, rtol=1e-5)
    (g,) = torch.autograd.grad(_label_op("squared", "cpp")(e, labels, r, ref_labels), e, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), e, create_graph=True)
    with pytest.raises(RuntimeError, match="first and second derivatives only"):
        torch.autograd.grad(h.sum(), e)


@pytest.mark.parametrize("op", ["weighted", "info_nce", "margins"])
def test_second_order_allocates_nothing_of_b_by_m(monkeypatch, op):
    from metaug_fast._ops import label as label_ops

    B, M = 96, 80
    monkeypatch.setattr(label_ops, "_CHUNK_SCORES", 16 * M)
    emb, labels, ref, ref_labels = label_data(B, M, D=6, n_classes=5)
    xs = (emb.requires_grad_(), ref.requires_grad_())
    fn = _label_op(op, "cpp")
    with LargestAllocation() as rec:
        hvp(lambda e, r: fn(e, labels, r, ref_labels), xs, (torch.randn_like(emb), torch.randn_like(ref)))
    assert 16 * M <= rec.largest < B * M / 4  # the chunks' scores, never the whole matrix


# Self mode (no reference set) runs over the tiles on and above the diagonal in 256-row blocks: 600 rows are
# two full blocks and a partial one, so every round, the transposed halves and a partial diagonal tile run.
SELF_N = 600


def _self_fn(op, labels, backend):
    if op == "info_nce":
        return lambda e: F.info_nce_embeddings(e, labels, temperature=0.2, reduction="none", backend=backend)
    if op == "margins":
        return lambda e: torch.stack(F.margin_statistics_embeddings(e, labels, backend=backend)).clamp(-5, 5)
    return lambda e: F.oucl_embeddings(e, labels, form=op, beta=16.0, reduction="none", backend=backend, **PARAMS)


@pytest.mark.parametrize("op", FORMS + ("info_nce", "margins"))
def test_self_mode_symmetric_tiles_equal_reference(op):
    emb, labels, _, _ = label_data(SELF_N, None, D=16, n_classes=40)
    out = []
    for backend in ("reference", "cpp"):
        e = emb.clone().requires_grad_()
        rows = _self_fn(op, labels, backend)(e)
        (g,) = torch.autograd.grad((rows * torch.linspace(0.5, 1.5, rows.shape[-1], dtype=rows.dtype)).sum(), e)
        out.append((rows, g))
    for a, b in zip(*out):
        assert rel_err(a, b) <= 1e-12, rel_err(a, b)


@pytest.mark.parametrize("op", FORMS + ("info_nce",))
def test_self_mode_hvp_crosses_blocks(op):
    # The meta step in self mode: the second derivative over the symmetric tiles (oucl_label_self_bwd_bwd;
    # the hinge keeps the row chunks), with weighted rows and a singleton class (an invalid row).
    emb, labels, _, _ = label_data(SELF_N, None, D=8, n_classes=40)
    labels[5] = 1000
    vec, w = torch.randn_like(emb), torch.linspace(0.5, 1.5, SELF_N, dtype=emb.dtype)
    got, want = (hvp(lambda e: (_self_fn(op, labels, b)(e) * w).sum(), (emb.clone().requires_grad_(),), (vec,))
                 for b in ("cpp", "reference"))
    for a, b in zip((got[0], *got[1], *got[2]), (want[0], *want[1], *want[2])):
        assert rel_err(a, b) <= 1e-10, rel_err(a, b)


@pytest.mark.parametrize("form", [Form.SQUARED, Form.WEIGHTED, Form.CIRCLE, Form.INFONCE])
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine"])
def test_self_mode_second_derivative_equals_the_row_chunks(form, similarity):
    # The symmetric op against the row-chunk path on the same inputs (self mode not declared, so that the
    # chunks run): d_g, and ∂/∂zn as the sum of the chunks' two outputs.
    from metaug_fast._ops import label as label_ops
    from metaug_fast.contract import SIMILARITIES

    torch.manual_seed(0)
    zn = torch.nn.functional.normalize(torch.randn(SELF_N, 16, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 40, (SELF_N,))
    labels[7] = 1000  # no positive: an invalid row
    params = (int(form), 20.0, 0.1 if form != Form.INFONCE else 0.0, -0.05 if form != Form.INFONCE else 0.0, 0.3, 0.2)
    ops = torch.ops.metaug_fast
    one = _unit(zn)
    _, stats = ops.oucl_label_fwd(zn, one, zn, one, labels, labels, 0, SIMILARITIES[similarity], *params)
    g, v = torch.rand(SELF_N, dtype=torch.float64), torch.randn_like(zn)
    with _OpNames() as calls:
        d_g, d_z, d_r = label_ops._LabelDoubleBackward._vjp(g, zn, zn, v, v, labels, labels, stats, similarity, params,
                                                            0, KERNELS, True)
    assert "metaug_fast::oucl_label_self_bwd_bwd" in calls.names and d_r.abs().max() == 0
    want_g, want_z, want_r = label_ops._LabelDoubleBackward._vjp(g, zn, zn.clone(), v, v, labels, labels.clone(), stats,
                                                                 similarity, params, 0, KERNELS, False)
    assert d_g[7] == 0
    torch.testing.assert_close(d_g, want_g, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(d_z, want_z + want_r, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("op", ["weighted", "info_nce"])
def test_self_mode_second_derivative_fp32_at_beta_256(op):
    # Realistic scores (two noisy views of each sample) at the sharpest β, in fp32 across tiles: finite, and
    # within fp32's reach of the fp64 reference (5.7e-5 for InfoNCE, 2.5e-5 weighted, as the row chunks).
    torch.manual_seed(0)
    base = torch.randn(SELF_N // 2, 32, dtype=torch.float64)
    emb = torch.cat([base + 0.3 * torch.randn_like(base), base + 0.3 * torch.randn_like(base)])
    labels, vec = torch.arange(SELF_N // 2).repeat(2), torch.randn_like(emb)

    def fn(backend):
        if op == "info_nce":
            return lambda e: F.info_nce_embeddings(e, labels, temperature=1 / 256, backend=backend)
        return lambda e: F.oucl_embeddings(e, labels, form=op, beta=256.0, backend=backend)

    want = hvp(fn("reference"), (emb.clone().requires_grad_(),), (vec,))[2][0]
    got = hvp(fn("cpp"), (emb.float().requires_grad_(),), (vec.float(),))[2][0]
    assert torch.isfinite(got).all() and rel_err(got.double(), want) <= 2e-4, rel_err(got.double(), want)


def test_self_mode_second_derivative_thread_count_independent():
    emb, labels, _, _ = label_data(SELF_N, None, D=8, dtype=torch.float32, n_classes=40)
    vec = torch.randn_like(emb)

    def run():
        e = emb.clone().requires_grad_()
        (g,) = torch.autograd.grad(F.oucl_embeddings(e, labels, form="weighted", beta=32.0, backend="cpp"), e,
                                   create_graph=True)
        return torch.autograd.grad((g * vec).sum(), e)

    _same_with_1_and_2_threads(run)


def test_self_mode_second_derivative_allocates_nothing_of_n_by_n():
    # What autograd and the Functions allocate around the op (its tiles live inside it, one per thread).
    emb, labels, _, _ = label_data(SELF_N, None, D=8, n_classes=40)
    with LargestAllocation() as rec:
        hvp(lambda e: _self_fn("weighted", labels, "cpp")(e).sum(), (emb.requires_grad_(),), (torch.randn_like(emb),))
    assert rec.largest < SELF_N**2 / 4


def test_self_mode_second_derivative_checks_its_arguments():
    zn = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    params = (int(Form.WEIGHTED), 16.0, 0.0, 0.0, 0.25, 0.0)
    ops = torch.ops.metaug_fast
    one = _unit(zn)
    _, stats = ops.oucl_label_fwd(zn, one, zn, one, labels, labels, 0, 0, *params)
    g = torch.ones(6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="form must be squared, weighted, circle or InfoNCE"):
        ops.oucl_label_self_bwd_bwd(g, zn, zn, labels, stats, 0, int(Form.HINGE), *params[1:])
    with pytest.raises(RuntimeError, match="v must be a CPU tensor of zn's shape and dtype"):
        ops.oucl_label_self_bwd_bwd(g, zn, zn[:5], labels, stats, 0, *params)
    with pytest.raises(RuntimeError, match="stats must be"):
        ops.oucl_label_self_bwd_bwd(g, zn, zn, labels, stats[:5], 0, *params)


def test_self_mode_gradient_equals_the_rectangular_path():
    # The op with rn aliasing zn takes the symmetric path and returns the whole gradient first; with a copy of
    # zn as the reference it takes the rectangular one: the sums of the two outputs agree.
    zn = torch.nn.functional.normalize(torch.randn(SELF_N, 16, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 40, (SELF_N,))
    args = (0, 0, 2, 16.0, 0.0, 0.0, 0.25, 0.0)
    ops = torch.ops.metaug_fast
    one = _unit(zn)
    rows_s, stats_s = ops.oucl_label_fwd(zn, one, zn, one, labels, labels, *args)
    rows_r, stats_r = ops.oucl_label_fwd(zn, one, zn.clone(), one.clone(), labels, labels.clone(), *args)
    torch.testing.assert_close(rows_s, rows_r, rtol=1e-12, atol=0)
    g = torch.rand(SELF_N, dtype=torch.float64)
    gz_s, giz_s, gr_s, _ = ops.oucl_label_bwd(g, zn, one, zn, one, labels, labels, stats_s, *args)
    gz_r, giz_r, gr_r, gir_r = ops.oucl_label_bwd(g, zn, one, zn.clone(), one.clone(), labels, labels.clone(), stats_r,
                                                  *args)
    assert gr_s.shape == (0, 16)  # self mode: the whole gradient comes first
    torch.testing.assert_close(gz_s, gz_r + gr_r, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(giz_s, giz_r + gir_r, rtol=1e-12, atol=1e-15)


def test_self_mode_thread_count_independent():
    emb, labels, _, _ = label_data(SELF_N, None, D=8, dtype=torch.float32, n_classes=40)
    _same_with_1_and_2_threads(lambda: _run("cpp", emb, labels, None, None, form="weighted", beta=32.0))


class _Syncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a device value to the host (a stream synchronization on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
        if func is torch.ops.aten.index.Tensor:  # a boolean index has a data-dependent size
            self.count += any(i is not None and i.dtype == torch.bool for i in args[1])
        return func(*args, **(kwargs or {}))


def test_label_hvp_reads_nothing_back_per_chunk(monkeypatch):
    from metaug_fast._ops import label as label_ops

    monkeypatch.setattr(label_ops, "_CHUNK_SCORES", 64)  # many chunks
    emb, labels, ref, ref_labels = label_data(40, 30, D=4)
    for r in (None, ref):
        e = emb.clone().requires_grad_()
        with _Syncs() as syncs:
            loss = F.oucl_embeddings(e, labels, r, None if r is None else ref_labels, backend="cpp")
            (g,) = torch.autograd.grad(loss, e, create_graph=True)
            torch.autograd.grad((g * g).sum(), e)
        assert syncs.count == 0


def test_second_derivative_chunks_scale_with_the_device():
    from metaug_fast._ops import label as label_ops

    assert label_ops.chunk_scores(torch.device("cpu")) == label_ops._CHUNK_SCORES
    if torch.cuda.is_available():
        assert label_ops.chunk_scores(torch.device("cuda")) >= 16 * label_ops._CHUNK_SCORES


@pytest.mark.parametrize("form", [Form.SQUARED, Form.WEIGHTED, Form.CIRCLE, Form.INFONCE])
def test_label_rows_double_backward_equals_the_score_mode_ops(form):
    # The HVP's label-aware row kernel (one op, the pair's side from the labels) against the score-mode
    # backward and double backward over positive and negative masks, which it replaces on the CPU: rows 5..11
    # of a batch whose pair (i, i + 3) is excluded, one row with no positive (invalid), fp64.
    torch.manual_seed(0)
    R, M, row0, offset = 7, 300, 5, 3
    S = torch.rand(R, M, dtype=torch.float64) * 1.4 - 0.4
    U = torch.randn(R, M, dtype=torch.float64)
    labels, ref_labels = torch.randint(0, 4, (R,)), torch.randint(0, 4, (M,))
    labels[2] = 9  # no positive: an invalid row
    pm = labels[:, None] == ref_labels[None, :]
    nm = ~pm
    pm[torch.arange(R), torch.arange(R) + row0 + offset] = False
    params = (int(form), 20.0, 0.1 if form != Form.INFONCE else 0.0, -0.05 if form != Form.INFONCE else 0.0, 0.3, 0.2)
    ops = torch.ops.metaug_fast
    _, stats = ops.oucl_score_fwd(S, S, pm, nm, *params)
    g = torch.rand(R, dtype=torch.float64)
    gp, gn = ops.oucl_score_bwd(g, S, S, pm, nm, stats, *params)
    d_g, hp, hn = ops.oucl_score_bwd_bwd(g, U, U, S, S, pm, nm, stats, *params)
    got = ops.oucl_label_rows_bwd_bwd(g, U, S, labels, ref_labels, stats, row0, offset, *params)
    assert stats[2, Stat.VALID] == 0 and got[1][2].abs().max() == 0
    for a, b in zip(got, (d_g, gp + gn, hp + hn)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="form must be squared, weighted, circle or InfoNCE"):
        ops.oucl_label_rows_bwd_bwd(g, U, S, labels, ref_labels, stats, row0, offset, int(Form.HINGE), *params[1:])
    # A reference set split in two parts (as across processes; the excluded pairs lie in the first): round 1
    # alone over each part adds to the whole rows' sums and d_g, and the product over a part from the whole
    # sums is that part's columns of the whole product.
    parts = [(slice(0, 120), offset), (slice(120, M), -1)]
    halves = [ops.oucl_label_rows_hvp_sums(U[:, c], S[:, c], labels, ref_labels[c], stats, row0, o, *params)
              for c, o in parts]
    sums = halves[0][0] + halves[1][0]
    assert halves[0][0].abs().sum() > 0 and halves[1][0].abs().sum() > 0
    torch.testing.assert_close(halves[0][1] + halves[1][1], d_g, rtol=1e-12, atol=1e-14)
    for c, o in parts:
        part = ops.oucl_label_rows_bwd_bwd(g, U[:, c], S[:, c], labels, ref_labels[c], stats, row0, o, *params, sums)
        for a, b in zip(part, (d_g, (gp + gn)[:, c], (hp + hn)[:, c])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if form != Form.INFONCE:  # the same terms in PyTorch ops, for kernels without these row ops (CUDA, Triton)
        from metaug_fast._ops.label import _split_apply, _split_sums

        for c, o in parts:
            pmc, nmc = pm[:, c], nm[:, c]
            got_sums, got_dg = _split_sums(S[:, c], U[:, c], pmc, nmc, stats, params)
            want_sums, want_dg = ops.oucl_label_rows_hvp_sums(U[:, c], S[:, c], labels, ref_labels[c], stats, row0, o,
                                                              *params)
            torch.testing.assert_close(got_sums[:, :2], want_sums[:, :2], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got_dg, want_dg, rtol=1e-12, atol=1e-14)
            for a, b in zip(_split_apply(g, S[:, c], U[:, c], pmc, nmc, stats, params, sums),
                            (d_g, (gp + gn)[:, c], (hp + hn)[:, c])):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match=r"sums must be a CPU \[R, 4\] tensor"):
        ops.oucl_label_rows_bwd_bwd(g, U, S, labels, ref_labels, stats, row0, offset, *params, sums[:, :3])
    with pytest.raises(RuntimeError, match="form must be squared, weighted, circle or InfoNCE"):
        ops.oucl_label_rows_hvp_sums(U, S, labels, ref_labels, stats, row0, offset, int(Form.HINGE), *params[1:])


@pytest.mark.parametrize("op, M", [(op, 700) for op in FORMS + ("info_nce",)] + [("weighted", 4500)])
def test_constant_reference_takes_the_gradient_with_the_forward(op, M):
    # A reference set without a gradient (a memory bank): the forward returns ∂/∂zn at unit grad_rows with
    # the rows, and the backward only scales it; up to 4096 columns in one sweep (whole score rows finished
    # in memory, one GEMM fewer), beyond through the tiled forward and backward (M = 4500). Equal to the op
    # path and to reference.py; 600 rows cross several row blocks. A graph of the backward still takes the
    # exact op path (the HVP tests above).
    zn = torch.nn.functional.normalize(torch.randn(600, 16, dtype=torch.float64), dim=1)
    rn = torch.nn.functional.normalize(torch.randn(M, 16, dtype=torch.float64), dim=1)
    labels, ref_labels = torch.randint(0, 30, (600,)), torch.randint(0, 30, (M,))
    form = Form.INFONCE if op == "info_nce" else Form[op.upper()]
    # Raw rows and their inverse norms, as the Functions pass them.
    zr, rr = zn * torch.rand(600, 1, dtype=torch.float64).add(0.5), rn * 2.0
    args = (zr, 1 / zr.norm(dim=1), rr, 1 / rr.norm(dim=1), labels, ref_labels, 4, 0, int(form), 16.0, 0.1, -0.05,
            0.3, 0.2)
    ops = torch.ops.metaug_fast
    with pytest.raises(RuntimeError, match="margin statistics have two outputs per row"):
        ops.oucl_label_fwd_grad(*args[:8], int(Form.MARGIN), *args[9:])
    rows, stats, de, diz = ops.oucl_label_fwd_grad(*args)
    rows_w, stats_w = ops.oucl_label_fwd(*args)
    torch.testing.assert_close(rows, rows_w, rtol=1e-12, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(stats, stats_w, rtol=1e-12, atol=1e-14, equal_nan=True)
    de_w, diz_w, dr_w, _ = ops.oucl_label_bwd(torch.ones(600, dtype=torch.float64), *args[:6], stats_w, *args[6:],
                                              False)
    assert dr_w.shape == (0, 16)  # a constant reference set: no gradient of its own
    torch.testing.assert_close(de, de_w, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(diz, diz_w, rtol=1e-11, atol=1e-13)
    emb, ref = torch.randn(600, 16, dtype=torch.float64), torch.randn(M, 16, dtype=torch.float64)
    got, want = [], []
    for backend, out in (("cpp", got), ("reference", want)):
        e = emb.clone().requires_grad_()
        with _OpNames() as seen:
            if op == "info_nce":
                loss = F.info_nce_embeddings(e, labels, ref, ref_labels, temperature=0.2, reduction="mean",
                                             backend=backend)
            else:
                loss = F.oucl_embeddings(e, labels, ref, ref_labels, form=op, beta=16.0, reduction="mean",
                                         backend=backend, **PARAMS)
            out += [loss, *torch.autograd.grad(loss * 3.0, e)]
        if backend == "cpp":
            assert "metaug_fast::oucl_label_fwd_grad" in seen.names and "metaug_fast::oucl_label_bwd" not in seen.names
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-10, rel_err(a, b)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["weighted", "margins"])
def test_gradient_with_a_graph_equals_the_gradient_without(dtype, op):
    # The meta step's first derivative is the first-order op itself on the same raw rows and inverse norms:
    # taking it with create_graph=True changes no bit of it (self mode, and a reference set with a gradient).
    emb, labels, ref, ref_labels = label_data(23, 31, D=7, dtype=dtype)
    for r, rl in ((None, None), (ref, ref_labels)):
        xs = [emb.clone().requires_grad_()] + ([] if r is None else [r.clone().requires_grad_()])

        def loss():
            if op == "margins":
                return sum(s.clamp(-10, 10).square().sum() for s in F.margin_statistics_embeddings(
                    xs[0], labels, xs[1] if r is not None else None, rl, backend="cpp"))
            return F.oucl_embeddings(xs[0], labels, xs[1] if r is not None else None, rl, backend="cpp")

        with_graph = torch.autograd.grad(loss(), xs, create_graph=True)
        without = torch.autograd.grad(loss(), xs)
        for a, b in zip(with_graph, without):
            assert torch.equal(a.detach(), b)
