"""What is specific to the Triton backend, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1,
set in conftest.py); the values, gradients and HVPs of every op are in the contract suite (test_contract.py).
Here: the launchers (grid limits, the tensors' device, int64 offsets, no tensor built from the host per
call, no fused multiply-adds where exactness needs them), label mode allocating nothing of B×M, its second
derivative fused (and in row chunks for the forms without a Hessian kernel), and the GPU block sizes run by
the interpreter. Shapes are small: the interpreter
runs kernels in NumPy."""
import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch._library.triton import set_wrap_triton_enabled

import metaug_fast
import metaug_fast.functional as F
from metaug_fast import reference as R

from helpers import LargestAllocation, hvp, label_data, rel_err, score_data, score_hvp_run

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


# ------------------------------------------------------------------------------------------- label mode
def _label_fn(op, backend, labels, ref_labels, similarity="shifted_cosine", beta=16.0, reduction="none",
              self_offset=None):
    """``op`` as a function of the rows on ``backend``: a backend's name, or a callable taking the op's name
    and arguments as metaug_fast.functional does (the oracle of tests/helpers.py)."""
    call = backend if callable(backend) else lambda name, *a, **k: getattr(F, name)(*a, backend=backend, **k)

    def fn(e, r=None):
        if op == "info_nce":
            return call("info_nce_embeddings", e, labels, r, ref_labels, temperature=1.0 / beta,
                        similarity=similarity, reduction=reduction, self_offset=self_offset)
        if op == "margins":
            return sum(s.clamp(-10, 10).square().sum()
                       for s in call("margin_statistics_embeddings", e, labels, r, ref_labels, similarity=similarity))
        return call("oucl_embeddings", e, labels, r, ref_labels, form=op, beta=beta, similarity=similarity,
                    reduction=reduction, self_offset=self_offset, **PARAMS)
    return fn


def _label_run(fn, emb, ref):
    inputs = (emb.clone().requires_grad_(),) + (() if ref is None else (ref.clone().requires_grad_(),))
    vecs = tuple(torch.randn_like(x) for x in inputs)
    loss, grads, hv = hvp(lambda *xs: fn(*xs).sum(), inputs, vecs)
    return (loss,) + grads + hv


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


@pytest.mark.parametrize("op", ["weighted", "info_nce", "margins"])
def test_label_mode_allocates_nothing_of_b_by_m(op):
    B, M, D = 40, 300, 8
    emb, labels, ref, ref_labels = label_data(B, M, D, dtype=torch.float32)
    e, r = emb.requires_grad_(), ref.requires_grad_()
    with LargestAllocation() as mode:
        _label_fn(op, "triton", labels, ref_labels, reduction="mean")(e, r).sum().backward()
    assert mode.largest <= M * D < B * M


