"""metaug_fast.large_batch.cached_backward: the gradient-cached step gives the parameters the gradients of the
plain step (fp64, 1e-10): of one big batch without dropout or BatchNorm, of the same chunks run with their
graph with dropout (random state replayed) and with BatchNorm (statistics per chunk, running statistics
updated once per chunk); with a memory bank, a GradScaler, and across 2 gloo processes under DDP."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import metaug_fast
import metaug_fast.functional as F
from metaug_fast import large_batch

from conftest import gloo_group

B, D_IN, D = 24, 10, 6


class TwoViews(nn.Module):
    """An encoder applied to two views: (v1, v2) -> (z1, z2)."""

    def __init__(self, dropout=0.0, batch_norm=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        layers = [nn.Linear(D_IN, 16)] + ([nn.BatchNorm1d(16)] if batch_norm else []) + [nn.ReLU()]
        layers += ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(16, D)]
        self.net = nn.Sequential(*layers).double()

    def forward(self, v1, v2):
        return self.net(v1), self.net(v2)


def _batch(n=B, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    return x, x + 0.1 * torch.randn(n, D_IN, generator=gen, dtype=torch.float64)


def _simclr(z1, z2):
    return F.info_nce_embeddings(torch.cat([z1, z2]), torch.arange(len(z1)).repeat(2), temperature=0.2)


def _oucl(z1, z2):
    return metaug_fast.OUCLLoss(form="circle", beta=16.0).embeddings(torch.cat([z1, z2]),
                                                                     torch.arange(len(z1)).repeat(2))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _plain(model, inputs, loss_fn, chunk_size=None):
    """The plain step: the whole batch at once, or (chunk_size) the same chunks each with its graph."""
    model.zero_grad()
    if chunk_size is None:
        outs = model(*inputs)
    else:
        parts = [model(*(x[s:s + chunk_size] for x in inputs)) for s in range(0, len(inputs[0]), chunk_size)]
        outs = tuple(torch.cat(p) for p in zip(*parts))
    loss = loss_fn(*outs)
    loss.backward()
    return loss.detach(), _grads(model)


def _cached(model, inputs, loss_fn, chunk_size, **kw):
    model.zero_grad()
    loss = large_batch.cached_backward(model, inputs, loss_fn, chunk_size=chunk_size, **kw)
    return loss.detach(), _grads(model)


def _assert_equal(got, want, tol=1e-10):
    (lg, gg), (lw, gw) = got, want
    torch.testing.assert_close(lg, lw, rtol=tol, atol=tol)
    for g, w in zip(gg, gw):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * w.abs().max().item())


@pytest.mark.parametrize("loss_fn", [_simclr, _oucl], ids=["info_nce", "oucl"])
@pytest.mark.parametrize("chunk_size", [1, 7, 24, 100])
def test_equals_the_big_batch_step(loss_fn, chunk_size):
    model, inputs = TwoViews(), _batch()
    _assert_equal(_cached(model, inputs, loss_fn, chunk_size), _plain(model, inputs, loss_fn))


def test_dropout_replays_the_random_state():
    model, inputs = TwoViews(dropout=0.5), _batch()
    torch.manual_seed(5)
    want = _plain(model, inputs, _simclr, chunk_size=7)
    after_plain = torch.rand(3)
    torch.manual_seed(5)
    got = _cached(model, inputs, _simclr, 7)
    _assert_equal(got, want)
    torch.testing.assert_close(torch.rand(3), after_plain)  # the generator ends where the plain step leaves it
    torch.manual_seed(6)  # other masks: another gradient (the comparison above can fail)
    other = _plain(model, inputs, _simclr, chunk_size=7)
    assert not torch.allclose(other[1][0], want[1][0])


def test_batch_norm_statistics_per_chunk():
    model, inputs = TwoViews(batch_norm=True), _batch()
    reference = TwoViews(batch_norm=True)
    want = _plain(reference, inputs, _simclr, chunk_size=8)
    got = _cached(model, inputs, _simclr, 8)
    _assert_equal(got, want)
    for b, w in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(b, w, rtol=1e-12, atol=0)  # running statistics updated once per chunk


def test_batch_norm_through_a_plain_callable():
    # The model a lambda over a module: the first pass's BatchNorm updates are undone all the same, so the
    # running statistics move once per chunk (num_batches_tracked 6 after 3 chunks of two views, not 12).
    enc, reference = TwoViews(batch_norm=True).net, TwoViews(batch_norm=True)
    inputs = _batch()
    want = _plain(reference, inputs, _simclr, chunk_size=8)
    enc.zero_grad()
    loss = large_batch.cached_backward(lambda a, b: (enc(a), enc(b)), inputs, _simclr, chunk_size=8)
    _assert_equal((loss.detach(), [p.grad.clone() for p in enc.parameters()]), want)
    assert int(enc[1].num_batches_tracked) == 6
    for b, w in zip(enc.buffers(), reference.buffers()):
        torch.testing.assert_close(b, w, rtol=1e-12, atol=0)


def test_memory_bank_and_grad_scaler():
    model, inputs = TwoViews(), _batch()
    bank, bank_labels = torch.randn(50, D, dtype=torch.float64), torch.arange(50) % 7

    def with_bank(z1, z2):
        return F.oucl_embeddings(z1, torch.arange(len(z1)) % 7, bank, bank_labels) + _simclr(z1, z2)

    _assert_equal(_cached(model, inputs, with_bank, 5), _plain(model, inputs, with_bank))
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    loss, grads = _cached(model, inputs, _simclr, 5, scaler=scaler)
    want_loss, want = _plain(model, inputs, _simclr)
    _assert_equal((loss, [g / 64 for g in grads]), (want_loss, want))


def test_bad_input_and_no_second_backward():
    model, inputs = TwoViews(), _batch()
    with pytest.raises(ValueError, match="chunk_size"):
        large_batch.cached_backward(model, inputs, _simclr, chunk_size=0)
    with pytest.raises(ValueError, match="inputs\\[1\\]"):
        large_batch.cached_backward(model, (inputs[0], inputs[1][:5]), _simclr, chunk_size=4)
    with pytest.raises(TypeError, match="inputs"):
        large_batch.cached_backward(model, inputs[0], _simclr, chunk_size=4)
    with pytest.raises(ValueError, match="scalar"):
        large_batch.cached_backward(model, inputs, lambda z1, z2: z1.sum(1), chunk_size=4)
    loss, (z1, z2) = large_batch.cached_backward(model, inputs, _simclr, chunk_size=4, return_embeddings=True)
    want = model(*inputs)
    torch.testing.assert_close((z1, z2), tuple(w.detach() for w in want))
    assert not z1.requires_grad
    with pytest.raises(RuntimeError, match="already back-propagated"):
        loss.backward()
    single = large_batch.cached_backward(model, inputs, _simclr, chunk_size=B)  # one chunk: the plain step
    with pytest.raises(RuntimeError, match="already back-propagated"):
        single.backward()


# -------------------------------------------------------------------------------------- two processes
SIZES = (10, 14)


def _worker(rank, world, init_file, out_dir):
    with gloo_group(rank, world, init_file):
        x1, x2 = _batch(sum(SIZES))
        start = sum(SIZES[:rank]) if world == 2 else 0
        stop = start + (SIZES[rank] if world == 2 else sum(SIZES))
        labels = (torch.arange(sum(SIZES)) % 9)[start:stop]
        for mode in ("all_gather", "ring"):
            loss_fn = metaug_fast.OUCLLoss(distributed=mode)
            model = nn.parallel.DistributedDataParallel(TwoViews())

            def loss_of(z1, z2):  # DDP averages over ranks: the world size undoes it
                return world * loss_fn.embeddings(torch.cat([z1, z2]), torch.cat([labels, labels]))

            loss = large_batch.cached_backward(model, (x1[start:stop], x2[start:stop]), loss_of, chunk_size=4)
            result = (loss.detach() / world, _grads(model.module))
            torch.save(result, os.path.join(out_dir, f"{mode}_{world}_{rank}.pt"))


@pytest.mark.timeout(180)
def test_two_processes_equal_one():
    # all_gather and ring modes. Both ranks' losses are the global one; under DDP both hold the same (averaged)
    # gradients, which equal those of one process on the concatenated batch.
    with tempfile.TemporaryDirectory() as d:
        for world in (1, 2):
            mp.spawn(_worker, args=(world, os.path.join(d, f"init{world}"), d), nprocs=world, join=True)
        for mode in ("all_gather", "ring"):
            want = torch.load(os.path.join(d, f"{mode}_1_0.pt"))
            for rank in range(2):
                _assert_equal(torch.load(os.path.join(d, f"{mode}_2_{rank}.pt")), want)


# ------------------------------------------------------------------------------------------- the trainer
@pytest.mark.parametrize("method", ["oucl", "infonce", "metaug"])
def test_metaug_step_with_chunks(method):
    # The encoder step with chunk_size equals the plain one (a model without BatchNorm); MetAug's meta step
    # then runs on a sub-batch of chunk_size samples and moves the MAGs.
    from metaug_fast.metaug.bank import MemoryBank
    from metaug_fast.metaug.mag import MetaFeatureAugmenter
    from metaug_fast.metaug.step import MetAugConfig, MetAugStep

    inputs = _batch()
    results = []
    for chunk_size in (0, 5):
        torch.manual_seed(3)
        mags = nn.ModuleList([MetaFeatureAugmenter(D, 8), MetaFeatureAugmenter(D, 8)]).double()
        bank = MemoryBank(40, D, generator=torch.Generator().manual_seed(4))
        bank.features = bank.features.double()
        model = TwoViews()
        cfg = MetAugConfig(method=method, k_neg=7, chunk_size=chunk_size, eta=0.1, alpha=0.1)
        step = MetAugStep(model, mags, bank, cfg)
        mag_before = [p.detach().clone() for p in mags.parameters()]
        out = step(inputs, torch.arange(B) % 40, torch.Generator().manual_seed(5))
        results.append((out, [p.detach().clone() for p in model.parameters()], bank.features.clone()))
        if method == "metaug":
            assert torch.isfinite(torch.tensor(out["meta"]))
            assert any(not torch.equal(a, b) for a, b in zip(mag_before, mags.parameters()))
    (out0, params0, bank0), (out1, params1, bank1) = results
    assert out0["loss"] == pytest.approx(out1["loss"], rel=1e-12)
    for a, b in zip(params1, params0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bank1, bank0, rtol=1e-10, atol=1e-12)


def test_drop_in_losses_and_autocast():
    # The drop-in classes as the loss; under bf16 autocast the cached step equals the plain one to bf16's
    # precision (the same chunks of matrix products, rounded alike).
    from metaug_fast.losses import open_clip, pml

    model, inputs = TwoViews(), _batch()
    circle, clip = pml.CircleLoss(), open_clip.ClipLoss()
    for loss_fn in (lambda z1, z2: circle(torch.cat([z1, z2]), torch.arange(len(z1)).repeat(2)),
                    lambda z1, z2: clip(z1, z2, 10.0)):
        _assert_equal(_cached(model, inputs, loss_fn, 5), _plain(model, inputs, loss_fn), tol=5e-9)
    model, inputs = TwoViews().float(), tuple(x.float() for x in _batch())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _cached(model, inputs, _simclr, 8), _plain(model, inputs, _simclr, chunk_size=8)
    _assert_equal(got, want, tol=1e-2)
