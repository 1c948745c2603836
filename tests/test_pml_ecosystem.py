"""The PML drop-ins in the code people write around pytorch-metric-learning: miners' indices_tuple, float
labels, and PML's wrappers (CrossBatchMemory, SelfSupervisedLoss, MultipleLosses) holding our classes, each
against PML doing the same with its own class, values and gradients. DistributedLossWrapper across two
processes: test_losses_distributed.py."""
import subprocess
import sys

import pytest
import torch
from peers import SOFTPLUS_CUTOFF, TOL, assert_same, batch, both

from metaug_fast.losses import pml as our_pml

pml = pytest.importorskip("pytorch_metric_learning.losses")
miners = pytest.importorskip("pytorch_metric_learning.miners")

NAMES = ["CircleLoss", "NTXentLoss"]


def _tol(name, dtype):
    return SOFTPLUS_CUTOFF if name == "CircleLoss" and dtype == torch.float64 else TOL[dtype]


def _duplicated(*batch):
    """A hand-written pairs tuple that lists pairs twice and across labels (a miner may list anything)."""
    a1, p = torch.tensor([0, 0, 3, 3, 5, 1]), torch.tensor([2, 2, 7, 1, 0, 9])
    a2, n = torch.tensor([0, 0, 0, 3, 5, 5, 8]), torch.tensor([1, 1, 4, 4, 6, 2, 3])
    return a1, p, a2, n


MINERS = {
    "multi_similarity": lambda: miners.MultiSimilarityMiner(epsilon=0.2),
    "triplet_all": lambda: miners.TripletMarginMiner(margin=0.5, type_of_triplets="all"),
    "batch_hard": lambda: miners.BatchHardMiner(),
    "pair_margin": lambda: miners.PairMarginMiner(pos_margin=0.2, neg_margin=1.2),
    "batch_easy_hard": lambda: miners.BatchEasyHardMiner(),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("miner", [*MINERS, "duplicated"])
@pytest.mark.parametrize("name", NAMES)
def test_miners_indices_tuple(name, miner, dtype):
    emb, labels = batch(24, 8, 4, dtype)
    mine = _duplicated if miner == "duplicated" else MINERS[miner]()
    indices = mine(emb, labels, emb, labels)
    peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [emb],
                      lambda f, e: f(e, labels, indices))
    assert peer[0] != 0
    assert_same(peer, ours, dtype, _tol(name, dtype))


@pytest.mark.parametrize("miner", ["multi_similarity", "triplet_all", "pair_margin"])
@pytest.mark.parametrize("name", NAMES)
def test_miners_with_a_reference_set(name, miner):
    # Anchors index the embeddings, positives and negatives the reference rows; labels may then be None.
    emb, labels = batch(14, 6, 3)
    ref, ref_labels = batch(19, 6, 3, seed=1)
    indices = MINERS[miner]()(emb, labels, ref, ref_labels)
    for given in (labels, None):
        peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [emb, ref],
                          lambda f, e, r: f(e, given, indices, ref_emb=r, ref_labels=ref_labels))
        assert_same(peer, ours, tol=_tol(name, torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_indices_tuple_edges(name):
    # No pair at all, one pair of each kind (PML's zero loss), positives without negatives and negatives
    # without positives (zero loss too), and a NaN embedding inside and outside the listed pairs.
    emb, labels = batch(6, 4, 2)
    empty = torch.zeros(0, dtype=torch.long)
    cases = [(empty, empty, empty), (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])),
             (torch.tensor([0, 1]), torch.tensor([1, 0]), empty, empty),
             (empty, empty, torch.tensor([0, 1]), torch.tensor([2, 3])),
             (torch.tensor([0, 1, 2]), torch.tensor([1, 0, 3]), torch.tensor([0, 0]), torch.tensor([4, 5]))]
    for indices in cases:
        peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [emb],
                          lambda f, e: f(e, labels, indices))
        assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)
    listed = (torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), torch.tensor([0, 1, 2]), torch.tensor([3, 3, 4]))
    for row in (3, 2):  # a NaN in a listed pair: NaN; PML's CircleLoss may drop the row, with NaN gradients
        bad = emb.clone()
        bad[row, 1] = float("nan")
        peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [bad],
                          lambda f, e: f(e, labels, listed))
        assert torch.isnan(ours[0])
        assert torch.isnan(peer[0]) or not torch.isfinite(peer[1]).all()
    # A NaN in a row no pair lists: the loss does not depend on it, so it is PML's finite value, and the row's
    # gradient is 0 (PML's matrix spreads NaN to every row's gradient).
    bad = emb.clone()
    bad[5, 1] = float("nan")
    clean = emb.clone()
    clean[5] = 0
    want = both(lambda: getattr(pml, name)(), lambda: getattr(pml, name)(), [clean],
                lambda f, e: f(e, labels, listed))[0]
    got = both(lambda: getattr(our_pml, name)(), lambda: getattr(our_pml, name)(), [bad],
               lambda f, e: f(e, labels, listed))[0]
    assert_same(want, got, tol=SOFTPLUS_CUTOFF)


