"""The NaN grid: every drop-in (PML, open_clip, lightly, the official criterion) and the functional API ×
(one NaN row, one infinite row, all NaN, a NaN in the other set of rows, a NaN parameter) against the
installed peer (the reference implementation for the functional API, the official criterion written out).
The rule: a non-finite input that the peer's loss turns non-finite is non-finite here too (or, for a
parameter, refused with a ValueError naming it), and a finite loss here is the peer's, with finite
gradients: never a finite loss whose gradients are NaN."""
import math
import types

import pytest
import torch
from peers import SOFTPLUS_CUTOFF, assert_same, official_value

import metaug_fast.functional as F
import metaug_fast.reference as R
from metaug_fast.losses import lightly as our_lightly
from metaug_fast.losses import official as our_official
from metaug_fast.losses import open_clip as our_open_clip
from metaug_fast.losses import pml as our_pml

pml = pytest.importorskip("pytorch_metric_learning.losses")
open_clip_loss = pytest.importorskip("open_clip.loss")
lightly_loss = pytest.importorskip("lightly.loss")

CASES = ["nan_row", "inf_row", "all_nan", "nan_other", "nan_parameter"]
B, D = 8, 5


def _rows(case):
    """(x, y): the rows scored and the other set (the reference rows, the text features, the second view)."""
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.nn.functional.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1)
            for _ in range(2))
    if case in ("nan_row", "inf_row"):
        x[1, 2] = math.nan if case == "nan_row" else math.inf
    elif case == "all_nan":
        x[:] = math.nan
    elif case == "nan_other":
        y[3, 0] = math.nan
    return x, y


LABELS = torch.arange(B) % 3
# Each drop-in as (peer, ours) ↦ loss of (x, y, parameter): the parameter is NaN in the nan_parameter case.
DROP_INS = {
    "pml.CircleLoss": (pml.CircleLoss, our_pml.CircleLoss,
                       lambda lib, x, y, p: lib(gamma=p)(x, LABELS, ref_emb=y, ref_labels=LABELS.flip(0)), 80.0),
    "pml.NTXentLoss": (pml.NTXentLoss, our_pml.NTXentLoss,
                       lambda lib, x, y, p: lib(temperature=p)(x, LABELS, ref_emb=y, ref_labels=LABELS.flip(0)), 0.1),
    "pml.NTXentLoss_self": (pml.NTXentLoss, our_pml.NTXentLoss,
                            lambda lib, x, y, p: lib(temperature=p)(torch.cat([x, y]), LABELS.repeat(2)), 0.1),
    "open_clip.ClipLoss": (open_clip_loss.ClipLoss, our_open_clip.ClipLoss,
                           lambda lib, x, y, p: lib()(x, y, torch.tensor(p, dtype=x.dtype)), 14.0),
    "lightly.NTXentLoss": (lightly_loss.NTXentLoss, our_lightly.NTXentLoss,
                           lambda lib, x, y, p: lib(temperature=p)(x, y), 0.5),
    "official.CircleLoss": (
        lambda outs, gamma: official_value(outs, gamma, 0.0, 0.0),
        lambda outs, gamma: our_official.CircleLoss(types.SimpleNamespace(
            gama_gh=gamma, delta_m_gh=0.3, delta_enable_gh="no", alpha_m_gh=0.25, alpha_de_gh=1.0,
            alpha_enable_gh="no"))(*outs),
        lambda fn, x, y, p: fn([x[:, :, None]] * 3 + [y[:, :, None]] * 3, p), 16.0),
    "functional.oucl_embeddings": (
        R.oucl_embeddings, F.oucl_embeddings,
        lambda fn, x, y, p: fn(x, LABELS, y, LABELS.flip(0), form="circle", beta=p, similarity="cosine"), 16.0),
    "functional.info_nce": (
        R.info_nce, F.info_nce, lambda fn, x, y, p: fn(x[:, :2], y, temperature=p), 0.2),
}


def _run(make, call, case, param):
    x, y = _rows(case)
    x.requires_grad_(), y.requires_grad_()
    loss = call(make, x, y, math.nan if case == "nan_parameter" else param)
    grads = torch.autograd.grad(loss, (x, y), allow_unused=True)
    return [loss.detach()] + [torch.zeros_like(v) if g is None else g for v, g in zip((x, y), grads)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", DROP_INS)
def test_non_finite_inputs(name, case):
    peer_make, our_make, call, param = DROP_INS[name]
    peer = _run(peer_make, call, case, param)
    try:
        ours = _run(our_make, call, case, param)
    except ValueError as exc:  # a NaN parameter may be refused, naming it
        assert case == "nan_parameter" and any(w in str(exc) for w in ("gam", "temperature", "beta")), exc
        return
    if torch.isfinite(ours[0]):
        assert all(torch.isfinite(g).all() for g in ours[1:]), "a finite loss with non-finite gradients"
        assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)
    assert torch.isfinite(peer[0]) or not torch.isfinite(ours[0]), (peer[0], ours[0])
