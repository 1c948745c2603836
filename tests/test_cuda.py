"""The CUDA backend (score-mode OUCL and InfoNCE) against reference.py on a real GPU.

Marked ``gpu`` and skipped without a CUDA device and the built extension (bench/gpu_check.sh builds it
with METAUG_BUILD_CUDA=1 and runs these)."""
import pytest
import torch

import metaug_fast
import metaug_fast.functional as F

from helpers import FORMS, ULP, rel_err, score_hvp_run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in metaug_fast.available_backends(), reason="needs a GPU and metaug_fast._C_cuda"),
]
PARAMS = dict(gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)
SHAPES = [(1, 1, 1), (13, 6, 300), (257, 6, 6144), (4096, 6, 6144)]


def _inputs(shape, dtype, masked):
    B, kp, kn = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.rand(B, kp, device="cuda", generator=gen, dtype=torch.float64).to(dtype)
    neg = torch.rand(B, kn, device="cuda", generator=gen, dtype=torch.float64).to(dtype)
    pm = nm = None
    if masked:
        pm = torch.rand(B, kp, device="cuda", generator=gen) < 0.7
        nm = torch.rand(B, kn, device="cuda", generator=gen) < 0.7
        pm[0] = False
    return pos, neg, pm, nm


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", FORMS + ("info_nce",))
@pytest.mark.parametrize("masked", [False, True])
def test_fp64_matches_reference(shape, form, masked):
    pos, neg, pm, nm = _inputs(shape, torch.float64, masked)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    out = []
    for backend in ("reference", "cuda"):
        if form == "info_nce":
            fn = lambda p, n: F.info_nce(p, n, temperature=0.1, pos_mask=pm, neg_mask=nm, reduction="none", backend=backend)  # noqa: E731,B023
        else:
            fn = lambda p, n: F.oucl(p, n, form=form, beta=16.0, pos_mask=pm, neg_mask=nm, reduction="none", backend=backend, **PARAMS)  # noqa: E731,B023
        out.append(score_hvp_run(fn, pos, neg, vecs))
    for g, w in zip(out[1][:3], out[0][:3]):
        assert rel_err(g, w) <= 1e-10
    floor = 1e-12 * 100 * max(v.abs().max().item() for v in vecs)
    for g, w in zip(out[1][3:], out[0][3:]):
        assert (g - w).abs().max().item() <= 1e-10 * w.abs().max().item() + floor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_low_precision(dtype, form):
    pos, neg, pm, nm = _inputs((257, 6, 6144), dtype, True)
    res = {}
    for name, (p0, n0, backend) in {"exact": (pos.double(), neg.double(), "reference"), "ref": (pos, neg, "reference"),
                                    "cuda": (pos, neg, "cuda")}.items():
        p, n = p0.clone().requires_grad_(), n0.clone().requires_grad_()
        loss = F.oucl(p, n, form=form, beta=16.0, pos_mask=pm, neg_mask=nm, reduction="none", backend=backend, **PARAMS)
        res[name] = (loss,) + torch.autograd.grad(loss.sum(), (p, n))
    for g, r, w in zip(res["cuda"], res["ref"], res["exact"]):
        bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(r, w) + ULP[dtype]
        assert rel_err(g, w) <= bound


def test_explicit_cuda_backend_and_env():
    pos, neg, _, _ = _inputs((8, 2, 9), torch.float32, False)
    want = metaug_fast.reference.oucl(pos, neg)
    torch.testing.assert_close(F.oucl(pos, neg, backend="cuda"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_margin_statistics(shape, dtype):
    pos, neg, pm, nm = _inputs(shape, dtype, True)
    out = []
    for backend in ("reference", "cuda"):
        p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        sp, sn = F.margin_statistics(p, n, pm, nm, backend=backend)
        ok = torch.isfinite(sp)
        grads = torch.autograd.grad((1.5 * sp[ok]).sum() - (0.5 * sn[ok]).sum(), (p, n)) if ok.any() else ()
        out.append((sp, sn) + tuple(grads))
    for g, w in zip(*out):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ label mode
def _label(backend, fn_name, emb, labels, ref, ref_labels, **kw):
    e = emb.clone().requires_grad_()
    r = None if ref is None else ref.clone().requires_grad_()
    out = getattr(F, fn_name)(e, labels, r, ref_labels, backend=backend, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    target = sum((o[torch.isfinite(o)] * (k + 1)).sum() for k, o in enumerate(outs))
    return outs + torch.autograd.grad(target, [x for x in (e, r) if x is not None])


@pytest.mark.parametrize("shape", [(7, None), (300, 530), (4096, None), (64, 20000)])
@pytest.mark.parametrize("op", ["oucl_weighted", "oucl_circle", "oucl_hinge", "oucl_squared", "info_nce", "margins"])
def test_label_mode_matches_reference(shape, op):
    B, M = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(B, 32, device="cuda", dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 50, (B,), device="cuda", generator=gen)
    ref = None if M is None else torch.randn(M, 32, device="cuda", dtype=torch.float64, generator=gen)
    ref_labels = None if M is None else torch.randint(0, 60, (M,), device="cuda", generator=gen)
    if op == "info_nce":
        name, kw = "info_nce_embeddings", dict(temperature=0.1, reduction="none")
    elif op == "margins":
        name, kw = "margin_statistics_embeddings", {}
    else:
        name, kw = "oucl_embeddings", dict(form=op.split("_")[1], beta=32.0, reduction="none", **PARAMS)
    got = _label("cuda", name, emb, labels, ref, ref_labels, **kw)
    want = _label("reference", name, emb, labels, ref, ref_labels, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_label_mode_one_million_rows_fits():
    n = 1 << 20
    emb = torch.randn(n, 128, device="cuda", requires_grad=True)
    labels = torch.arange(n // 2, device="cuda").repeat(2)
    torch.cuda.reset_peak_memory_stats()
    F.oucl_embeddings(emb, labels, backend="cuda").backward()
    assert torch.cuda.max_memory_allocated() < 8 * 2**30  # B×M would be 4 TiB