@pytest.mark.parametrize("indices, error, match", [
    ((torch.tensor([0]), torch.tensor([1])), ValueError, "triplets .* or pairs"),
    ([torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])], TypeError, r"indices_tuple\[0\]"),
    ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2, 2])), ValueError, "differ in length"),
    ((torch.tensor([0, 1]), torch.tensor([1, 6]), torch.tensor([2, 2])), ValueError, "from 1 to 6, outside"),
    ((torch.tensor([-1, 1]), torch.tensor([1, 2]), torch.tensor([2, 2])), ValueError, "from -1 to 1, outside"),
])
@pytest.mark.parametrize("name", NAMES)
def test_bad_indices_tuple_raises(name, indices, error, match):
    emb, labels = batch(6, 4, 2)
    with pytest.raises(error, match=match):
        getattr(our_pml, name)()(emb, labels, indices)


@pytest.mark.parametrize("name", NAMES)
def test_float_labels(name):
    # PML compares labels with ==: floats as integers, a NaN label matching nothing (not even itself).
    emb, labels = batch(16, 6, 4)
    ref, ref_labels = batch(11, 6, 4, seed=1)
    floats = labels.double() / 2
    floats[[3, 9]] = float("nan")
    for call in (lambda f, e, r: f(e, floats), lambda f, e, r: f(e, floats, ref_emb=r, ref_labels=ref_labels.float()),
                 lambda f, e, r: f(e, floats, ref_emb=r, ref_labels=ref_labels),
                 lambda f, e, r: f(e, floats, ref_emb=r[:1].expand(16, 6) + e, ref_labels=floats)):
        peer, ours = both(lambda: getattr(pml, name)(), lambda: getattr(our_pml, name)(), [emb, ref], call)
        assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)


@pytest.mark.parametrize("with_miner", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_cross_batch_memory(name, with_miner):
    # Four steps through a memory of 30 rows (it wraps around); the last step enqueues half the batch.
    results = []
    for lib in (pml, our_pml):
        miner = miners.MultiSimilarityMiner(epsilon=0.3) if with_miner else None
        memory = pml.CrossBatchMemory(getattr(lib, name)(), 8, memory_size=30, miner=miner)
        out = []
        for step in range(4):
            emb, labels = batch(12, 8, 4, seed=step)
            emb.requires_grad_()
            enqueue = (torch.arange(12) % 2 == 0) if step == 3 else None
            loss = memory(emb, labels, enqueue_mask=enqueue)
            out += [loss.detach(), *torch.autograd.grad(loss, emb)]
        results.append(out)
    assert_same(*results, tol=SOFTPLUS_CUTOFF)


@pytest.mark.parametrize("name", NAMES)
def test_self_supervised_and_multiple_losses(name):
    emb, labels = batch(10, 8, 3)
    ref = batch(10, 8, 3, seed=1)[0]
    for symmetric in (True, False):
        peer, ours = both(lambda: pml.SelfSupervisedLoss(getattr(pml, name)(), symmetric=symmetric),
                          lambda: pml.SelfSupervisedLoss(getattr(our_pml, name)(), symmetric=symmetric),
                          [emb, ref], lambda f, e, r: f(e, r))
        assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)

    def multiple(lib):
        return pml.MultipleLosses({"a": getattr(lib, name)(), "b": getattr(lib, name)()},
                                  miners={"a": miners.MultiSimilarityMiner()}, weights={"a": 1.0, "b": 0.5})
    peer, ours = both(lambda: multiple(pml), lambda: multiple(our_pml), [emb], lambda f, e: f(e, labels))
    assert_same(peer, ours, tol=SOFTPLUS_CUTOFF)


def test_pml_base_class_and_defaults():
    # PML's wrappers take only its BaseMetricLossFunction; the default distance and reducer objects are PML's.
    for name, reducer in (("CircleLoss", "AvgNonZeroReducer"), ("NTXentLoss", "MeanReducer")):
        loss_fn = getattr(our_pml, name)()
        assert isinstance(loss_fn, pml.BaseMetricLossFunction)
        assert type(loss_fn.distance).__name__ == "CosineSimilarity"
        assert type(loss_fn.reducer).__name__ == reducer


def test_without_pml_installed():
    # Without pytorch-metric-learning the classes are plain modules and compute the same.
    emb, labels = batch(12, 6, 3)
    want = [float(getattr(our_pml, n)()(emb, labels)) for n in NAMES]
    code = (
        "import sys, torch; sys.modules['pytorch_metric_learning'] = None\n"
        "from metaug_fast.losses import pml\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "emb = torch.randn(12, 6, generator=gen, dtype=torch.float64)\n"
        "labels = torch.randint(0, 3, (12,), generator=gen)\n"
        "assert type(pml.CircleLoss()).__mro__[2] is torch.nn.Module\n"
        "print(repr([float(getattr(pml, n)()(emb, labels)) for n in ('CircleLoss', 'NTXentLoss')]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert eval(out.stdout) == want
