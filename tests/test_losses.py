"""The drop-in classes of metaug_fast.losses against the libraries they replace, installed here: values and
gradients in fp64 (1e-10) and fp32, the peers' default hyper-parameters, the edge cases of their semantics,
and the errors for what they do not support. Distributed open_clip and lightly: test_losses_distributed.py."""
import math
import types

import pytest
import torch
from peers import SOFTPLUS_CUTOFF, assert_same, batch, both, official_value

from metaug_fast.losses import lightly as our_lightly
from metaug_fast.losses import official as our_official
from metaug_fast.losses import open_clip as our_open_clip
from metaug_fast.losses import pml as our_pml

pml = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
open_clip_loss = pytest.importorskip("open_clip.loss")
lightly_loss = pytest.importorskip("lightly.loss")

# ------------------------------------------------------------------------------------ pytorch-metric-learning
PML_CASES = [("CircleLoss", {}), ("CircleLoss", dict(m=0.25, gamma=256)), ("NTXentLoss", {}),
             ("NTXentLoss", dict(temperature=0.5))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name, kwargs", PML_CASES)
@pytest.mark.parametrize("n_classes", [3, 40], ids=["several_positives", "singletons"])
def test_pml_self_batch(name, kwargs, n_classes, dtype):
    emb, labels = batch(30, 8, n_classes, dtype)
    peer, ours = both(lambda: getattr(pml, name)(**kwargs), lambda: getattr(our_pml, name)(**kwargs), [emb],
                      lambda f, e: f(e, labels))
    assert peer[0] != 0
    assert_same(peer, ours, dtype, SOFTPLUS_CUTOFF if name == "CircleLoss" and dtype == torch.float64 else None)


@pytest.mark.parametrize("name, kwargs", PML_CASES)
def test_pml_reference_set(name, kwargs):
    emb, labels = batch(20, 6, 4)
    ref, ref_labels = batch(25, 6, 5, seed=1)
    tol = SOFTPLUS_CUTOFF if name == "CircleLoss" else None
    peer, ours = both(lambda: getattr(pml, name)(**kwargs), lambda: getattr(our_pml, name)(**kwargs), [emb, ref],
                      lambda f, e, r: f(e, labels, ref_emb=r, ref_labels=ref_labels))
    assert_same(peer, ours, tol=tol)
    # ref_labels the same tensor as labels: PML drops the pairs (i, i).
    peer, ours = both(lambda: getattr(pml, name)(**kwargs), lambda: getattr(our_pml, name)(**kwargs),
                      [emb, ref[:20]], lambda f, e, r: f(e, labels, ref_emb=r, ref_labels=labels))
    assert_same(peer, ours, tol=tol)


@pytest.mark.parametrize("name", ["CircleLoss", "NTXentLoss"])
def test_pml_edge_batches(name):
    # Empty; one row; two rows of one class (one positive pair, no negative: PML's zero loss); two classes of
    # one row each (no positive pair).
    for emb, labels in [(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)),
                        (batch(1, 4, 1)[0], torch.tensor([3])), (batch(2, 4, 1)[0], torch.tensor([1, 1])),
                        (batch(2, 4, 1)[0], torch.tensor([0, 1])), (batch(3, 4, 1)[0], torch.tensor([0, 0, 1]))]:
        peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [emb],
                          lambda f, e: f(e, labels))
        assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)


@pytest.mark.parametrize("name", ["CircleLoss", "NTXentLoss"])
@pytest.mark.parametrize("case", ["one_nan", "one_inf", "all_nan", "tiny_nan"])
def test_pml_non_finite_embeddings_give_a_non_finite_loss(name, case):
    # As PML: a NaN or infinite embedding spreads to every row, which AvgNonZeroReducer then drops, and PML's
    # zero loss Σ embeddings·0 is NaN; the tiny batch is NTXent's row without negatives (ours drops the row,
    # PML scores its pair). A guard on torch.isfinite(loss) fires, as it does with PML. (The gradients are
    # NaN here and zero in PML, which takes nothing of the NaN rows into its graph.)
    B = 2 if case == "tiny_nan" else 12
    emb, _ = batch(B, 6, 1)
    labels = torch.zeros(2, dtype=torch.long) if case == "tiny_nan" else torch.arange(B) % 3
    if case == "all_nan":
        emb[:] = float("nan")
    else:
        emb[1, 2] = float("inf") if case == "one_inf" else float("nan")
    peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [emb],
                      lambda f, e: f(e, labels))
    assert torch.isnan(peer[0]) and torch.isnan(ours[0])
    # Finite inputs keep the exact values (the zero loss adds 0).
    peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [emb.nan_to_num(0, 0, 0)],
                      lambda f, e: f(e, labels))
    assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)


