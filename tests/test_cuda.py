"""What is specific to the CUDA backend on a real GPU (the contract suite runs its values, gradients and
HVPs: test_contract.py, entry cuda-cuda).

Marked ``gpu`` and skipped without a CUDA device and the built extension (bench/gpu_check.sh builds it
with METAUG_BUILD_CUDA=1 and runs these)."""
import pytest
import torch

import metaug_fast
import metaug_fast.functional as F

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


def test_explicit_cuda_backend_and_env():
    pos, neg, _, _ = _inputs((8, 2, 9), torch.float32, False)
    want = metaug_fast.reference.oucl(pos, neg)
    torch.testing.assert_close(F.oucl(pos, neg, backend="cuda"), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ label mode
def _label(backend, fn_name, emb, labels, ref, ref_labels, **kw):
    e = emb.clone().requires_grad_()
    r = None if ref is None else ref.clone().requires_grad_()
    out = getattr(F, fn_name)(e, labels, r, ref_labels, backend=backend, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    target = sum((o[torch.isfinite(o)] * (k + 1)).sum() for k, o in enumerate(outs))
    return outs + torch.autograd.grad(target, [x for x in (e, r) if x is not None])


def test_label_mode_one_million_rows_fits():
    n = 1 << 20
    emb = torch.randn(n, 128, device="cuda", requires_grad=True)
    labels = torch.arange(n // 2, device="cuda").repeat(2)
    torch.cuda.reset_peak_memory_stats()
    F.oucl_embeddings(emb, labels, backend="cuda").backward()
    assert torch.cuda.max_memory_allocated() < 8 * 2**30  # B×M would be 4 TiB