@pytest.mark.parametrize("op", ["hinge", "margins"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_label_mode_second_order_in_row_chunks(monkeypatch, op, with_ref):
    # The forms without a Hessian kernel (the hinge's is zero, the margins' piecewise linear): the second
    # derivative runs the Triton score-mode kernels over row chunks of the scores (60 scores here: 1 row
    # against 60 references, 4 rows without them), never B×M.
    from metaug_fast._ops import label as label_ops

    monkeypatch.setattr(label_ops, "_CHUNK_SCORES", 60)
    B, M = (13, 60) if with_ref else (15, 15)
    emb, labels, ref, ref_labels = label_data(B, M if with_ref else None, D=6)
    torch.manual_seed(1)
    want = _label_run(_label_fn(op, "reference", labels, ref_labels), emb, ref)
    torch.manual_seed(1)
    with LargestAllocation() as mode:
        got = _label_run(_label_fn(op, "triton", labels, ref_labels), emb, ref)
    _close(got, want, 1e-10)
    # The rows' gradients and the [M, 2D] operand of U = [v_z | zn]·[rn | v_r]ᵀ, never the scores.
    assert mode.largest <= 2 * max(B, M) * 6 < B * M


# ------------------------------------------------------------------------- the fused second derivative
HVP_OPS = ["weighted", "squared", "circle", "info_nce"]
# (B, M or None, self_offset): self mode; a reference set; a reference set with excluded pairs j = i + 3. 37
# rows and 45 columns end in ragged 16-tiles; D = 70 takes two 64-feature steps and two output chunks.
HVP_MODES = {"self": (37, None, None), "reference": (37, 45, None), "offset": (37, 45, 3)}


def _hvp_fn(op, backend, labels, ref_labels, self_offset, similarity):
    """``op`` summed over rows on ``backend`` (a name or the oracle), at β = 6 (InfoNCE: τ = 0.2)."""
    return _label_fn(op, backend, labels, ref_labels, similarity, beta=5.0 if op == "info_nce" else 6.0,
                     reduction="sum", self_offset=self_offset)


@pytest.mark.parametrize("op", HVP_OPS)
@pytest.mark.parametrize("mode", list(HVP_MODES))
@pytest.mark.parametrize("similarity", ["shifted_cosine", "cosine"])
def test_fused_hvp_matches_the_oracle_across_tile_edges(op, mode, similarity):
    # Every form with a Hessian, self mode and a reference set (with excluded pairs), in fp64 against the
    # pair-explicit oracle: the loss, both gradients and both Hessian-vector products.
    from helpers import oracle

    B, M, offset = HVP_MODES[mode]
    torch.manual_seed(3)
    emb, labels, ref, ref_labels = label_data(B, M, D=70)
    torch.manual_seed(4)
    want = _label_run(_hvp_fn(op, oracle, labels, ref_labels, offset, similarity), emb, ref)
    torch.manual_seed(4)
    got = _label_run(_hvp_fn(op, "triton", labels, ref_labels, offset, similarity), emb, ref)
    _close(got, want, 1e-11)


@pytest.mark.parametrize("split, D", [(False, 70), (True, 64)])
@pytest.mark.parametrize("op", ["squared", "info_nce"])
def test_fused_hvp_in_one_loop_and_with_unmasked_features(monkeypatch, op, split, D):
    # The FMA dtypes' kernels take every tile as an edge tile, in one loop (SPLIT False); with D a multiple of
    # the feature chunks the interior tiles' loads carry no mask at all (EVEN_D). Both as the oracle, with the
    # excluded pairs crossing tiles and a ragged last tile.
    from metaug_fast.kernels import label_hvp

    from helpers import oracle

    real = label_hvp.tiles
    monkeypatch.setattr(label_hvp, "tiles", lambda dtype, width: {**real(dtype, width), "SPLIT": split})
    B, M, offset = HVP_MODES["offset"]
    torch.manual_seed(6)
    emb, labels, ref, ref_labels = label_data(B, M, D=D)
    out = []
    for impl in (oracle, "triton"):
        torch.manual_seed(8)
        out.append(_label_run(_hvp_fn(op, impl, labels, ref_labels, offset, "cosine"), emb, ref))
    _close(out[1], out[0], 1e-11)


@pytest.mark.parametrize("op", ["circle", "info_nce"])
def test_fused_hvp_in_fp32_and_against_a_constant_reference_set(op):
    # fp32 rows (a memory bank's constant reference set: no gradient and no cotangent for it, and no column
    # kernel) within fp32's error of the fp64 oracle.
    from helpers import oracle

    torch.manual_seed(5)
    emb, labels, ref, ref_labels = label_data(29, 40, D=24)
    vec = torch.randn(29, 24, dtype=torch.float64)

    def hv(impl, dtype):
        e = emb.to(dtype).requires_grad_()
        loss = _hvp_fn(op, impl, labels, ref_labels, None, "cosine")(e, ref.to(dtype))
        (g,) = torch.autograd.grad(loss, e, create_graph=True)
        return torch.autograd.grad((g * vec.to(dtype)).sum(), e)[0]

    want = hv(oracle, torch.float64)
    assert rel_err(hv("triton", torch.float32), want) < 2e-5


@pytest.mark.parametrize("op", ["weighted", "info_nce"])
def test_fused_hvp_runs_its_kernels_and_no_product_of_b_by_m(monkeypatch, op):
    # The second backward launches the three fused kernels and nothing of the row-chunk path: no aten matrix
    # product, and no tensor of B×M (or of a row chunk of it) is allocated.
    from metaug_fast.kernels import label_hvp

    B, M, D = 64, 72, 8
    emb, labels, ref, ref_labels = label_data(B, M, D)
    e, r = emb.requires_grad_(), ref.requires_grad_()
    loss = _hvp_fn(op, "triton", labels, ref_labels, None, "cosine")(e, r)
    grads = torch.autograd.grad(loss, (e, r), create_graph=True)
    dot = sum((g * torch.ones_like(g)).sum() for g in grads)
    launched = []
    real_launch = label_hvp.launch
    monkeypatch.setattr(label_hvp, "launch", lambda kernel, *a, **k: launched.append(kernel.fn.__name__)
                        or real_launch(kernel, *a, **k))

    with LargestAllocation() as mode:
        torch.autograd.grad(dot, (e, r))
    assert launched == ["_hvp_sums_kernel", "_hvp_out_kernel", "_hvp_out_kernel"]
    assert not mode.seen & {"mm", "addmm", "bmm", "matmul", "baddbmm"}, mode.seen
    assert mode.largest <= M * D < B * M


def test_fused_hvp_op_refuses_what_it_cannot_take():
    ops = metaug_fast._backend.REGISTRY["triton"].kernels.ops
    z, lab, inv = torch.randn(4, 3, dtype=torch.float64), torch.arange(4), torch.ones(4, dtype=torch.float64)
    stats = torch.zeros(4, 5, dtype=torch.float64)
    args = (torch.ones(4, dtype=torch.float64), z, inv, z, inv, z, z, lab, lab, stats, 0, 1)
    with pytest.raises(ValueError, match="form 0 has no fused second derivative"):
        ops.oucl_label_hvp(*args, 0, 8.0, 0.0, 0.0, 0.25, 0.0, True)
    mixed = (args[0], z, inv, z.float(), *args[4:])
    with pytest.raises(TypeError, match="one floating dtype"):
        ops.oucl_label_hvp(*mixed, 2, 8.0, 0.0, 0.0, 0.25, 0.0, True)


@pytest.mark.parametrize("op", HVP_OPS)
@pytest.mark.parametrize("mode", ["self", "reference"])
def test_fused_hvp_in_bf16_on_the_tensor_core_path(monkeypatch, op, mode):
    # bf16 rows stay bf16 through the meta step's path: the first derivative is the first-order op on the
    # raw rows (equal to the gradient taken without a graph), and the fused kernels take bf16 operands with
    # fp32 accumulation. Each output within twice reference.py's own bf16 error plus one bf16 ulp of the fp64
    # oracle on the same rounded inputs (docs/accuracy.md).
    from helpers import ULP, oracle

    B, M, _ = HVP_MODES[mode]
    torch.manual_seed(6)
    emb, labels, ref, ref_labels = label_data(B, M, D=24, dtype=torch.bfloat16)
    vecs = [torch.randn(x.shape, dtype=torch.float64) for x in (emb,) + (() if ref is None else (ref,))]

    def run_on(impl, dtype):
        xs = [x.to(dtype).requires_grad_() for x in (emb,) + (() if ref is None else (ref,))]
        loss = _hvp_fn(op, impl, labels, ref_labels, None, "cosine")(*xs)
        grads = torch.autograd.grad(loss, xs, create_graph=True)
        hv = torch.autograd.grad(sum((g * v.to(dtype)).sum() for g, v in zip(grads, vecs)), xs)
        plain = torch.autograd.grad(_hvp_fn(op, impl, labels, ref_labels, None, "cosine")(*xs), xs)
        return [loss.detach(), *[g.detach() for g in grads], *hv], plain

    from metaug_fast.kernels import label_hvp

    exact, _ = run_on(oracle, torch.float64)
    own, _ = run_on("reference", torch.bfloat16)
    rows = []
    real_launch = label_hvp.launch
    monkeypatch.setattr(label_hvp, "launch", lambda kernel, grid, device, e, *a, **k: rows.append(e.dtype)
                        or real_launch(kernel, grid, device, e, *a, **k))
    got, plain = run_on("triton", torch.bfloat16)
    assert rows and set(rows) == {torch.bfloat16}  # the fused kernels took the rows as bf16
    for i, (g, r, w) in enumerate(zip(got, own, exact)):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, w) <= 2 * rel_err(r, w) + ULP[torch.bfloat16], (i, rel_err(g, w), rel_err(r, w))
    for with_graph, without in zip(got[1:1 + len(plain)], plain):
        assert torch.equal(with_graph, without)


def test_backend_rules():
    with pytest.raises(ValueError, match="backend"):
        F.oucl(torch.rand(2, 2), torch.rand(2, 2), backend="trition")
    # auto never sends CPU tensors to the interpreter: it is for tests, not speed
    impls = metaug_fast._backend.REGISTRY["triton"].impls
    for op in ("oucl", "oucl_embeddings", "pairwise_similarity"):
        assert metaug_fast._backend.resolve(op, "auto", torch.device("cpu")) is not impls[op]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_label_mode_with_the_gpu_block_sizes(monkeypatch, dtype):
    # The GPU configuration (64×64 tiles, feature chunks of 64/128, many column splits) run by the
    # interpreter: masks at blocks larger than the data, several chunks of D, splits merged per row.
    from metaug_fast.kernels import label as K

    monkeypatch.setattr(K, "interpreting", lambda: False)
    assert K.config(torch.empty(1, 70, dtype=dtype), 70)[0] in (32, 64)
    emb, labels, ref, ref_labels = label_data(37, 150, D=70, dtype=dtype)
    for op in ("weighted", "info_nce", "margins"):
        torch.manual_seed(1)
        want = _label_run(_label_fn(op, "reference", labels, ref_labels), emb, ref)
        torch.manual_seed(1)
        got = _label_run(_label_fn(op, "triton", labels, ref_labels), emb, ref)
        assert all(rel_err(g, w) <= (1e-10 if dtype == torch.float64 else 1e-5) for g, w in zip(got[:3], want[:3]))


@pytest.mark.parametrize("D,tiles", [(200, (64, 16, 256, 128, True)), (300, (64, 32, 64, 256, False))])
def test_fp16_wide_rows_with_the_gpu_configuration(monkeypatch, D, tiles):
    # D in (128, 256] on a GPU: 64 × 16 tiles in fp16, the row block resident at 256 features, and the
    # outputs in two chunks of 128; D > 256: the scores in 64-feature steps, the outputs in chunks of 256 (the
    # second one ragged here) (kernels/label.config). Run by the interpreter (whose fp16 dot is right) against the
    # reference, loss and gradients, self mode and a reference set.
    from metaug_fast.kernels import label as K

    monkeypatch.setattr(K, "interpreting", lambda: False)
    cfg = K.config(torch.empty(1, D, dtype=torch.float16), D)
    assert (cfg.BM, cfg.BN, cfg.BD, cfg.BDO, cfg.RESIDENT) == tiles
    emb, labels, ref, ref_labels = label_data(70, 90, D=D, dtype=torch.float64)
    def first_order(backend, rl, *inputs):
        xs = [x.clone().requires_grad_() for x in inputs]
        loss = _label_fn("weighted", backend, labels, rl)(*xs).sum()
        return [loss.detach(), *torch.autograd.grad(loss, xs)]

    for r, rl in ((None, None), (ref, ref_labels)):
        inputs = [x.half() for x in ((emb,) if r is None else (emb, r))]
        want = first_order("reference", rl, *inputs)
        exact = first_order("reference", rl, *(x.double() for x in inputs))
        got = first_order("triton", rl, *inputs)
        for g, w, x in zip(got, want, exact):
            assert g.dtype == torch.float16 and rel_err(g, x) <= 2 * rel_err(w, x) + 2.0**-10


@pytest.mark.parametrize("case", ["tiny gradient", "tiny-norm row"])
def test_fp16_backward_keeps_g_within_fp16_range(case):
    # The backward rounds each tile of G (the gradient per pair, times the reference row's inverse norm) to
    # fp16 for the tensor-core product, as on a GPU (GPREC "input", which the interpreter takes too). At large
    # N the per-pair entries are about 1/N², 2.3e-10 at N = 65536, below fp16's smallest subnormal: a
    # gradient of 2^-40 per row stands in for them here. A row of norm 2^-14 makes G·ir overflow instead.
    # Scaled per row by a power of two, the kernels' fp32 gradient matches the same kernels on the same
    # values in fp32 to fp16's rounding of G (2^-11).
    from metaug_fast._ops.label import inverse_norm
    from metaug_fast.contract import LossParams
    from metaug_fast.kernels import label as K

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20, 16, generator=gen, dtype=torch.float64)
    e = torch.cat([z, z + 0.1 * torch.randn(20, 16, generator=gen, dtype=torch.float64)])
    if case == "tiny-norm row":
        e[3] *= 2.0**-14
    e16 = e.half()
    labels = torch.arange(20).repeat(2)
    params = LossParams("weighted", 16.0, 0.0, 0.0, 0.25, 0.0).op_args()
    iz = inverse_norm(e16, False)
    _, stats = K.oucl_label_fwd(e16, iz, e16, iz, labels, labels, 0, 0, *params)
    g = torch.full((40,), 2.0**-40 if case == "tiny gradient" else 1.0, dtype=iz.dtype)
    assert K.config(e16, 16).GPREC == "input"
    de = {}
    for dtype in (torch.float16, torch.float32):
        x = e16.to(dtype)  # self mode: the same rows and norms on both sides
        de[dtype] = K.oucl_label_bwd(g, x, iz, x, iz, labels, labels, stats, 0, 0, *params)[0]
    assert torch.isfinite(de[torch.float16]).all() and (de[torch.float16] != 0).all()
    assert rel_err(de[torch.float16], de[torch.float32]) <= 2.0**-10


