"""The reason double backward exists: a MetAug-style meta step (docs/mathematics.md#metaug-step) through an encoder,
OUCL and a feature augmenter gives the same second-order gradient on the cpp backend as on reference."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import metaug_fast.functional as F

from conftest import requires_cpp

pytestmark = requires_cpp


def _score_loss(z1, z2, backend, form):
    """Score mode: row i's positive is (z1_i, z2_i), its negatives are (z1_i, z2_j), j ≠ i."""
    sim = F.pairwise_similarity(z1, z2)
    B = sim.shape[0]
    eye = torch.eye(B, dtype=torch.bool)
    return F.oucl(sim.diagonal()[:, None], sim, neg_mask=~eye, form=form, beta=8.0, backend=backend)


def _label_loss(z1, z2, backend, form):
    labels = torch.arange(z1.shape[0]).repeat(2)
    return F.oucl_embeddings(torch.cat([z1, z2]), labels, form=form, beta=8.0, backend=backend)


def _meta_gradient(backend, form, loss_fn, second_order=True):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    augmenter = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    v1, v2 = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
    theta = dict(encoder.named_parameters())

    def total_loss(params):
        z1, z2 = functional_call(encoder, params, (v1,)), functional_call(encoder, params, (v2,))
        a1, a2 = augmenter(z1), augmenter(z2)
        return (loss_fn(z1, z2, backend, form) + 0.5 * loss_fn(a1, z2, backend, form)
                + 0.5 * loss_fn(z1, a2, backend, form))

    # Inner step with the graph kept, so θ̂ depends on the augmenter's weights ω.
    grads = torch.autograd.grad(total_loss(theta), list(theta.values()), create_graph=second_order)
    theta_hat = {k: w - 0.5 * g for (k, w), g in zip(theta.items(), grads)}
    outer = total_loss(theta_hat)
    return torch.autograd.grad(outer, list(augmenter.parameters()) + list(theta.values()))


@pytest.mark.parametrize("form", ["weighted", "circle", "squared", "hinge"])
@pytest.mark.parametrize("loss_fn", [_score_loss, _label_loss], ids=["score", "label"])
def test_meta_step_cpp_equals_reference(form, loss_fn):
    want = _meta_gradient("reference", form, loss_fn)
    got = _meta_gradient("cpp", form, loss_fn)
    # The second-order path (ω -> ∇_θ L -> θ̂) changes the augmenter's gradient: the test exercises it.
    first_order = _meta_gradient("reference", form, loss_fn, second_order=False)
    assert max((a - b).abs().max() for a, b in zip(want[:4], first_order[:4])) > 1e-6
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["weighted", "circle", "squared", "hinge"])
def test_torch_func_grad_and_nested_grad(form):
    """The fused score-mode Functions work under torch.func.grad, to second order (reverse over reverse)."""
    torch.manual_seed(0)
    pos, neg = torch.rand(5, 3, dtype=torch.float64), torch.rand(5, 40, dtype=torch.float64)
    v = torch.randn_like(neg)

    def loss(n, backend):
        sp, sn = F.margin_statistics(pos, n, backend=backend)
        return F.oucl(pos, n, form=form, beta=8.0, backend=backend) + 0.1 * (sp - sn).sum()

    for order in (1, 2):
        out = {}
        for backend in ("reference", "cpp"):
            g = torch.func.grad(lambda n: loss(n, backend))
            if order == 2:
                g = torch.func.grad(lambda n: (torch.func.grad(lambda m: loss(m, backend))(n) * v).sum())
            out[backend] = g(neg)
        torch.testing.assert_close(out["cpp"], out["reference"], rtol=1e-9, atol=1e-12)
