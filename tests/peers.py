"""How the drop-in tests compare our classes with the peer libraries': fresh leaves, values and gradients,
tolerances relative to the peer's largest entry."""
import torch

# Each output within TOL of the peer's largest entry. PML's CircleLoss and the official criterion take
# torch's Softplus, which returns x itself above x = 20 (an error up to e^-20 ≈ 2e-9 relative; ours is exact).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
SOFTPLUS_CUTOFF = 5e-9


def both(make_peer, make_ours, inputs, call, wrt=None):
    """(peer's (loss, grads), ours) for ``call(loss_fn, *leaves)`` on fresh leaves of ``inputs``; ``wrt``:
    indices of the inputs that get gradients (default: every floating one)."""
    out = []
    for make in (make_peer, make_ours):
        leaves = [x.clone().requires_grad_(x.is_floating_point() and (wrt is None or i in wrt))
                  for i, x in enumerate(inputs)]
        loss = call(make(), *leaves)
        wanted = [x for x in leaves if x.requires_grad]
        grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad else [None] * len(wanted)
        out.append([loss.detach()] + [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads)])
    return out


def assert_same(peer, ours, dtype=torch.float64, tol=None):
    tol = tol or TOL[dtype]
    for i, (w, g) in enumerate(zip(peer, ours)):
        assert g.dtype == w.dtype and g.shape == w.shape, (i, g.dtype, w.dtype, g.shape, w.shape)
        if w.numel():
            err, scale = (g.double() - w.double()).abs().max().item(), w.double().abs().max().item()
            assert err <= tol * max(scale, 1e-12), f"output {i}: error {err:.3g} at scale {scale:.3g}"


def batch(B, D, n_classes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype), torch.randint(0, n_classes, (B,),
                                                                                          generator=gen)


def official_value(outs, gamma, delta_p, delta_n):
    """The official criterion written out from its definition (NCE/NCECriterion_MetAug.py, CircleLoss.forward)."""
    scores = [(o[..., 0] + 1) / 2 for o in outs]
    p = torch.cat([s[:, :1] for s in scores], 1)
    n = torch.cat([s[:, 1:] for s in scores], 1)
    rows = torch.nn.functional.softplus(torch.logsumexp(gamma * (n - delta_n), 1)
                                        + torch.logsumexp(-gamma * (p - delta_p), 1))
    return rows.sum() / p.shape[0] / gamma * 16