@pytest.mark.parametrize("name", ["CircleLoss", "NTXentLoss"])
def test_pml_nan_in_the_reference_set(name):
    # Every row meets the NaN reference row: the loss is NaN. (PML's CircleLoss drops every row and returns
    # its zero loss Σ embeddings·0 = 0, which hides the NaN from a guard; its NTXentLoss is NaN.)
    emb, labels = batch(10, 6, 3)
    ref, ref_labels = batch(12, 6, 3, seed=1)
    ref[4, 2] = float("nan")
    peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [emb],
                      lambda f, e: f(e, labels, ref_emb=ref, ref_labels=ref_labels))
    assert torch.isnan(ours[0])
    assert torch.isnan(peer[0]) or peer[0] == 0


def test_pml_circle_rows_that_underflow_to_zero():
    # At γ = 2048 a tight class (positives at cos ≈ 1, negatives at cos ≤ 0) has rows of about e^-126: 0 in
    # fp32. AvgNonZeroReducer drops those rows from the mean; the other rows count.
    gen = torch.Generator().manual_seed(3)
    e0 = torch.zeros(1, 16)
    e0[0, 0] = 1
    tight = e0 + 1e-4 * torch.randn(4, 16, generator=gen)
    loose = torch.randn(6, 16, generator=gen)
    loose[:, 0] = 0  # orthogonal to the tight class
    emb = torch.cat([tight, -e0.expand(2, 16), loose])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    kwargs = dict(m=0.25, gamma=2048)
    peer, ours = both(lambda: pml.CircleLoss(**kwargs), lambda: our_pml.CircleLoss(**kwargs), [emb],
                      lambda f, e: f(e, labels))
    rows = our_pml.F.oucl_embeddings(emb, labels, form="circle", beta=2048.0, margin=0.25, similarity="cosine",
                                     reduction="none")
    assert (rows[:6] == 0).all() and (rows[6:] > 0).all()
    assert_same(peer, ours, torch.float32)


def test_pml_distances_and_temperature_tensor():
    emb, labels = batch(24, 8, 5)
    dot = dict(distance=pml_distances.DotProductSimilarity(normalize_embeddings=False))
    peer, ours = both(lambda: pml.NTXentLoss(0.3, **dot), lambda: our_pml.NTXentLoss(0.3, **dot), [0.3 * emb],
                      lambda f, e: f(e, labels))
    assert_same(peer, ours)
    explicit = dict(distance=pml_distances.CosineSimilarity(), reducer=pml_reducers.AvgNonZeroReducer())
    peer, ours = both(lambda: pml.CircleLoss(**explicit), lambda: our_pml.CircleLoss(**explicit), [emb],
                      lambda f, e: f(e, labels))
    assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss = our_pml.NTXentLoss(tau)(emb, labels)
    (g,) = torch.autograd.grad(loss, tau)
    step = 1e-6
    fd = (our_pml.NTXentLoss(0.2 + step)(emb, labels) - our_pml.NTXentLoss(0.2 - step)(emb, labels)) / (2 * step)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kwargs, call, match", [
    (dict(distance=pml_distances.LpDistance()), None, "distance"),
    (dict(distance=pml_distances.CosineSimilarity(power=2)), None, "distance"),
    (dict(reducer=pml_reducers.SumReducer()), None, "reducer"),
    (dict(reducer=pml_reducers.ThresholdReducer(low=0.5)), None, "reducer"),
    (dict(embedding_regularizer=object()), None, "embedding_regularizer"),
    (dict(collect_stats=True), None, "collect_stats"),
    ({}, dict(indices_tuple=(torch.tensor([0]), torch.tensor([1]))), "indices_tuple"),
    ({}, dict(labels=None), "labels"),
    ({}, dict(ref_emb=torch.randn(3, 4)), "ref_labels"),
])
@pytest.mark.parametrize("name", ["CircleLoss", "NTXentLoss"])
def test_pml_unsupported_options_raise(name, kwargs, call, match):
    emb, labels = batch(6, 4, 2)
    with pytest.raises(ValueError, match=match):
        loss_fn = getattr(our_pml, name)(**kwargs)
        loss_fn(emb, **dict(dict(labels=labels), **(call or {})))


