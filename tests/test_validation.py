"""Bad input raises a ValueError or TypeError whose message names the offending argument."""
import pytest
import torch

import metaug_fast.functional as F
from metaug_fast import OUCLLoss

P, N = torch.rand(4, 3), torch.rand(4, 5)
E, L = torch.randn(6, 8), torch.tensor([0, 1, 0, 1, 2, 2])


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(pos=[[0.5]]), TypeError, "pos"),
        (dict(pos=torch.rand(4)), ValueError, "pos"),
        (dict(neg=torch.rand(4, 5, 1)), ValueError, "neg"),
        (dict(pos=torch.ones(4, 3, dtype=torch.long)), TypeError, "pos"),
        (dict(neg=torch.rand(3, 5)), ValueError, "rows"),
        (dict(neg=torch.rand(4, 5, dtype=torch.float64)), TypeError, "neg"),
        (dict(neg=torch.rand(4, 5, device="meta")), ValueError, "neg"),
        (dict(pos_mask=torch.ones(4, 3)), TypeError, "pos_mask"),
        (dict(pos_mask=torch.ones(4, 2, dtype=torch.bool)), ValueError, "pos_mask"),
        (dict(neg_mask=torch.ones(5, dtype=torch.bool)), ValueError, "neg_mask"),
        (dict(form="cosface"), ValueError, "form"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(beta="16"), TypeError, "beta"),
        (dict(margin=float("nan")), ValueError, "margin"),
        (dict(gamma_pos=None), TypeError, "gamma_pos"),
        (dict(gamma_neg=float("inf")), ValueError, "gamma_neg"),
        (dict(lam=True), TypeError, "lam"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_oucl_bad_input(kwargs, exc, name):
    args = dict(pos=P, neg=N)
    args.update(kwargs)
    pos, neg = args.pop("pos"), args.pop("neg")
    with pytest.raises(exc, match=name):
        F.oucl(pos, neg, **args)


@pytest.mark.parametrize(
    "args, kwargs, exc, name",
    [
        ((E[0], L), {}, ValueError, "emb"),
        ((E.long(), L), {}, TypeError, "emb"),
        ((E, L[:5]), {}, ValueError, "labels"),
        ((E, L.float()), {}, TypeError, "labels"),
        ((E, L[None]), {}, ValueError, "labels"),
        ((E, L, torch.randn(3, 8)), {}, ValueError, "ref_emb and ref_labels"),
        ((E, L, None, torch.tensor([0, 1])), {}, ValueError, "ref_emb and ref_labels"),
        ((E, L, torch.randn(3, 7), torch.tensor([0, 1, 2])), {}, ValueError, "ref_emb"),
        ((E, L, torch.randn(3, 8), torch.tensor([0, 1])), {}, ValueError, "ref_labels"),
        ((E, L, torch.randn(3, 8).double(), torch.tensor([0, 1, 2])), {}, TypeError, "ref_emb"),
        ((E, L), dict(similarity="euclidean"), ValueError, "similarity"),
        ((E, L), dict(form="x"), ValueError, "form"),
        ((E[:, :0], L), {}, ValueError, "emb must have at least one feature"),
    ],
)
def test_label_mode_bad_input(args, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        F.oucl_embeddings(*args, **kwargs)
    if "form" not in kwargs:
        with pytest.raises(exc, match=name):
            F.info_nce_embeddings(*args, **{k: v for k, v in kwargs.items() if k == "similarity"})


@pytest.mark.parametrize("value", [0.0, -0.5, float("inf"), float("nan")])
def test_tensor_temperature_is_checked_as_the_float(value):
    # A CPU tensor's value is read (free) and refused as the float is; where it cannot be read without waiting
    # (an accelerator; here torch.compile's tracing, which takes the same path) the loss is NaN.
    for temperature in (value, torch.tensor(value)):
        with pytest.raises(ValueError, match="temperature must be"):
            F.info_nce(P, N, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be"):
            F.info_nce_embeddings(E, L, temperature=temperature)
    traced = torch.compile(lambda t: F.info_nce(P, N, temperature=t), backend="eager", fullgraph=True)
    assert torch.isnan(traced(torch.tensor(value)))
    assert torch.isfinite(traced(torch.tensor(0.2)))


def test_other_ops_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        F.info_nce(P, N, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a 0-d tensor"):
        F.info_nce(P, N, temperature=torch.ones(1))
    with pytest.raises(TypeError, match="temperature must be a floating-point tensor"):
        F.info_nce_embeddings(E, L, temperature=torch.tensor(1))
    with pytest.raises(ValueError, match="temperature is on meta"):
        F.info_nce_embeddings(E, L, temperature=torch.tensor(0.1, device="meta"))
    with pytest.raises(ValueError, match="average"):
        F.info_nce(P, N, average="positive")
    with pytest.raises(ValueError, match="pos_mask"):
        F.info_nce(P, N, pos_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="b must have the feature size"):
        F.pairwise_similarity(torch.rand(3, 4), torch.rand(2, 5))
    with pytest.raises(TypeError, match="b has dtype"):
        F.pairwise_similarity(torch.rand(3, 4), torch.rand(2, 4).double())
    with pytest.raises(ValueError, match="similarity"):
        F.pairwise_similarity(torch.rand(3, 4), torch.rand(2, 4), similarity="l2")
    with pytest.raises(ValueError, match="neg"):
        F.margin_statistics(P, torch.rand(3, 5))
    sp, sn = F.margin_statistics(P, N)
    with pytest.raises(ValueError, match="sigma_pos"):
        F.margin_injection_loss(P, N, sp[:3], sn)
    with pytest.raises(ValueError, match="sigma_neg"):
        F.margin_injection_loss(P, N, sp, sn[None])
    with pytest.raises(TypeError, match="detach_margin"):
        F.margin_injection_loss(P, N, sp, sn, detach_margin=1)
    with pytest.raises(ValueError, match="reduction"):
        F.margin_injection_loss(P, N, sp, sn, reduction="max")


def test_module_checks_at_construction():
    with pytest.raises(ValueError, match="form"):
        OUCLLoss(form="triplet")
    with pytest.raises(ValueError, match="beta"):
        OUCLLoss(beta=-2)
    with pytest.raises(ValueError, match="similarity"):
        OUCLLoss(similarity="euclidean")
    with pytest.raises(ValueError, match="backend"):
        OUCLLoss(backend="tpu")
