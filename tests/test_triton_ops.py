"""The Triton launchers as torch operators (``torch.library.triton_op``, namespace ``metaug_fast_triton``).

Without a GPU: tests/triton_trace.py traces every operator and every public function on the Triton backend
on fake CUDA tensors through AOT dispatch (what torch.compile runs after Dynamo), in a process without the
interpreter (whose kernels cannot be traced: ``wrap_triton`` hands interpreted kernels back unwrapped). Each
kernel must be a node of the graph, no kernel may write a graph input, and the fake outputs must have the
shapes and dtypes the interpreter's real outputs have. A backward on fake CUDA tensors needs a CUDA device
(the autograd engine starts one thread per device), so the backward Functions are covered here through their
operators only, and whole on a GPU, where ``torch.library.opcheck`` runs on every operator and the public
functions compile with ``fullgraph=True`` to eager's values and gradients."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

import metaug_fast

from triton_cases import N_OP_CASES, N_PUBLIC_CASES, op_cases, public_cases

DTYPES = ("bfloat16", "float32")
HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A directory of this test session that its pytest-xdist workers share (their base temp's parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _traced(dtype: str, shared: Path):
    """tests/triton_trace.py's records for ``dtype`` by case name. The trace costs about 20 s a dtype, so it
    runs once a session: the first worker that needs it writes it to ``shared``, the others read it."""
    path = shared / f"triton_trace_{dtype}.jsonl"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            run = subprocess.run([sys.executable, str(HERE / "triton_trace.py"), dtype], env=env, capture_output=True,
                                 text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-4000:]
            path.write_text(run.stdout)
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    assert {case["dtype"] for case in lines} == {dtype}
    return {case["name"]: case for case in lines}


def _cases(dtype):
    return op_cases("cpu", getattr(torch, dtype)) + public_cases("cpu", getattr(torch, dtype))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_is_a_graph_node_that_writes_no_input(shared_dir, dtype):
    traced = _traced(dtype, shared_dir)
    names = [name for name, _, _ in _cases(dtype)]
    assert sorted(traced) == sorted(names)
    for name in names:
        case = traced[name]
        assert case["kernels"] >= 1 and case["opaque"] == [], case
        assert case["inputs_written"] == [], case


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_outputs_are_the_interpreters(shared_dir, dtype):
    # The fake implementation (the launcher run on fake tensors) against the real outputs under the
    # interpreter. label_partials' first dimension counts column splits, which the GPU's tile configuration
    # sets (the interpreter uses smaller tiles): only that one is allowed to differ.
    traced = _traced(dtype, shared_dir)
    for name, fn, args in _cases(dtype):
        out = fn(*args)
        real = [[list(x.shape), str(x.dtype)] for x in (out if isinstance(out, (tuple, list)) else (out,))]
        fake = traced[name]["outputs"]
        if name.startswith("label_partials"):
            real, fake = [[s[1:], d] for s, d in real], [[s[1:], d] for s, d in fake]
        assert fake == real, name


def test_every_launcher_is_an_operator_with_cases():
    # Every Triton launcher is registered, and op_cases calls each: the trace above and opcheck on a GPU
    # leave none out.
    from torch._library.custom_ops import CustomOpDef

    from metaug_fast.kernels import _common, label, margins, matmul, score, similarity

    launchers = {value._qualname for module in (label, margins, matmul, score, similarity)
                 for value in vars(module).values() if isinstance(value, CustomOpDef)}
    assert len(launchers) == 17 and all(name.startswith(f"{_common.NAMESPACE}::") for name in launchers)
    cases = op_cases("cpu", torch.float32)
    assert launchers == {fn._qualname for _, fn, _ in cases}
    assert (len(cases), len(public_cases("cpu", torch.float32))) == (N_OP_CASES, N_PUBLIC_CASES)


def test_inductor_types_float_arguments_fp64():
    # Under torch.compile Inductor launches the traced kernels itself and types each Python float argument:
    # fp64, as the kernels annotate the loss parameters, only while this switch is on (it is, outside fbcode,
    # in torch 2.11 and 2.14); off, fp64 kernels would get fp32 parameters. On a GPU,
    # test_compiled_double_backward_rounds_as_eager holds fp64 to 1e-12 through it.
    from torch._inductor import config

    assert config._use_fp64_for_unbacked_floats


# ------------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
                         or "triton" not in metaug_fast.available_backends(),
                         reason="needs a GPU, Triton, and TRITON_INTERPRET=0")


# One test per case: compiling takes seconds each, and bench/gpu_check.sh gives a test 90 s.
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", range(N_OP_CASES))
def test_every_operator_passes_opcheck(index, dtype):
    name, fn, args = op_cases("cuda", dtype)[index]
    result = torch.library.opcheck(fn._opoverload, args)
    assert set(result.values()) == {"SUCCESS"}, (name, result)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("index", range(N_PUBLIC_CASES))
def test_public_functions_compile_with_fullgraph(index):
    name, fn, args = public_cases("cuda", torch.float32)[index]
    torch._dynamo.reset()
    outs = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out = f(*leaves)
        loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
        outs.append([loss.detach(), *torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)])
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compiled_double_backward_rounds_as_eager(dtype):
    # Inductor before torch 2.14 launches a traced kernel without its enable_fp_fusion=False. The double
    # backward's cancellation-critical products (kernels/_common.mul_rn) stay rounded there: rows dominated
    # by one entry per side (β = 256), where a fused product leaves about an ulp times β², match eager.
    from metaug_fast.kernels import score

    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, K = 64, 40
    pos = torch.rand(B, K, device="cuda", dtype=dtype, generator=gen) * 0.1
    neg = torch.rand(B, K, device="cuda", dtype=dtype, generator=gen) * 0.1
    pos[:, 0], neg[:, 0] = 0.9, 0.95  # one entry dominates each side's log-sum-exp at β = 256
    tp, tn = torch.randn_like(pos), torch.randn_like(neg)
    g = torch.rand(B, device="cuda", dtype=dtype, generator=gen)
    for form in (2, 4):  # the weighted OUCL form and InfoNCE
        params = (form, 256.0, 0.1, -0.05, 0.3, 0.2)
        _, stats = score.oucl_score_fwd(pos, neg, None, None, *params)

        def hvp(g, tp, tn, pos, neg, stats):
            return score.oucl_score_bwd_bwd(g, tp, tn, pos, neg, None, None, stats, *params)

        eager = hvp(g, tp, tn, pos, neg, stats)
        compiled = torch.compile(hvp, fullgraph=True)(g, tp, tn, pos, neg, stats)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
        for got, want in zip(compiled, eager):
            scale = want.abs().max().clamp_min(1.0)
            torch.testing.assert_close(got / scale, want / scale, **tol)