def test_pml_circle_rejects_dot_products():
    with pytest.raises(ValueError, match="distance"):
        our_pml.CircleLoss(distance=pml_distances.DotProductSimilarity(normalize_embeddings=False))


# ------------------------------------------------------------------------------------------------ open_clip
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("B", [1, 2, 33])
def test_open_clip(dtype, B):
    image, _ = batch(B, 16, 1, dtype)
    text, _ = batch(B, 16, 1, dtype, seed=1)
    image, text = torch.nn.functional.normalize(image, dim=1), torch.nn.functional.normalize(text + 0.5 * image, dim=1)
    scale = torch.tensor(2.659, dtype=dtype)  # log(1/0.07), CLIP's initial logit_scale
    peer, ours = both(open_clip_loss.ClipLoss, our_open_clip.ClipLoss, [image, text, scale],
                      lambda f, i, t, s: f(i, t, s.exp()))
    assert_same(peer, ours, dtype)


@pytest.mark.parametrize("scale", ["shape1", "zero", "negative", "zero_float", "negative_float"])
def test_open_clip_logit_scale_shapes_and_signs(scale):
    # Checkpoints hold logit_scale as [1]; a zero scale gives log B, a negative one flips the logits: as
    # open_clip, values and gradients (logit_scale's included).
    image, text = batch(7, 5, 1)[0], batch(7, 5, 1, seed=2)[0]
    value = {"shape1": torch.tensor([14.3], dtype=torch.float64), "zero": torch.tensor(0.0, dtype=torch.float64),
             "negative": torch.tensor(-3.5, dtype=torch.float64), "zero_float": 0.0, "negative_float": -3.5}[scale]
    inputs = [image, text] + ([value] if isinstance(value, torch.Tensor) else [])
    call = (lambda f, i, t, s: f(i, t, s)) if isinstance(value, torch.Tensor) else (lambda f, i, t: f(i, t, value))
    peer, ours = both(open_clip_loss.ClipLoss, our_open_clip.ClipLoss, inputs, call)
    assert_same(peer, ours)
    if scale.startswith("zero"):
        assert abs(ours[0].item() - math.log(7)) < 1e-12