@pytest.mark.parametrize("block_b, block_k", [(4, 128), (16, 512)])
def test_score_mode_with_the_gpu_block_sizes(monkeypatch, block_b, block_k):
    # Each configuration of the GPU autotuning space, forced on every score-mode kernel and run by the
    # interpreter (which otherwise uses one configuration).
    import triton

    from metaug_fast.kernels import margins, score

    for kernel in [getattr(K, name) for K in (score, margins) for name in dir(K)]:
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


# ------------------------------------------------------------------------------------------- launchers
class _Recorder:
    """Stands in for a kernel: records the grid of each launch and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def test_similarity_grid_fits_cuda_limits_for_millions_of_reference_rows(monkeypatch):
    from metaug_fast.kernels import _common
    from metaug_fast.kernels import similarity as S

    recorder = _Recorder()
    monkeypatch.setattr(S, "_similarity_kernel", recorder)
    a = torch.randn(3, 4)
    bank = torch.randn(1, 4).expand(5_000_000, 4)  # 5M rows, one row of memory
    F.pairwise_similarity(a, bank, backend="triton")
    (grid,) = recorder.grids
    assert _common.check_grid(grid) == tuple(grid)
    with pytest.raises(ValueError, match="grid axis y of 70000 programs exceeds CUDA's limit of 65535"):
        _common.check_grid((1, 70000))


def test_every_kernel_launch_goes_through_the_device_guard():
    # Triton launches on the current CUDA device: a kernel subscripted directly (kernel[grid](...)) would run
    # on cuda:0 for tensors on cuda:1. Only metaug_fast/kernels/_common.launch may subscript a kernel.
    root = Path(metaug_fast.kernels.__file__).parent
    direct = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                direct.append(f"{path.name}:{node.lineno}")
    launch_line = inspect.getsourcelines(metaug_fast.kernels._common.launch)[1]
    assert all(d.startswith("_common.py:") for d in direct), direct
    assert len(direct) == 1 and int(direct[0].split(":")[1]) > launch_line


def test_launch_makes_the_tensors_device_current(monkeypatch):
    from metaug_fast.kernels import _common

    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    recorder = _Recorder()
    with set_wrap_triton_enabled(False):  # as inside an operator's eager call, where the kernel launches
        _common.launch(recorder, (2, 3), torch.device("cuda", 1))
        _common.launch(recorder, (4,), torch.device("cpu"))  # the interpreter: no guard
    assert entered == [torch.device("cuda", 1)] and recorder.grids == [(2, 3), (4,)]


def _huge_strided(rows: int, cols: int, dtype=torch.float16):
    """A [rows, cols] view whose column stride is 2^30 + 1, so the offset of column 2 passes 2^31: the
    storage is 4 GiB of virtual memory of which only the few pages written are ever touched."""
    stride = 2**30 + 1
    store = torch.empty((cols - 1) * stride + rows, dtype=dtype)
    values = torch.rand(rows, cols, dtype=torch.float64).to(dtype)
    for k in range(cols):
        store[k * stride: k * stride + rows] = values[:, k]
    view = store.as_strided((rows, cols), (1, stride))
    assert torch.equal(view, values)
    return view


def test_offsets_past_int32_in_score_and_label_mode():
    pos, neg = _huge_strided(4, 3), torch.rand(4, 20, dtype=torch.float64).half()
    for fn in (lambda b: F.oucl(pos, neg, reduction="none", backend=b),
               lambda b: F.margin_statistics(pos, neg, backend=b)[0]):
        torch.testing.assert_close(fn("triton"), fn("reference"), rtol=2e-3, atol=1e-3)
    emb = _huge_strided(6, 3)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    torch.testing.assert_close(F.oucl_embeddings(emb, labels, beta=4.0, backend="triton"),
                               F.oucl_embeddings(emb, labels, beta=4.0, backend="reference"), rtol=2e-3, atol=1e-4)


class _HostData(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that make a tensor from Python data (torch.tensor(...)): on a GPU a host-to-device copy
    that synchronizes the stream and cannot be captured by a CUDA graph."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_tensor_is_built_from_host_data_per_call():
    pos, neg, pm, nm = score_data(6, 3, 20)
    emb, labels, ref, ref_labels = label_data(7, 9, D=4)
    with _HostData() as mode:
        for form in ("weighted", "info_nce"):
            score_hvp_run(_score_fn(form, "triton", pm, nm), pos, neg, (torch.ones_like(pos), torch.ones_like(neg)))
            _label_run(_label_fn(form, "triton", labels, ref_labels), emb, ref)
    assert mode.seen == []
    with _HostData() as mode:  # the recorder sees torch.tensor
        torch.tensor([1.0, 2.0])
    assert mode.seen


def test_memory_bank_scores_with_triton():
    from metaug_fast.metaug.bank import MemoryBank

    bank = MemoryBank(n_data=40, dim=6, views=1)
    z, labels = torch.randn(5, 6), torch.randint(0, 4, (5,))
    bank_labels = torch.randint(0, 4, (40,))
    kw = dict(form="circle", beta=32.0, similarity="cosine")
    torch.testing.assert_close(bank.score_all(0, z, labels, bank_labels, backend="triton", **kw),
                               bank.score_all(0, z, labels, bank_labels, backend="reference", **kw),
                               rtol=1e-5, atol=1e-6)


def _compiled(code: str) -> dict:
    """``code`` run with tools.check_triton_compile in a subprocess (the interpreter, on in this process,
    replaces the compiler); each line it prints is a name and a value."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", "from tools.check_triton_compile import *\n" + code], env=env,
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(line.split() for line in run.stdout.splitlines())


