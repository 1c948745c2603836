"""The fused ops inside torch.compile: a compiled training step gets the same loss and gradients as eager."""
import pytest
import torch

import metaug_fast
import metaug_fast.functional as F

from conftest import requires_cpp


@requires_cpp
@pytest.mark.timeout(300)
def test_cpp_ops_under_torch_compile():
    torch._dynamo.reset()
    p, n = torch.rand(64, 6, requires_grad=True), torch.rand(64, 100, requires_grad=True)
    e, y = torch.randn(64, 16, requires_grad=True), torch.arange(64) % 32
    loss_fn = metaug_fast.OUCLLoss(form="circle", beta=32.0)

    def step(p, n, e):
        return loss_fn(p, n) + loss_fn.embeddings(e, y) + F.info_nce_embeddings(e, y)

    compiled = torch.compile(step)
    outs = []
    for fn in (step, compiled):
        loss = fn(p, n, e)
        outs.append((loss,) + torch.autograd.grad(loss, (p, n, e)))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