def test_open_clip_logits_and_ground_truth():
    image, text = batch(6, 4, 1)[0], batch(6, 4, 1, seed=2)[0]
    scale, bias = torch.tensor([2.5], dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    for got, want in zip(our_open_clip.ClipLoss().get_logits(image, text, scale, bias),
                         open_clip_loss.ClipLoss().get_logits(image, text, scale, bias)):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    kw = dict(world_size=2, rank=1, local_loss=True)
    torch.testing.assert_close(our_open_clip.ClipLoss(**kw).get_ground_truth("cpu", 4),
                               open_clip_loss.ClipLoss(**kw).get_ground_truth("cpu", 4))
    with pytest.raises(ValueError, match="world_size=2"):
        our_open_clip.ClipLoss(world_size=2, rank=1).get_logits(image, text, scale)
    with pytest.raises(ValueError, match="logit_scale must be"):
        our_open_clip.ClipLoss()(image, text, torch.ones(2))


def test_open_clip_raw_features_bias_and_dict():
    image, text = batch(9, 5, 1)[0], batch(9, 5, 1, seed=2)[0]
    bias = torch.tensor(-3.0, dtype=torch.float64)
    peer, ours = both(open_clip_loss.ClipLoss, our_open_clip.ClipLoss, [image, text, bias],
                      lambda f, i, t, b: f(i, t, 1.7, logit_bias=b, output_dict=True)["contrastive_loss"])
    assert_same(peer[:3], ours[:3])
    torch.testing.assert_close(peer[3], ours[3], rtol=0, atol=1e-12)  # the bias cancels: ~0 and 0
    empty, scale = torch.zeros(0, 5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    peer, ours = both(open_clip_loss.ClipLoss, our_open_clip.ClipLoss, [empty, empty, scale],
                      lambda f, i, t, s: f(i, t, s))
    assert torch.isnan(peer[0]) and torch.isnan(ours[0])  # open_clip's mean over no rows
    assert_same(peer[1:], ours[1:])
    with pytest.raises(ValueError, match="use_horovod"):
        our_open_clip.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="text_features"):
        our_open_clip.ClipLoss()(image, text[:4], 1.0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        our_open_clip.ClipLoss(rank=0, world_size=2)(image, text, 1.0)


# -------------------------------------------------------------------------------------------------- lightly
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("temperature", [0.5, 0.1, -0.3])  # lightly takes any |τ| >= 1e-8
def test_lightly_in_batch(dtype, temperature):
    out0, _ = batch(17, 12, 1, dtype)
    out1 = out0 + 0.3 * batch(17, 12, 1, dtype, seed=1)[0]
    peer, ours = both(lambda: lightly_loss.NTXentLoss(temperature), lambda: our_lightly.NTXentLoss(temperature),
                      [out0, out1], lambda f, a, b: f(a, b))
    assert_same(peer, ours, dtype)
    peer, ours = both(lightly_loss.NTXentLoss, our_lightly.NTXentLoss, [out0[:1], out1[:1]], lambda f, a, b: f(a, b))
    assert_same(peer, ours, dtype)  # one sample: no negative, loss 0


@pytest.mark.parametrize("temperature", [0.2, -0.2])
def test_lightly_memory_bank_over_several_steps(temperature):
    # Seeded alike, both banks start from the same random rows; 4 steps of 5 rows wrap a 12-row bank (lightly
    # drops the rows that do not fit), and a step whose out0 needs no gradient leaves the bank as it is.
    losses = {}
    for name, module in (("peer", lightly_loss), ("ours", our_lightly)):
        torch.manual_seed(5)
        loss_fn = module.NTXentLoss(temperature=temperature, memory_bank_size=(12, 6)).double()
        results = []
        for step in range(5):
            out0, _ = batch(5, 6, 1, seed=10 + step)
            out1 = out0 + 0.2 * batch(5, 6, 1, seed=20 + step)[0]
            out0.requires_grad_(step != 3)
            out1.requires_grad_()
            loss = loss_fn(out0, out1)
            grads = torch.autograd.grad(loss, [out0, out1] if step != 3 else [out1])
            results.append([loss.detach(), *grads])
        bank = loss_fn.memory_bank if module is lightly_loss else loss_fn
        losses[name] = (results, bank.bank.clone(), bank.bank_ptr.clone())
    for peer, ours in zip(losses["peer"][0], losses["ours"][0]):
        assert_same(peer, ours)
    torch.testing.assert_close(losses["ours"][1], losses["peer"][1], rtol=0, atol=0)
    assert losses["ours"][2].tolist() == losses["peer"][2].tolist()


def test_lightly_errors():
    for size, match in ((-1, "non-negative"), (5, "feature dimension"), ((1, 2, 3), "tuple")):
        with pytest.raises(ValueError, match=match):
            our_lightly.NTXentLoss(memory_bank_size=size)
    with pytest.raises(ValueError, match="temperature"):
        our_lightly.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="out1"):
        our_lightly.NTXentLoss()(torch.randn(3, 4), torch.randn(2, 4))
    empty = torch.zeros(0, 4)
    with pytest.raises(ValueError, match="empty"):  # lightly fails there too (a reshape of no logits)
        our_lightly.NTXentLoss()(empty, empty)
    with pytest.raises(RuntimeError):
        lightly_loss.NTXentLoss()(empty, empty)
    banked = [m.NTXentLoss(memory_bank_size=(8, 4))(empty, empty) for m in (lightly_loss, our_lightly)]
    assert all(torch.isnan(x) for x in banked)


# ------------------------------------------------------------------------------------------ official MetAug
@pytest.mark.parametrize("delta_enable", ["no", "yes"])
@pytest.mark.parametrize("alpha_enable", ["no", "yes"])
def test_official_criterion(delta_enable, alpha_enable):
    gen = torch.Generator().manual_seed(9)
    outs = [torch.rand(8, 1 + k, 1, generator=gen, dtype=torch.float64) * 2 - 1 for k in (5, 5, 5, 7, 7, 7)]
    args = types.SimpleNamespace(gama_gh=16.0, delta_m_gh=0.3, delta_enable_gh=delta_enable, alpha_m_gh=0.25,
                                 alpha_de_gh=1.0, alpha_enable_gh=alpha_enable)
    delta = (0.7, 0.3) if delta_enable == "yes" else (0.0, 0.0)
    peer, ours = both(lambda: lambda *o: official_value(o, 16.0, *delta), lambda: our_official.CircleLoss(args),
                      outs, lambda f, *o: f(*o))
    assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)
    with pytest.raises(ValueError, match="delta_enable"):
        our_official.CircleLoss(args, delta_enable="maybe")
    with pytest.raises(ValueError, match="out_l2ori"):
        our_official.CircleLoss(args)(*outs[:3], outs[3][:4], *outs[4:])