def _fusable_in_ptx(kernels, fp_fusion):
    """How many multiplies/adds of each fp32 score kernel (weighted form, masks), compiled for sm_90 without
    a GPU, are fused or may be fused into FMAs; ``fp_fusion`` None compiles with its launcher's options."""
    return _compiled(
        f"for k in {list(kernels)!r}:\n"
        "    job = Job('score', k, 'float32', dict(FORM=2, HAS_PM=True, HAS_NM=True, BLOCK_B=16, BLOCK_K=128))\n"
        f"    opts = {{}} if {fp_fusion!r} is None else dict(enable_fp_fusion={fp_fusion!r})\n"
        "    ptx = compile_job(job, 90, **opts).asm['ptx']\n"
        "    print(k, contractible(ptx) + ptx.count('fma.rn.f32'))\n")


def test_score_kernels_are_compiled_without_fused_multiply_adds():
    # The interpreter has no FMA contraction, so this is checked on the code compiled for the GPU.
    kernels = ("_score_fwd_kernel", "_score_bwd_kernel", "_score_bwd_bwd_kernel")
    assert int(_fusable_in_ptx(kernels[2:], True)[kernels[2]]) > 100  # what Triton does by default
    assert _fusable_in_ptx(kernels, None) == {k: "0" for k in kernels}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hvp_products_stay_rounded_when_compiled_with_fusion(dtype):
    # torch.compile before torch 2.14 launches a traced kernel without its enable_fp_fusion=False: the
    # double backward's cancellation-critical products (kernels/_common.mul_rn, inline PTX) must stay
    # separately rounded there. libdevice's mul_rn, tried first, came out as 0 here: LLVM makes it a plain
    # multiply and contracts it. Per thread: 2 entries of a 4 × 128 block on 256 threads, 2 sites per side.
    counts = _compiled(
        f"for form in (2, 4):\n"
        f"    job = Job('score', '_score_bwd_bwd_kernel', {dtype!r}, dict(FORM=form, HAS_PM=True, HAS_NM=True,\n"
        "              BLOCK_B=4, BLOCK_K=128, num_warps=8))\n"
        "    print(form, pinned(compile_job(job, 90, enable_fp_fusion=True).asm['ptx']))\n")
    assert int(counts["2"]) >= 8 and int(counts["4"]) >= 4, counts


