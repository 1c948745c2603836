"""The fused ops under torch.compile: every C++/CUDA op passes torch.library.opcheck (schema, fake
implementation, autograd registration, AOT dispatch with dynamic shapes), and OUCLLoss in both modes and every
drop-in class of metaug_fast.losses compile with fullgraph=True to the values and gradients of eager."""
import pytest
import torch

import metaug_fast
import metaug_fast.functional as F
from metaug_fast.contract import HVP_FORMS, Form, LossParams

from conftest import requires_cpp

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cuda" and "cuda" not in metaug_fast.available_backends():
        pytest.skip("the CUDA extension is not built")
    return device


def _op_cases(device, dtype):
    """(op name, arguments) for every kernel op, with the statistics their backward takes from a forward."""
    ops = torch.ops.metaug_fast
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    p, n = rand(7, 3), rand(7, 11)
    pm, nm = (torch.rand(7, 3, generator=gen) > 0.3).to(device), (torch.rand(7, 11, generator=gen) > 0.2).to(device)
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    g = torch.rand(7, generator=gen, dtype=torch.float64).to(device=device, dtype=acc)
    g_label = torch.rand(9, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    cases = []
    for params in (LossParams("circle", 16.0).op_args(), LossParams.info_nce(0.1), LossParams("hinge").op_args()):
        _, stats = ops.oucl_score_fwd(p, n, pm, nm, *params)
        cases += [("oucl_score_fwd", (p, n, pm, nm, *params)), ("oucl_score_bwd", (g, p, n, pm, nm, stats, *params))]
        if params[0] != 0:
            cases.append(("oucl_score_bwd_bwd", (g, rand(7, 3), rand(7, 11), p, n, pm, nm, stats, *params)))
        if device == "cpu":
            cases.append(("oucl_score_fwd_grad", (p, n, pm, nm, g, *params)))
    stats = ops.margin_score_fwd(p, n, pm, nm)
    cases += [("margin_score_fwd", (p, n, None, nm)), ("margin_score_bwd", (torch.stack([g, g], 1), p, n, pm, nm,
                                                                            stats))]
    if dtype not in (torch.float32, torch.float64):
        return cases
    # Label mode takes raw rows and their inverse norms.
    ze, re_ = rand(9, 5), rand(13, 5)
    iz, ir = 1 / ze.norm(dim=1), 1 / re_.norm(dim=1)
    labels = (torch.arange(9) % 3).to(device)
    ref_labels = (torch.arange(13) % 4).to(device)
    for params in (LossParams("weighted").op_args(), LossParams.info_nce(0.2)):
        for rows, lab, rlab, offset in (((ze, iz, ze, iz), labels, labels, 0),
                                        ((ze, iz, re_, ir), labels, ref_labels, -1)):
            args = (*rows, lab, rlab, offset, 0, *params)
            _, stats = ops.oucl_label_fwd(*args)
            cases += [("oucl_label_fwd", args)]
            for ref_grad in (True, False):
                cases.append(("oucl_label_bwd", (g_label, *rows, lab, rlab, stats, offset, 0, *params, ref_grad)))
            if params[0] in HVP_FORMS and device == "cuda":
                cases += [("oucl_label_hvp", a) for a in _hvp_cases(g_label, rows, lab, rlab, stats, offset, params)]
            if device == "cpu":
                cases.append(("oucl_label_fwd_grad", args))
                z, r = rows[0] * rows[1][:, None], rows[2] * rows[3][:, None]
                s = z @ r.T * 0.5 + 0.5
                t = torch.rand_like(s)
                sums, _ = ops.oucl_label_rows_hvp_sums(t, s, lab, rlab, stats, 0, offset, *params)
                cases += [("oucl_label_rows_hvp_sums", (t, s, lab, rlab, stats, 0, offset, *params))]
                cases += [("oucl_label_rows_bwd_bwd", (g_label, t, s, lab, rlab, stats, 0, offset, *params, given))
                          for given in (None, sums)]
                if offset == 0:
                    cases.append(("oucl_label_self_bwd_bwd", (g_label, z, torch.randn_like(z), lab, stats, 0, *params)))
        if params[0] == Form.INFONCE:  # cross mode runs InfoNCE
            args = (ze, iz, re_, ir, labels, ref_labels, 0, *params)
            _, stats_z, _, stats_r = ops.oucl_label_cross_fwd(*args)
            g_ref = torch.rand(13, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            cases += [("oucl_label_cross_fwd", args),
                      ("oucl_label_cross_bwd", (g_label, g_ref, ze, iz, re_, ir, labels, ref_labels, stats_z, stats_r,
                                                0, *params))]
    return cases


def _hvp_cases(g, rows, labels, ref_labels, stats, offset, params):
    """oucl_label_hvp's arguments with and without the reference rows' cotangent and gradient (in self mode
    v_r is v_z itself, as the backward passes it)."""
    e, r = rows[0], rows[2]
    v_z = torch.randn_like(e)
    v_r = v_z if offset == 0 else torch.randn_like(r)
    head = (g, *rows)
    tail = (labels, ref_labels, stats, offset, 0, *params)
    return [(*head, v_z, v_r, *tail, True), (*head, v_z, v_r[:0], *tail, False)]


# Ops with kernels on CUDA only: opcheck takes them on a GPU; here their fake is checked against the kernel
# under the SIMT emulator.
CUDA_ONLY = {"oucl_label_hvp"}


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_every_op_passes_opcheck(device, dtype):
    device = _device(device)
    seen = set()
    for name, args in _op_cases(device, dtype):
        result = torch.library.opcheck(getattr(torch.ops.metaug_fast, name), args)
        assert set(result.values()) == {"SUCCESS"}, (name, result)
        seen.add(name)
    if dtype == torch.float64 and device == "cpu":
        from metaug_fast._ops import fake

        assert seen == {fn.__name__ for fn in fake.OPS} - CUDA_ONLY  # every op with a fake implementation

    if dtype == torch.float64 and device == "cuda":
        assert CUDA_ONLY <= seen


@requires_cpp
def test_cuda_only_ops_fakes_match_their_emulated_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from metaug_fast._ops import fake

    from backends import simt_ops

    simt = simt_ops()
    cases = [(name, a) for name, a in _op_cases("cpu", torch.float64) if name == "oucl_label_fwd"]
    checked = 0
    for _, args in cases:
        rows, (lab, rlab, offset), params = args[:4], args[4:7], args[8:]
        if params[0] not in HVP_FORMS:
            continue
        _, stats = simt.oucl_label_fwd(*args)
        g = torch.rand(rows[0].shape[0], dtype=torch.float64)
        for hvp_args in _hvp_cases(g, rows, lab, rlab, stats, offset, params):
            real = simt.oucl_label_hvp(*hvp_args)
            with FakeTensorMode(allow_non_fake_inputs=True):
                shaped = fake.oucl_label_hvp(*hvp_args)
            assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in shaped]
            checked += 1
    assert checked == 8


def _compare(fn, inputs, rtol=1e-5, atol=1e-6):
    torch._dynamo.reset()
    outs = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        loss = f(*leaves)
        outs.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for i, (got, want) in enumerate(zip(outs[1], outs[0])):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"output {i}: {m}")


