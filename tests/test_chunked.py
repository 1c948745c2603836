"""Chunked label mode against a reference set: equals reference.py and never materializes B×M."""
import pytest
import torch

from metaug_fast import reference as R
from metaug_fast.chunked import oucl_embeddings_chunked
from metaug_fast.contract import LossParams
from metaug_fast.metaug import MemoryBank

from conftest import requires_cpp
from helpers import FORMS, LargestAllocation


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_equals_reference(form, chunk, reduction):
    emb = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 5, 6])  # 5 and 6 have no positive in the reference set
    ref_labels = torch.tensor([0, 0, 1, 2, 2, 3, 1, 0, 4, 4, 2])
    params = LossParams(form, 16.0, margin=0.3, lam=0.5)
    want = R.oucl_embeddings(emb, labels, ref, ref_labels, reduction=reduction, **params.kwargs())
    got = oucl_embeddings_chunked(emb, labels, ref, ref_labels, chunk_size=chunk, params=params, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    gw = torch.autograd.grad(want.sum(), (emb, ref))
    gg = torch.autograd.grad(got.sum(), (emb, ref))
    for a, b in zip(gg, gw):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_very_negative_exponents_across_chunks():
    # Rows whose exponents are all ~ -β·2 in some chunks and absent from others must not underflow to 0.
    emb = torch.randn(3, 4, dtype=torch.float32)
    ref = torch.randn(9, 4, dtype=torch.float32)
    labels, ref_labels = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 3, 3, 3, 3, 0, 1])
    params = LossParams("squared", 256.0)
    torch.testing.assert_close(oucl_embeddings_chunked(emb, labels, ref, ref_labels, chunk_size=2, params=params),
                               R.oucl_embeddings(emb, labels, ref, ref_labels, **params.kwargs()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_cpp)])
def test_bank_scoring_never_allocates_b_by_m(backend):
    B, M, D, chunk = 32, 5000, 8, 256
    bank = MemoryBank(M, D, generator=torch.Generator().manual_seed(0))
    z = torch.randn(B, D, requires_grad=True)
    labels, bank_labels = torch.arange(B) % 10, torch.arange(M) % 10
    with LargestAllocation() as mode:
        loss = bank.score_all(0, z, labels, bank_labels, chunk_size=chunk, form="circle", beta=32.0,
                              backend=backend)
        loss.backward()
    assert mode.largest <= max(B * chunk, M * D) < B * M
    if backend == "cpp":  # the fused op neither copies the (unit-row) bank nor computes a gradient for it
        assert mode.largest < M * D
    want = R.oucl_embeddings(z.detach(), labels, bank.features[0], bank_labels, form="circle", beta=32.0)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_bank_scoring_validates():
    bank = MemoryBank(10, 4)
    with pytest.raises(ValueError, match="labels"):
        bank.score_all(0, torch.randn(3, 4), torch.arange(2), torch.arange(10))
    with pytest.raises(ValueError, match="form"):
        bank.score_all(0, torch.randn(3, 4), torch.arange(3), torch.arange(10), form="arc")
    with pytest.raises(TypeError, match="unexpected"):
        bank.score_all(0, torch.randn(3, 4), torch.arange(3), torch.arange(10), temperature=0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        bank.score_all(0, torch.randn(3, 4), torch.arange(3), torch.arange(10), chunk_size=0)