def test_label_tile_configuration_override():
    # What the GPU check's tile sweep uses: every label kernel launch takes the overridden tiles and warps,
    # results unchanged; unknown fields and tiles that tl.dot cannot take are refused.
    from metaug_fast.kernels import label as K

    emb, labels, ref, ref_labels = label_data(37, 50, D=20)
    torch.manual_seed(1)  # the same directions for both HVPs
    want = _label_run(_label_fn("weighted", "reference", labels, ref_labels), emb, ref)
    with K.override(BM=32, BN=16, BDO=16, num_warps=8):
        assert K.config(emb, 20)[:2] == (32, 16) and K.config(emb, 20).num_warps == 8
        torch.manual_seed(1)
        got = _label_run(_label_fn("weighted", "triton", labels, ref_labels), emb, ref)
    assert K.config(emb, 20)[:2] == (16, 16)  # restored
    _close(got, want, 1e-10)
    with pytest.raises(ValueError, match="unknown label kernel configuration fields"):
        with K.override(BK=64):
            pass
    with pytest.raises(ValueError, match="BM must be a power of two >= 16"):
        with K.override(BM=48):
            pass


@pytest.mark.parametrize("with_ref", [False, True])
def test_hinge_row_kernel_takes_its_own_row_blocks(with_ref):
    # The hinge's backward row kernel runs 64-row blocks with 8 warps under 128-row tiles (it sat at the
    # register cap with 128): its grid follows its own BM and BN, the forward keeps 128, results unchanged.
    from metaug_fast.contract import Form
    from metaug_fast.kernels import label as K

    emb, labels, ref, ref_labels = label_data(150, 70 if with_ref else None, D=12)
    torch.manual_seed(1)
    want = _label_run(_label_fn("hinge", "reference", labels, ref_labels), emb, ref)
    with K.override(BM=128, BN=32, num_warps=4):
        cfg = K.config(emb, 12)
        assert (K.rows_meta(cfg, Form.HINGE)["BM"], K.rows_meta(cfg, Form.HINGE)["num_warps"]) == (64, 8)
        assert K.rows_meta(cfg, Form.WEIGHTED)["BM"] == 128
        torch.manual_seed(1)
        got = _label_run(_label_fn("hinge", "triton", labels, ref_labels), emb, ref)
    _close(got, want, 1e-10)