@requires_cpp
@pytest.mark.timeout(300)
def test_library_api_compiles_with_fullgraph():
    gen = torch.Generator().manual_seed(1)
    p, n = torch.rand(64, 6, generator=gen), torch.rand(64, 100, generator=gen)
    e, r = torch.randn(64, 16, generator=gen), torch.randn(40, 16, generator=gen)
    y, ry = torch.arange(64) % 16, torch.arange(40) % 20
    tau = torch.tensor(0.1)
    circle = metaug_fast.OUCLLoss(form="circle", beta=32.0)

    def step(p, n, e, r, tau):
        return (circle(p, n) + circle.embeddings(e, y) + metaug_fast.OUCLLoss().embeddings(e, y, r, ry)
                + F.info_nce_embeddings(e, y, temperature=tau, average="pair")
                + F.info_nce(p, n, temperature=tau))

    _compare(step, (p, n, e, r, tau))


@requires_cpp
@pytest.mark.timeout(300)
def test_drop_in_classes_compile_with_fullgraph():
    pytest.importorskip("open_clip")
    pytest.importorskip("lightly")
    from metaug_fast.losses import lightly, official, open_clip, pml

    gen = torch.Generator().manual_seed(2)
    e, r = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    y = torch.arange(32) % 8
    scores = torch.rand(32, 9, generator=gen) * 2 - 1
    losses = (pml.CircleLoss(), pml.NTXentLoss(), open_clip.ClipLoss(), lightly.NTXentLoss(), official.CircleLoss())

    def step(e, r, scale, scores):
        circle, ntxent, clip, simclr, criterion = losses
        outs = [scores[:, None, :, None].expand(32, 6, 9, 1)[:, k] for k in range(6)]
        return circle(e, y) + ntxent(e, y) + clip(e, r, scale.exp()) + simclr(e, r) + criterion(*outs)

    _compare(step, (e, r, torch.tensor(2.0), scores))


@requires_cpp
@pytest.mark.timeout(300)
def test_lightly_memory_bank_compiles_with_fullgraph():
    # The bank's write (a buffer mutated in place) inside the compiled graph: values, gradients and the bank
    # itself stay those of eager over steps that wrap around.
    pytest.importorskip("lightly")
    from metaug_fast.losses import lightly

    torch._dynamo.reset()
    modules = []
    for _ in range(2):
        torch.manual_seed(3)
        modules.append(lightly.NTXentLoss(memory_bank_size=(24, 16)))
    eager, compiled = modules[0], torch.compile(modules[1], fullgraph=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        x, z = torch.randn(10, 16, generator=gen), torch.randn(10, 16, generator=gen)
        results = []
        for fn in (eager, compiled):
            a, b = x.clone().requires_grad_(), z.clone().requires_grad_()
            loss = fn(a, b)
            results.append([loss.detach(), *torch.autograd.grad(loss, (a, b))])
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(modules[1].bank, modules[0].bank)
        assert modules[1].bank_ptr.tolist() == modules[0].bank_ptr.tolist()


@requires_cpp
def test_label_ops_under_autocast():
    # Under bf16 autocast the label ops' GEMMs stay in the rows' fp32 (their autocast rule): the same loss,
    # gradients and HVP as outside autocast.
    gen = torch.Generator().manual_seed(5)
    e, r = torch.randn(40, 8, generator=gen), torch.randn(30, 8, generator=gen)
    y, ry = torch.arange(40) % 6, torch.arange(30) % 7

    def run(autocast):
        x = e.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.oucl_embeddings(x, y) + F.info_nce_embeddings(x, y, r, ry) + F.oucl_embeddings(x, y, r, ry)
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            (h,) = torch.autograd.grad(g.square().sum(), x)
        return loss.detach(), g.detach(), h

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
