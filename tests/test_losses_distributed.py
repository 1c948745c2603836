"""The drop-ins across 2 gloo processes: on every rank ours gives the peer's value and gradients.

- open_clip's ClipLoss (features and logit_scale) in each local_loss × gather_with_grad setting; the global
  loss also equals one process on the whole batch;
- lightly's NTXentLoss with gather_distributed;
- PML's CircleLoss and NTXentLoss inside PML's DistributedLossWrapper (efficient or not) and a
  CrossBatchMemory inside it, against PML's own classes in the same wrapper."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from metaug_fast.losses import lightly as our_lightly
from metaug_fast.losses import open_clip as our_open_clip
from metaug_fast.losses import pml as our_pml

open_clip_loss = pytest.importorskip("open_clip.loss")
lightly_loss = pytest.importorskip("lightly.loss")
pml = pytest.importorskip("pytorch_metric_learning.losses")
pml_distributed = pytest.importorskip("pytorch_metric_learning.utils.distributed")


from conftest import gloo_group  # noqa: E402  (after the peers are known to import)

B, D, WORLD = 5, 8, 2


def _features(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * B, D, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1)


def _run(loss_fn, rows, scale):
    """(loss, ∂/∂image rows, ∂/∂text rows, ∂/∂log scale)."""
    image, text = _features(0)[rows].clone().requires_grad_(), _features(1)[rows].clone().requires_grad_()
    log_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(image, text, log_scale.exp())
    return [loss.detach(), *torch.autograd.grad(loss, (image, text, log_scale))]


def _close(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what} output {i}: {m}")


def _worker(rank, init_file):
    with gloo_group(rank, WORLD, init_file):
        mine = slice(rank * B, (rank + 1) * B)
        whole = _run(open_clip_loss.ClipLoss(), slice(None), 1.3)
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=WORLD)
                want = _run(open_clip_loss.ClipLoss(**kw), mine, 1.3)
                got = _run(our_open_clip.ClipLoss(**kw), mine, 1.3)
                _close(got, want, f"ClipLoss {kw}")
                if not local_loss:  # the global loss: one process's, gradients world_size times with the gather's
                    factor = WORLD if gather_with_grad else 1
                    _close(got, [whole[0], factor * whole[1][mine], factor * whole[2][mine], whole[3]],
                           f"ClipLoss {kw} against one process")
        out0, out1 = _features(2)[mine], _features(3)[mine]
        for tau in (0.3, -0.3):
            results = []
            for module in (lightly_loss, our_lightly):
                a, b = out0.clone().requires_grad_(), out1.clone().requires_grad_()
                loss = module.NTXentLoss(temperature=tau, gather_distributed=True)(a, b)
                results.append([loss.detach(), *torch.autograd.grad(loss, (a, b))])
            _close(results[1], results[0], f"lightly NTXentLoss gather_distributed, temperature {tau}")
        _pml_wrappers(rank)


def _pml_wrappers(rank):
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(WORLD, 3, B, D, generator=gen, dtype=torch.float64)[rank]
    labels = torch.randint(0, 3, (WORLD, 3, B), generator=gen)[rank]
    for name in ("CircleLoss", "NTXentLoss"):
        for how in ("plain", "efficient", "memory"):
            results = []
            for lib in (pml, our_pml):
                loss_fn = getattr(lib, name)()
                if how == "memory":
                    loss_fn = pml.CrossBatchMemory(loss_fn, D, memory_size=3 * B)
                wrapper = pml_distributed.DistributedLossWrapper(loss_fn, efficient=how == "efficient")
                out = []
                for step in range(3):  # the memory fills over the steps
                    x = emb[step].clone().requires_grad_()
                    loss = wrapper(x, labels[step])
                    out += [loss.detach(), *torch.autograd.grad(loss, x)]
                results.append(out)
            _close(results[1], results[0], f"PML {name} in DistributedLossWrapper, {how}")


@pytest.mark.timeout(180)
def test_distributed_drop_ins_equal_their_peers():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"),), nprocs=WORLD, join=True)