def test_backward_kernels_take_fewer_columns_where_they_ran_out_of_registers():
    # The GPU configurations the compile check found at the register cap or spilling (Triton 3.6): fp32/fp64
    # self-mode row kernels (TWO_WAY) take half the columns and 8 warps, cross mode's column kernel half
    # the columns. The launchers size their grids from these metas
    # (test_hinge_row_kernel_takes_its_own_row_blocks, the fp16 wide-row test).
    from metaug_fast.contract import Form
    from metaug_fast.kernels import label as K

    fp32 = K.Config(32, 32, 16, 32, "ieee", "ieee", False, False)
    meta = K.rows_meta(fp32, Form.WEIGHTED, True)
    assert (meta["BN"], meta["num_warps"]) == (16, 8)
    assert K.rows_meta(fp32, Form.WEIGHTED)["BN"] == 32
    half = K.Config(128, 64, 128, 128, "tf32", "input", False, True, num_warps=8)
    assert K.cols_meta(half, Form.WEIGHTED)["BN"] == 64 and K.cols_meta(half, Form.INFONCE, True)["BN"] == 32


@pytest.mark.parametrize("with_ref", [False, True])
def test_label_mode_streams_wide_rows_in_feature_chunks(with_ref):
    # Rows wider than the resident limit (forced here: RESIDENT off, 16-feature steps) take the similarity's
    # K loop (3 steps), and the backward's outputs come in 2 feature chunks whose ∂iz parts are summed; with
    # one row block and 2 chunks, the row kernel also splits the 3 column tiles of the reference set in 2.
    from metaug_fast.kernels import label as K

    emb, labels, ref, ref_labels = label_data(13, 40 if with_ref else None, D=40)
    for op in ("weighted", "info_nce", "margins"):
        torch.manual_seed(1)
        want = _label_run(_label_fn(op, "reference", labels, ref_labels), emb, ref)
        with K.override(RESIDENT=False, BD=16, BDO=32):
            torch.manual_seed(1)
            got = _label_run(_label_fn(op, "triton", labels, ref_labels), emb, ref)
        _close(got, want, 1e-10)
    with pytest.raises(ValueError, match="RESIDENT needs BD >= D = 40"), K.override(BD=16):
        K.config(emb, 40)


