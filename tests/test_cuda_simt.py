"""The CUDA kernels (csrc/cuda/oucl_cuda.cu) against reference.py on this CPU, run by the SIMT emulator of
csrc/cuda/simt/: the kernel source compiled as host C++, every CUDA thread a fiber, warp shuffles and votes
evaluated when the whole warp reaches them (a lane that skips or diverges is an error). The ops register as
torch.ops.metaug_fast_simt and run through the same autograd Functions as the real ones, so these tests cover
the kernels' indexing, warp reductions, masks, stats layout, label tiling (tiles of 1024 elements here, so
several per call) and the second-order path. What they cannot cover: timing, memory coalescing, races between
warps, and cuBLAS (the label GEMMs run on the CPU here); tests/test_cuda.py does that on a real GPU."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from metaug_fast import reference as R
from metaug_fast._ops.margins import margin_statistics_fused
from metaug_fast._ops.oucl_label import (info_nce_embeddings_cpp, margin_statistics_embeddings_cpp,
                                         oucl_embeddings_cpp)
from metaug_fast._ops.oucl_score import info_nce_fused, oucl_fused

from helpers import FORMS, ULP, hvp, label_data, rel_err, score_data, score_hvp_run

ROOT = Path(__file__).resolve().parents[1]
PARAMS = dict(gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)


# METAUG_SIMT_ASAN=1: the kernels are built with AddressSanitizer, so a read or write outside any tensor the
# kernels were given stops the run (test_kernels_stay_in_bounds runs this file so, in a subprocess).
ASAN = os.environ.get("METAUG_SIMT_ASAN", "0") == "1"


@pytest.fixture(scope="module")
def simt():
    """torch.ops.metaug_fast_simt, built on first use into build/simt (about 10 s)."""
    build = ROOT / "build" / ("simt_asan" if ASAN else "simt")
    build.mkdir(parents=True, exist_ok=True)
    # -ffp-contract=off: no fused multiply-adds, as nvcc --fmad=false builds the real kernels.
    flags = ["-O1", "-ffp-contract=off"] + (["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else [])
    cpp_extension.load(name="metaug_fast_simt_asan" if ASAN else "metaug_fast_simt",
                       sources=[str(ROOT / "csrc/cuda/simt/oucl_cuda_simt.cpp")], extra_cflags=flags,
                       extra_ldflags=["-fsanitize=address"] if ASAN else [], build_directory=str(build),
                       is_python_module=False)
    return torch.ops.metaug_fast_simt


def _gcc_library(name):
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) else None


@pytest.mark.skipif(ASAN, reason="this is the test that runs the others under AddressSanitizer")
def test_kernels_stay_in_bounds():
    """Every test of this file again, with the kernels built with AddressSanitizer (a GPU would read garbage
    or fault at an illegal address; here the run stops at the first access outside the tensors)."""
    libs = [_gcc_library("libasan.so"), _gcc_library("libstdc++.so.6")]
    if None in libs:
        pytest.skip("gcc's AddressSanitizer runtime is not installed")
    # libstdc++ is preloaded too: ASan must see it before Triton's extension throws its first exception.
    env = dict(os.environ, METAUG_SIMT_ASAN="1", LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0")
    # -s: an ASan report is written to the process's stderr, which pytest's capture would swallow.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    assert " passed" in run.stdout and "AddressSanitizer" not in run.stderr


def test_emulator_runs_warp_collectives_and_rejects_broken_ones(simt):
    assert simt.selftest(2) == sum(range(32))
    with pytest.raises(RuntimeError, match="thread 5 returned while its warp waits at __shfl_xor_sync"):
        simt.selftest(0)
    with pytest.raises(RuntimeError, match="thread 7 is at __any_sync while its warp is at __shfl_xor_sync"):
        simt.selftest(1)
    assert simt.selftest(2) == sum(range(32))  # the emulator is usable again after an error


# ------------------------------------------------------------------------------------------- score mode
def _score_fn(form, ops, pm, nm, beta=16.0):
    """Per-row losses (or margin statistics) on the kernels of ``ops``, or on reference.py when it is None."""
    if form == "info_nce":
        fn = R.info_nce if ops is None else functools.partial(info_nce_fused, ops=ops)
        return lambda p, n: fn(p, n, temperature=1.0 / beta, pos_mask=pm, neg_mask=nm, reduction="none")
    if form == "margins":
        fn = R.margin_statistics if ops is None else functools.partial(margin_statistics_fused, ops=ops)
        return lambda p, n: torch.stack(fn(p, n, pm, nm)).clamp(-10, 10).square()
    fn = R.oucl if ops is None else functools.partial(oucl_fused, ops=ops)
    return lambda p, n: fn(p, n, form=form, beta=beta, pos_mask=pm, neg_mask=nm, reduction="none", **PARAMS)


@pytest.mark.parametrize("form", FORMS + ("info_nce", "margins"))
@pytest.mark.parametrize("shape", [(1, 1, 1), (19, 3, 40), (9, 70, 33)])
@pytest.mark.parametrize("masked", [False, True])
def test_score_mode_fp64_values_gradients_hvp(simt, form, shape, masked):
    # K from 1 (31 idle lanes) to 70 (lanes stride over the row); B = 9, 19: partial blocks of 8 warps.
    pos, neg, pm, nm = score_data(*shape, masked=masked)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    got = score_hvp_run(_score_fn(form, simt, pm, nm), pos, neg, vecs)
    want = score_hvp_run(_score_fn(form, None, pm, nm), pos, neg, vecs)
    for g, w in zip(got[:3], want[:3]):
        assert rel_err(g, w) <= 1e-10
    floor = 1e-12 * max(v.abs().max().item() for v in vecs)
    for g, w in zip(got[3:], want[3:]):
        assert (g - w).abs().max().item() <= 1e-10 * w.abs().max().item() + floor


@pytest.mark.parametrize("beta", [1.0, 256.0])
@pytest.mark.parametrize("form", FORMS + ("info_nce",))
def test_score_mode_extreme_beta(simt, beta, form):
    pos, neg, pm, nm = score_data(11, 4, 37)
    vecs = (torch.randn_like(pos), torch.randn_like(neg))
    got = score_hvp_run(_score_fn(form, simt, pm, nm, beta), pos, neg, vecs)
    want = score_hvp_run(_score_fn(form, None, pm, nm, beta), pos, neg, vecs)
    assert all(torch.isfinite(g).all() for g in got)
    assert all(rel_err(g, w) <= 1e-10 for g, w in zip(got[:3], want[:3]))
    # At β = 256 the Hessian's terms grow like β² and cancel: measured against the whole H·v (one side can be
    # 1e-6 of the other), as the C++ backend, which differs from reference.py by the same amounts.
    scale = max(w.abs().max().item() for w in want[3:])
    assert all((g - w).abs().max().item() <= 1e-10 * scale for g, w in zip(got[3:], want[3:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS + ("info_nce",))
def test_score_mode_low_precision(simt, dtype, form):
    pos, neg, pm, nm = score_data(17, 5, 700, dtype)  # long rows: 22 entries per lane to accumulate
    res = {}
    for name, (p0, n0, ops) in {"exact": (pos.double(), neg.double(), None), "ref": (pos, neg, None),
                                "simt": (pos, neg, simt)}.items():
        p, n = p0.clone().requires_grad_(), n0.clone().requires_grad_()
        loss = _score_fn(form, ops, pm, nm)(p, n)
        res[name] = (loss,) + torch.autograd.grad(loss.sum(), (p, n))
    for g, r, w in zip(res["simt"], res["ref"], res["exact"]):
        assert g.dtype == dtype
        bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(r, w) + ULP[dtype]
        assert rel_err(g, w) <= bound


def test_score_mode_non_contiguous_nan_and_ties(simt):
    base = torch.rand(9, 80, dtype=torch.float64)
    pos, neg = base[:, ::4], base[:, 1::2]  # strided views
    for form in FORMS:
        torch.testing.assert_close(_score_fn(form, simt, None, None)(pos, neg),
                                   _score_fn(form, None, None, None)(pos, neg), rtol=1e-12, atol=1e-14)
    nan_pos = pos.clone()
    nan_pos[1, 0] = float("nan")
    mask = torch.ones_like(nan_pos, dtype=torch.bool)
    mask[2, 0] = False
    nan_pos[2, 0] = float("nan")  # masked: ignored
    rows = _score_fn("weighted", simt, mask, None)(nan_pos, neg)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[torch.arange(9) != 1]).all()
    # Margin statistics: ties spread over lanes share the gradient; a NaN row stays NaN, as torch.amin.
    tied = torch.full((3, 64), 0.5, dtype=torch.float64)
    tied[:, ::5] = 0.25
    tied[2, 33] = float("nan")
    grads = []
    for ops in (simt, None):
        p, n = tied.clone().requires_grad_(), tied.clone().requires_grad_()
        sp, sn = (R.margin_statistics if ops is None else functools.partial(margin_statistics_fused, ops=ops))(p, n)
        grads.append((sp, sn) + torch.autograd.grad((sp * torch.arange(1.0, 4.0)).sum() - sn.sum(), (p, n)))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_score_mode_empty_batch(simt):
    pos, neg = torch.rand(0, 3, dtype=torch.float64), torch.rand(0, 5, dtype=torch.float64)
    for form in FORMS + ("info_nce", "margins"):
        assert _score_fn(form, simt, None, None)(pos, neg).numel() == 0


# ------------------------------------------------------------------------------------------ label mode
def _label_fn(op, ops, **extra):
    """The op as (emb, labels, ref, ref_labels) -> tuple of outputs, on ``ops`` or reference.py (None)."""
    if op == "margins":
        fn = R.margin_statistics_embeddings if ops is None else functools.partial(margin_statistics_embeddings_cpp,
                                                                                  ops=ops)
        return lambda *a: fn(*a, similarity="cosine", **extra)
    if op == "info_nce":
        fn = R.info_nce_embeddings if ops is None else functools.partial(info_nce_embeddings_cpp, ops=ops)
        kw = dict(temperature=0.1, similarity="shifted_cosine", reduction="none")
    else:
        fn = R.oucl_embeddings if ops is None else functools.partial(oucl_embeddings_cpp, ops=ops)
        kw = dict(form=op, beta=32.0, similarity="shifted_cosine", reduction="none", **PARAMS)
    return lambda *a: (fn(*a, **kw, **extra),)


def _label_run(fn, emb, labels, ref, ref_labels, ref_grad=True):
    e = emb.clone().requires_grad_()
    r = None if ref is None else ref.clone().requires_grad_(ref_grad)
    outs = fn(e, labels, r, ref_labels)
    target = sum((o[torch.isfinite(o)] * (k + 1)).sum() for k, o in enumerate(outs))
    wrt = [x for x in (e, r) if x is not None and x.requires_grad]
    return tuple(o.detach() for o in outs) + torch.autograd.grad(target, wrt)


LABEL_OPS = FORMS + ("info_nce", "margins")


@pytest.mark.parametrize("op", LABEL_OPS)
@pytest.mark.parametrize("shape", [(1, None), (7, None), (40, None), (21, 100), (3, 1)])
def test_label_mode_fp64_values_and_gradients(simt, op, shape):
    # Tiles hold 1024 similarities here: B = 40 self-scoring crosses 2 tiles with the self pairs in both;
    # B = 21 against 100 references crosses 3 (48 + 48 + 4 columns).
    emb, labels, ref, ref_labels = label_data(*shape, D=9)
    got = _label_run(_label_fn(op, simt), emb, labels, ref, ref_labels)
    want = _label_run(_label_fn(op, None), emb, labels, ref, ref_labels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("op", FORMS + ("info_nce",))
def test_label_mode_self_offset_and_constant_reference(simt, op):
    # The distributed callers: this rank's rows sit at offset 13 of the gathered reference set (their own
    # pairs excluded), and a memory bank is a constant reference set (the backward skips ∂/∂ref).
    emb, labels, ref, ref_labels = label_data(10, 45, D=6)
    ref[13:23], ref_labels[13:23] = emb, labels
    for ref_grad in (True, False):
        got = _label_run(_label_fn(op, simt, self_offset=13), emb, labels, ref, ref_labels, ref_grad)
        want = _label_run(_label_fn(op, None, self_offset=13), emb, labels, ref, ref_labels, ref_grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ("weighted", "circle", "info_nce"))
def test_label_mode_fp32(simt, op):
    emb, labels, ref, ref_labels = label_data(33, 70, D=16)
    got = _label_run(_label_fn(op, simt), emb.float(), labels, ref.float(), ref_labels)
    want = _label_run(_label_fn(op, None), emb, labels, ref, ref_labels)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert rel_err(g, w) <= 1e-4  # the GEMM reorders sums (DESIGN's fp32 tolerance)


@pytest.mark.parametrize("op", ("squared", "info_nce"))
def test_label_mode_hessian_vector_product(simt, op, monkeypatch):
    # The meta step's path: the second derivative runs row chunks of the scores (here 2 rows of 30) through
    # the emulated score-mode backward and double-backward kernels.
    from metaug_fast._ops import oucl_label

    monkeypatch.setattr(oucl_label, "_CHUNK_SCORES", 60)
    emb, labels, ref, ref_labels = label_data(12, 30, D=5)
    vecs = (torch.randn_like(emb), torch.randn_like(ref))
    out = []
    for ops in (simt, None):
        fn = _label_fn(op, ops)
        inputs = (emb.clone().requires_grad_(), ref.clone().requires_grad_())
        out.append(hvp(lambda e, r: fn(e, labels, r, ref_labels)[0].sum(), inputs, vecs))  # noqa: B023
    (loss, grads, hv), (loss_w, grads_w, hv_w) = out
    torch.testing.assert_close(loss, loss_w, rtol=1e-10, atol=0)
    for g, w in zip(grads + hv, grads_w + hv_w):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_label_mode_empty_batch_and_reference(simt):
    emb, labels, ref, ref_labels = label_data(6, 4, D=3)
    for op in LABEL_OPS:
        assert all(o.numel() == 0 for o in _label_fn(op, simt)(emb[:0], labels[:0], ref, ref_labels))
        # No reference rows: losses 0 with zero gradients, margin statistics ±inf (constants in reference.py).
        run = _label_run if op != "margins" else lambda fn, *a: fn(*a)
        got = run(_label_fn(op, simt), emb, labels, ref[:0], ref_labels[:0])
        want = run(_label_fn(op, None), emb, labels, ref[:0], ref_labels[:0])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
