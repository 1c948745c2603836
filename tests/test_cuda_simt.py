"""What is specific to the CUDA kernels (csrc/cuda/score.cu, label.cu) run on this CPU by the SIMT emulator of
csrc/cuda/simt/ (the kernel source compiled as host C++, every CUDA thread a fiber, warp shuffles and votes
evaluated when the whole warp reaches them; a lane that skips or diverges is an error). The contract suite
(test_contract.py, entry cuda_simt) runs these kernels through the whole grid; here: the emulator's own
checks, label tiling across several tiles (1024 elements a tile here), self mode's square tiles, the second
derivative in row chunks,
and every emulated test again under AddressSanitizer. What they cannot cover: timing, memory coalescing,
races between warps, and cuBLAS (the label GEMMs run on the CPU here); a GPU run does that."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaug_fast import reference as R
from metaug_fast._ops.label import (
    LabelKernels,
    info_nce_embeddings_fused,
    margin_statistics_embeddings_fused,
    oucl_embeddings_fused,
)
from metaug_fast.contract import Form

from backends import ASAN, asan_preload, simt_kernels, simt_ops
from helpers import FORMS, LargestAllocation, hvp, label_data, rel_err

PARAMS = dict(gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)


@pytest.fixture(scope="module")
def simt():
    return simt_ops()


@pytest.mark.skipif(ASAN, reason="this is the test that runs the others under AddressSanitizer")
def test_kernels_stay_in_bounds():
    """Every other test of this file and the contract suite's cuda_simt entries, with the kernels built with
    AddressSanitizer (a GPU would read garbage or fault at an illegal address; here the run stops at the first
    access outside the tensors). They run only here where the sanitizer is installed (conftest.py skips
    them in this process), in this process where it is not."""
    preload = asan_preload()
    if preload is None:
        pytest.skip("gcc's AddressSanitizer runtime is not installed")
    env = dict(os.environ, METAUG_SIMT_ASAN="1", LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0")
    # -s: an ASan report is written to the process's stderr, which pytest's capture would swallow.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", __file__,
                          str(Path(__file__).with_name("test_contract.py"))],
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


# ------------------------------------------------------------------------------------------ label mode
def _label_fn(op, ops, **extra):
    """The op as (emb, labels, ref, ref_labels) -> tuple of outputs, on ``ops`` (an op namespace, or
    LabelKernels with their capabilities) or reference.py (None)."""
    kernels = ops if isinstance(ops, LabelKernels) else LabelKernels(ops)

    def pick(reference, fused):
        return reference if ops is None else functools.partial(fused, kernels=kernels)

    if op == "margins":
        fn = pick(R.margin_statistics_embeddings, margin_statistics_embeddings_fused)
        return lambda *a: fn(*a, similarity="cosine", **extra)
    if op == "info_nce":
        fn = pick(R.info_nce_embeddings, info_nce_embeddings_fused)
        kw = dict(temperature=0.1, similarity="shifted_cosine", reduction="none")
    else:
        fn = pick(R.oucl_embeddings, oucl_embeddings_fused)
        kw = dict(form=op, beta=32.0, similarity="shifted_cosine", reduction="none", **PARAMS)
    kw.update(extra)
    return lambda *a: (fn(*a, **kw),)


def _label_run(fn, emb, labels, ref, ref_labels, ref_grad=True):
    e = emb.clone().requires_grad_()
    r = None if ref is None else ref.clone().requires_grad_(ref_grad)
    outs = fn(e, labels, r, ref_labels)
    target = sum((o[torch.isfinite(o)] * (k + 1)).sum() for k, o in enumerate(outs))
    wrt = [x for x in (e, r) if x is not None and x.requires_grad]
    return tuple(o.detach() for o in outs) + torch.autograd.grad(target, wrt)


LABEL_OPS = FORMS + ("info_nce", "margins")


@pytest.mark.parametrize("op", LABEL_OPS)
@pytest.mark.parametrize("shape", [(40, None), (21, 100)])
def test_label_mode_fp64_values_and_gradients(simt, op, shape):
    # Tiles hold 1024 similarities here: B = 40 self-scoring crosses 2 tiles with the self pairs in both;
    # B = 21 against 100 references crosses 3 (48 + 48 + 4 columns).
    emb, labels, ref, ref_labels = label_data(*shape, D=9)
    got = _label_run(_label_fn(op, simt), emb, labels, ref, ref_labels)
    want = _label_run(_label_fn(op, None), emb, labels, ref, ref_labels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("form", list(Form))
def test_self_mode_square_tiles_equal_the_rectangular_path(simt, form):
    # rn aliasing zn takes the symmetric path (square tiles of 32 rows here: 40 rows are a full block and a
    # partial diagonal one) and returns the whole gradient first; a copy of zn takes the rectangular one.
    zn = torch.nn.functional.normalize(torch.randn(40, 7, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (40,))
    args = (0, 0, form, 16.0, 0.1, -0.05, 0.25, 0.2)
    one = torch.ones(40, dtype=torch.float64)
    rows_s, stats_s = simt.oucl_label_fwd(zn, one, zn, one, labels, labels, *args)
    rows_r, stats_r = simt.oucl_label_fwd(zn, one, zn.clone(), one.clone(), labels, labels.clone(), *args)
    torch.testing.assert_close(rows_s, rows_r, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(stats_s, stats_r, rtol=1e-12, atol=1e-300, equal_nan=True)
    g = torch.rand((40, 2) if form == Form.MARGIN else (40,), dtype=torch.float64)
    gz_s, _, gr_s, _ = simt.oucl_label_bwd(g, zn, one, zn, one, labels, labels, stats_s, *args)
    gz_r, _, gr_r, _ = simt.oucl_label_bwd(g, zn, one, zn.clone(), one.clone(), labels, labels.clone(), stats_r, *args)
    assert gr_s.shape == (0, 7)
    torch.testing.assert_close(gz_s, gz_r + gr_r, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("op", ("squared", "info_nce"))
def test_label_mode_hessian_vector_product_in_row_chunks(simt, op, monkeypatch):
    # Ops without the fused second derivative (the bare op namespace, no capabilities) run it in row chunks
    # of the scores (here 2 rows of 30) through the emulated score-mode backward and double-backward kernels.
    from metaug_fast._ops import label as label_ops

    monkeypatch.setattr(label_ops, "_CHUNK_SCORES", 60)
    emb, labels, ref, ref_labels = label_data(12, 30, D=5)
    vecs = (torch.randn_like(emb), torch.randn_like(ref))
    out = []
    for ops in (simt, None):
        fn = _label_fn(op, ops)
        inputs = (emb.clone().requires_grad_(), ref.clone().requires_grad_())
        out.append(hvp(lambda e, r: fn(e, labels, r, ref_labels)[0].sum(), inputs, vecs))
    (loss, grads, hv), (loss_w, grads_w, hv_w) = out
    torch.testing.assert_close(loss, loss_w, rtol=1e-10, atol=0)
    for g, w in zip(grads + hv, grads_w + hv_w):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- the fused second derivative
HVP_OPS = FORMS[1:] + ("info_nce",)  # the forms with a Hessian (contract.HVP_FORMS)
# (B, M or None, self_offset, reference rows differentiated): self mode over square tiles of 32 (40 rows: a
# full block and a ragged diagonal one); 21 rows against 100 references in column tiles of 48 + 48 + 4; a
# rank's rows inside a gathered batch (anchor i is reference row i + 13); a constant reference set.
HVP_MODES = {"self": (40, None, None, True), "reference": (21, 100, None, True), "offset": (10, 45, 13, True),
             "constant": (21, 100, None, False)}


@pytest.fixture(scope="module")
def fused():
    return simt_kernels()


def _hvp_run(op, kernels, mode, dtype=torch.float64, similarity="shifted_cosine"):
    """(loss, gradients, Hessian-vector products) of ``op`` summed over rows in HVP_MODES[mode]."""
    B, M, offset, ref_grad = HVP_MODES[mode]
    torch.manual_seed(7)
    emb, labels, ref, ref_labels = label_data(B, M, D=9)
    if offset is not None:
        ref[offset:offset + B], ref_labels[offset:offset + B] = emb, labels
    extra = {} if offset is None else dict(self_offset=offset)
    fn = _label_fn(op, kernels, similarity=similarity, **extra)
    inputs = [emb.to(dtype).requires_grad_()]
    if ref is not None and ref_grad:
        inputs.append(ref.to(dtype).requires_grad_())
    const = None if ref is None or ref_grad else ref.to(dtype)
    vecs = [torch.randn(x.shape, dtype=torch.float64).to(dtype) for x in inputs]

    def loss(*xs):
        r = xs[1] if len(xs) > 1 else const
        return fn(xs[0], labels, r, ref_labels)[0].sum()

    return hvp(loss, inputs, vecs)


@pytest.mark.parametrize("op", HVP_OPS)
@pytest.mark.parametrize("mode", list(HVP_MODES))
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine"])
def test_fused_hvp_matches_the_oracle_across_tile_edges(fused, op, mode, similarity):
    # The CUDA backend's oucl_label_hvp (cuBLAS tiles of S and U, the sums, rows and apply kernels) for every
    # form with a Hessian, in fp64 against reference.py: loss, gradients and Hessian-vector products.
    (loss, grads, hv), (loss_w, grads_w, hv_w) = (_hvp_run(op, k, mode, similarity=similarity) for k in (fused, None))
    torch.testing.assert_close(loss, loss_w, rtol=1e-11, atol=0)
    for g, w in zip(grads + hv, grads_w + hv_w):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("op", ("circle", "info_nce"))
def test_fused_hvp_in_fp32(fused, op):
    # fp32 rows: the tiles, the kernels and the GEMMs in fp32, within fp32's error of the fp64 oracle.
    _, _, hv = _hvp_run(op, fused, "reference", torch.float32)
    _, _, hv_w = _hvp_run(op, None, "reference")
    for h, w in zip(hv, hv_w):
        assert rel_err(h.double(), w) < 2e-5


@pytest.mark.parametrize("mode", ("self", "reference"))
def test_fused_hvp_runs_one_op_and_no_product_of_b_by_m(fused, mode):
    # The second backward calls the fused op and nothing of the row-chunk path: no aten matrix product, no
    # score-mode op and no tensor of B×M (or of a row chunk of it) outside the op, whose own tiles hold
    # 1024 scores here (32 × 32 in self mode), under B×M.
    B, M, _, _ = HVP_MODES[mode]
    emb, labels, ref, ref_labels = label_data(B, M, D=9)
    xs = [emb.requires_grad_()] + ([] if ref is None else [ref.requires_grad_()])
    loss = _label_fn("weighted", fused)(xs[0], labels, ref, ref_labels)[0].sum()
    grads = torch.autograd.grad(loss, xs, create_graph=True)
    dot = sum(g.sum() for g in grads)

    with LargestAllocation() as mode_:
        torch.autograd.grad(dot, xs)
    assert "oucl_label_hvp" in mode_.seen, mode_.seen
    assert not mode_.seen & {"mm", "addmm", "bmm", "matmul", "oucl_score_bwd", "oucl_score_bwd_bwd"}, mode_.seen
    assert mode_.largest <= (B if ref is None else M) * 9 < B * (M or B)


def test_fused_hvp_op_refuses_what_it_cannot_take(simt):
    emb, labels, ref, ref_labels = label_data(6, 8, D=4)
    one_b, one_m = torch.ones(6, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    stats = torch.zeros(6, 5, dtype=torch.float64)
    g = torch.ones(6, dtype=torch.float64)
    args = (g, emb, one_b, ref, one_m, emb, ref, labels, ref_labels, stats, -1, 0)
    with pytest.raises(ValueError, match="form 0 has no fused second derivative"):
        simt.oucl_label_hvp(*args, 0, 8.0, 0.0, 0.0, 0.25, 0.0, True)
    with pytest.raises(RuntimeError, match="cotangents v_z"):
        simt.oucl_label_hvp(g, emb, one_b, ref, one_m, ref, ref, labels, ref_labels, stats, -1, 0, 2, 8.0, 0.0, 0.0,
                            0.25, 0.0, True)