def test_self_mode_backward_is_one_kernel_of_g_plus_g_transposed(monkeypatch):
    # Without a reference set S is symmetric: the row kernel takes H = G + Gᵀ and the column kernel does not
    # run (margins excepted: their ties need the forward's own tile orientation); results as reference.py.
    from metaug_fast.kernels import label as K

    launched = []
    real = K.launch
    monkeypatch.setattr(K, "launch", lambda kernel, *a, **kw: (launched.append(kernel), real(kernel, *a, **kw))[1])
    emb, labels, _, _ = label_data(37, None, D=12)
    for op in ("weighted", "hinge", "info_nce", "margins"):
        launched.clear()
        torch.manual_seed(1)
        want = _label_run(_label_fn(op, "reference", labels, None), emb, None)
        torch.manual_seed(1)
        got = _label_run(_label_fn(op, "triton", labels, None), emb, None)
        _close(got, want, 1e-10)
        assert (K._label_bwd_cols_kernel in launched) == (op == "margins"), op


def test_info_nce_positive_sweep_visits_the_tiles_of_its_classes_only():
    # Single-positive batches (two views): each block of class-sorted rows meets its positives in at most
    # two column tiles of the class-sorted reference rows, against all of them before.
    from metaug_fast.kernels import label as K

    labels = torch.randperm(200)[:100].repeat(2)
    lab, rlab = K.dense_labels(labels, labels)
    lab_s, rlab_s = lab.sort().values, rlab.sort().values
    tiles = K.positive_tiles(lab_s, rlab_s, 16, 16)
    assert tiles.shape == (13, 2) and tiles.dtype == torch.int32
    assert ((tiles[:, 1] - tiles[:, 0]) <= 2).all() and (tiles[:, 1] > tiles[:, 0]).all()
    for b, (t0, t1) in enumerate(tiles.tolist()):  # every positive of the block lies inside its range
        block = lab_s[16 * b:16 * b + 16]
        cols = torch.nonzero(torch.isin(rlab_s, block)).flatten()
        assert t0 * 16 <= cols.min() and cols.max() < t1 * 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ieee_gemm_of_the_second_derivative(dtype):
    # kernels/matmul.mm: offset + α·a·b (+ c) with IEEE products, any strides (the chunk loop passes Gᵀ and
    # rnᵀ as views), ragged tiles, an empty K; what _ops/label.py's second derivative takes on CUDA for every
    # backend and for the Triton ops everywhere, and torch's GEMM for the C++ ops on the CPU.
    from metaug_fast._ops import label as label_ops
    from metaug_fast.backends import cpp as cpp_backend
    from metaug_fast.backends import triton as triton_backend
    from metaug_fast.kernels.matmul import mm

    a, b, c = torch.randn(37, 50, dtype=dtype), torch.randn(29, 50, dtype=dtype).T, torch.randn(29, 37, dtype=dtype).T
    want = 0.25 + 0.5 * (a.double() @ b.double()) + c.double()
    got = mm(a, b, c, 0.5, 0.25)
    assert got.dtype == dtype and got.is_contiguous() and rel_err(got, want) <= (1e-6 if dtype == torch.float32
                                                                                 else 1e-14)
    assert torch.equal(mm(a[:, :0], b[:0], None, 1.0, 0.5), torch.full((37, 29), 0.5, dtype=dtype))
    with pytest.raises(TypeError, match="float32 or float64"):
        mm(a.bfloat16(), b.bfloat16(), None, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"a \[M, K\] and b \[K, N\]"):
        mm(a, a, None, 1.0, 0.0)
    assert label_ops._gemm(triton_backend.KERNELS, torch.device("cpu")) is mm
    assert label_ops._gemm(cpp_backend.KERNELS, torch.device("cuda")) is mm
    assert label_ops._gemm(cpp_backend.KERNELS, torch.device("cpu")) is label_ops._torch_mm
    torch.testing.assert_close(label_ops._torch_mm(a, b, c, 0.5, 0.25), got, rtol=1e-5, atol=1e-5)


def test_ieee_gemm_is_differentiable_at_every_order():
    # The similarity's backward takes the IEEE GEMM and must stay differentiable (second order through it).
    from metaug_fast.kernels.matmul import mm

    a, b, c = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((7, 5), (5, 9), (7, 9)))
    torch.autograd.gradcheck(lambda a, b, c: mm(a, b, c, 0.5, 0.25), (a, b, c))
    torch.autograd.gradgradcheck(lambda a, b, c: mm(a, b, c, 0.5, 0.25), (a, b, c))
    sim = lambda x, y: F.pairwise_similarity(x, y, similarity="cosine", backend="triton")
    x, y = (torch.randn(6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch.autograd.gradgradcheck(sim, (x, y))


def test_a_kernel_refuses_a_form_id_it_does_not_know():
    # An id that is not a form fell through to the weighted form's exponents; it is refused when the kernel
    # is specialized (tl.static_assert: a compile error on a GPU, an interpreter error here).
    from metaug_fast.kernels import score

    p, n = torch.rand(3, 4), torch.rand(3, 5)
    with pytest.raises(Exception, match="not a smooth OUCL form id"):
        score.oucl_score_fwd(p, n, None, None, 7, 8.0, 0.1, -0.1, 0.3, 0.2)
