"""pytest-benchmark micro-benchmarks of the hot ops, comparable across commits:

    make bench-micro                                        # runs and saves a numbered result in .benchmarks/
    .venv/bin/python -m pytest bench/micro --benchmark-only --benchmark-compare   # against the last saved run

Small fixed sizes (each op runs in milliseconds on the CPU) so that many rounds fit in a short run.
"""
import pytest
import torch

import metaug_fast
import metaug_fast.functional as F

BACKENDS = [b for b in ("reference", "cpp") if b in metaug_fast.available_backends()]


@pytest.fixture(scope="module")
def scores():
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(1024, 6, generator=gen).requires_grad_(), torch.rand(1024, 1536, generator=gen).requires_grad_())


@pytest.fixture(scope="module")
def embeddings():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1024, 128, generator=gen).requires_grad_(), torch.arange(1024) % 512


def _fwd_bwd(loss, inputs):
    for x in inputs:
        x.grad = None
    loss().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_oucl_score_forward_backward(benchmark, scores, backend):
    benchmark(_fwd_bwd, lambda: F.oucl(*scores, backend=backend), scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_oucl_score_hvp(benchmark, scores, backend):
    vecs = [torch.randn_like(x) for x in scores]

    def hvp():
        grads = torch.autograd.grad(F.oucl(*scores, backend=backend), scores, create_graph=True)
        torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vecs)), scores)

    benchmark(hvp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_score_forward_backward(benchmark, scores, backend):
    benchmark(_fwd_bwd, lambda: F.info_nce(*scores, backend=backend), scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_oucl_label_forward_backward(benchmark, embeddings, backend):
    emb, labels = embeddings
    benchmark(_fwd_bwd, lambda: F.oucl_embeddings(emb, labels, backend=backend), (emb,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_label_forward_backward(benchmark, embeddings, backend):
    emb, labels = embeddings
    benchmark(_fwd_bwd, lambda: F.info_nce_embeddings(emb, labels, backend=backend), (emb,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_statistics_label_forward(benchmark, embeddings, backend):
    emb, labels = embeddings
    benchmark(lambda: F.margin_statistics_embeddings(emb.detach(), labels, backend=backend))
