"""What is specific to the Triton backend compiled for a real GPU (the contract suite runs its values,
gradients and HVPs: test_contract.py, entry triton-cuda).

Marked ``gpu`` and skipped without a CUDA device. bench/gpu_check.sh runs it with TRITON_INTERPRET=0
(conftest.py would otherwise select the interpreter)."""
import os

import pytest
import torch

import metaug_fast
import metaug_fast.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
                       or "triton" not in metaug_fast.available_backends(),
                       reason="needs a GPU, Triton, and TRITON_INTERPRET=0"),
]
PARAMS = dict(gamma_pos=0.1, gamma_neg=-0.05, margin=0.3, lam=0.2)


def _rand(*shape, dtype=torch.float64):
    return torch.rand(*shape, device="cuda", dtype=torch.float64).to(dtype)


def _label(n, d=128, dtype=torch.float32, m=None):
    emb = torch.randn(n, d, device="cuda", dtype=torch.float64).to(dtype)
    labels = torch.arange(n, device="cuda") % (n // 2)  # two views
    if m is None:
        return emb, labels, None, None
    return emb, labels, torch.randn(m, d, device="cuda", dtype=torch.float64).to(dtype), \
        torch.randint(0, n // 2 + 1, (m,), device="cuda")


def test_label_mode_never_allocates_b_by_m():
    # N = 262144: one N×N fp32 matrix would be 256 GiB. Peak memory must stay O(N·D).
    emb, labels, _, _ = _label(262144, dtype=torch.bfloat16)
    emb.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    F.oucl_embeddings(emb, labels, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * emb.numel() * 4, extra / 2**20  # a few fp32 copies of the embeddings, nothing N×N
    assert torch.isfinite(emb.grad).all()



def test_score_and_label_calls_never_synchronize():
    # No tensor is built from host data per call: forward, backward and the score-mode HVP run without a
    # stream synchronization (torch raises on one in this mode), so CUDA graphs can capture them.
    pos, neg = _rand(64, 6, dtype=torch.float32).requires_grad_(), _rand(64, 300, dtype=torch.float32)
    emb, labels, _, _ = _label(256)
    emb.requires_grad_()
    F.oucl(pos, neg, backend="triton")  # compile and autotune first: their own copies are not per call
    F.oucl_embeddings(emb, labels, backend="triton").backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (g,) = torch.autograd.grad(F.oucl(pos, neg, form="circle", backend="triton", **PARAMS), pos, create_graph=True)
        torch.autograd.grad(g.sum(), pos)
        F.oucl_embeddings(emb, labels, backend="triton").backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu_without_set_device():
    assert torch.cuda.current_device() == 0
    pos, neg = torch.rand(33, 4, device="cuda:1"), torch.rand(33, 70, device="cuda:1")
    emb = torch.randn(40, 16, device="cuda:1")
    labels = torch.arange(40, device="cuda:1") % 20
    torch.testing.assert_close(F.oucl(pos, neg, backend="triton").cpu(), F.oucl(pos.cpu(), neg.cpu(),
                                                                                backend="reference"))
    torch.testing.assert_close(F.oucl_embeddings(emb, labels, backend="triton").cpu(),
                               F.oucl_embeddings(emb.cpu(), labels.cpu(), backend="reference"), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(F.pairwise_similarity(emb, emb, backend="triton").cpu(),
                               F.pairwise_similarity(emb.cpu(), emb.cpu(), backend="reference"), rtol=1e-4, atol=1e-6)
