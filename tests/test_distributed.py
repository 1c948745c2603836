"""all_gather OUCL on 2 CPU processes (gloo): the loss and every rank's gradient equal those of one process
holding the concatenated batch (float64, 1e-10), for unequal batch sizes and a class only one rank has."""
import contextlib
import dataclasses
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metaug_fast
from metaug_fast import reference as R
from metaug_fast.distributed import (
    info_nce_embeddings_all_gather,
    oucl_embeddings_all_gather,
    oucl_embeddings_ring,
    shutdown,
)

from conftest import requires_cpp

SIZES = (5, 7)  # unequal rows per rank (a 1-process group gets all 12)
CASES = [("reference", "weighted", "mean"), ("reference", "circle", "sum"), ("cpp", "weighted", "mean"),
         ("cpp", "hinge", "mean"), ("cpp", "squared", "sum")]


def _global_batch():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(sum(SIZES), 6, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 4, 4, 1])  # class 3 and 4 live on rank 1 only
    return emb, labels


def _init(rank, world, init_file, seconds=60):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=seconds))


def _spawn(worker, world, *args):
    """``worker(rank, world, init_file, *args)`` on ``world`` processes of one gloo group."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(world, os.path.join(d, "init"), *args), nprocs=world, join=True)


def _rows_of(rank, world):
    """This rank's rows [start, stop) of the global batch (all of them in a 1-process group)."""
    sizes = SIZES if world == 2 else (sum(SIZES),)
    return sum(sizes[:rank]), sum(sizes[: rank + 1])


def _worker(rank, world, init_file, cases):
    _init(rank, world, init_file)
    try:
        emb, labels = _global_batch()
        start, stop = _rows_of(rank, world)
        for backend, form, reduction in cases:
            kw = dict(form=form, beta=8.0, margin=0.3, lam=0.2)
            whole = emb.clone().requires_grad_()
            want = R.oucl_embeddings(whole, labels, reduction=reduction, **kw)
            want.backward()
            mine = emb[start:stop].clone().requires_grad_()
            got = oucl_embeddings_all_gather(mine, labels[start:stop], reduction=reduction, backend=backend, **kw)
            got.backward()
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(mine.grad, whole.grad[start:stop], rtol=1e-10, atol=1e-12)
            module = metaug_fast.OUCLLoss(reduction=reduction, backend=backend, distributed="all_gather", **kw)
            torch.testing.assert_close(module.embeddings(emb[start:stop], labels[start:stop]), want.detach(),
                                       rtol=1e-10, atol=1e-12)
            if backend == "cpp":  # ring mode runs on the fused label op
                ring_in = emb[start:stop].clone().requires_grad_()
                ring = oucl_embeddings_ring(ring_in, labels[start:stop], reduction=reduction, **kw)
                ring.backward()
                torch.testing.assert_close(ring, want.detach(), rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(ring_in.grad, whole.grad[start:stop], rtol=1e-10, atol=1e-12)
                for chosen in ("auto", "cpp"):
                    ring_module = metaug_fast.OUCLLoss(reduction=reduction, distributed="ring", backend=chosen, **kw)
                    torch.testing.assert_close(ring_module.embeddings(emb[start:stop], labels[start:stop]),
                                               want.detach(), rtol=1e-10, atol=1e-12)
            else:  # an explicit backend without fused label kernels is refused, never replaced by the C++ ones
                ring_module = metaug_fast.OUCLLoss(reduction=reduction, distributed="ring", backend=backend, **kw)
                with pytest.raises(metaug_fast.BackendUnavailableError,
                                   match=f"backend='{backend}' has no fused label kernels"):
                    ring_module.embeddings(emb[start:stop], labels[start:stop])
            _check_score_mode(start, stop, backend, reduction, kw)
        for backend in dict.fromkeys(c[0] for c in cases):
            _check_info_nce(emb, labels, start, stop, backend)
    finally:
        shutdown()


def _check_info_nce(emb, labels, start, stop, backend):
    for reduction in ("mean", "sum"):
        whole = emb.clone().requires_grad_()
        want = R.info_nce_embeddings(whole, labels, temperature=0.2, reduction=reduction)
        want.backward()
        mine = emb[start:stop].clone().requires_grad_()
        got = info_nce_embeddings_all_gather(mine, labels[start:stop], temperature=0.2, reduction=reduction,
                                             backend=backend)
        got.backward()
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mine.grad, whole.grad[start:stop], rtol=1e-10, atol=1e-12)


def _check_score_mode(start, stop, backend, reduction, kw):
    """Score mode with masks (row 3 has no positive: invalid): the loss, gradients and a Hessian-vector
    product of this rank's rows equal one process's on every row."""
    gen = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    pos, neg = torch.rand(n, 3, dtype=torch.float64, generator=gen), torch.rand(n, 5, dtype=torch.float64,
                                                                                generator=gen)
    pos_mask, neg_mask = torch.rand(n, 3, generator=gen) > 0.3, torch.rand(n, 5, generator=gen) > 0.2
    pos_mask[3] = False
    vec = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    module = metaug_fast.OUCLLoss(reduction=reduction, backend=backend, distributed="ring", **kw)

    def run(loss_fn, rows):
        p, q = pos[rows].clone().requires_grad_(), neg[rows].clone().requires_grad_()
        loss = loss_fn(p, q, pos_mask=pos_mask[rows], neg_mask=neg_mask[rows])
        g_p, g_n = torch.autograd.grad(loss, (p, q), create_graph=True)
        (hvp,) = torch.autograd.grad((g_p * vec[rows]).sum(), p)
        return loss.detach(), g_p.detach(), g_n.detach(), hvp

    whole = run(lambda p, q, **m: R.oucl(p, q, reduction=reduction, **m, **kw), slice(None))
    mine = run(module, slice(start, stop))
    torch.testing.assert_close(mine[0], whole[0], rtol=1e-10, atol=1e-12)
    for got, want in zip(mine[1:], whole[1:]):
        torch.testing.assert_close(got, want[start:stop], rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [1, 2])
def test_all_gather_and_ring_equal_one_process(world):
    cases = [c for c in CASES if c[0] in metaug_fast.available_backends()]
    _spawn(_worker, world, cases)


def _overlap_worker(rank, world, init_file):
    _init(rank, world, init_file)
    try:
        sizes = (5, 7, 4)[:world]  # unequal chunks: each hop's receive takes the next owner's size
        gen = torch.Generator().manual_seed(1)
        emb = torch.randn(sum(sizes), 6, dtype=torch.float64, generator=gen)
        labels = torch.randint(0, 4, (sum(sizes),), generator=gen)
        start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        kw = dict(form="weighted", beta=8.0, backend="cpp")
        outs = []
        for overlap in (True, False):
            mine = emb[start:stop].clone().requires_grad_()
            loss = oucl_embeddings_ring(mine, labels[start:stop], overlap=overlap, **kw)
            loss.backward()
            outs.append((loss.detach(), mine.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        whole = emb.clone().requires_grad_()
        want = R.oucl_embeddings(whole, labels, form="weighted", beta=8.0)
        want.backward()
        torch.testing.assert_close(outs[0][0], want.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(outs[0][1], whole.grad[start:stop], rtol=1e-10, atol=1e-12)
        with pytest.raises(TypeError, match="overlap must be a bool"):
            oucl_embeddings_ring(emb[start:stop], labels[start:stop], overlap="yes", **kw)
        dist.barrier()
    finally:
        shutdown()


@requires_cpp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_the_overlapped_ring_is_bitwise_the_blocking_one(world):
    _spawn(_overlap_worker, world)


def test_requires_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        oucl_embeddings_all_gather(torch.randn(3, 4), torch.arange(3))
    with pytest.raises(RuntimeError, match="init_process_group"):
        info_nce_embeddings_all_gather(torch.randn(3, 4), torch.arange(3))


def _failing_worker(rank, world, init_file):
    _init(rank, world, init_file, seconds=20)
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")
    oucl_embeddings_all_gather(torch.randn(3, 4), torch.arange(3))  # rank 0 waits in the collective


@pytest.mark.timeout(120)
def test_a_failing_rank_brings_the_others_down():
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        _spawn(_failing_worker, 2)


# ---------------------------------------------------------------------------------------- second order
def _derivatives(loss_fn, x, v):
    """(loss, ∂loss/∂x, the Hessian of the global loss applied to v) at x: every rank's gradient taken with
    create_graph=True, then differentiated along its v (together: the global Hessian times the global v)."""
    x = x.clone().requires_grad_()
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return loss.detach(), g.detach(), h


@contextlib.contextmanager
def _without_row_hvp_ops(hidden):
    """The label kernels as selected, or (``hidden``) without their label-aware second-derivative row ops."""
    from metaug_fast import _backend
    from metaug_fast._ops.label import ROWS_HVP, SELF_HVP

    real = _backend.label_kernels

    def without(*args, **kwargs):
        kernels = real(*args, **kwargs)
        return dataclasses.replace(kernels, capabilities={device: caps - {ROWS_HVP, SELF_HVP}
                                                          for device, caps in kernels.capabilities.items()})

    _backend.label_kernels = without if hidden else real
    try:
        yield
    finally:
        _backend.label_kernels = real


def _second_order_worker(rank, world, init_file, backends):
    from metaug_fast.distributed import oucl_embeddings_sharded

    _init(rank, world, init_file)
    try:
        sizes = (5, 7, 4)[:world]
        gen = torch.Generator().manual_seed(2)
        emb = torch.randn(sum(sizes), 6, dtype=torch.float64, generator=gen)
        labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 4, 4, 1, 5, 0, 5, 2])[:sum(sizes)]
        vec = torch.randn(emb.shape, dtype=torch.float64, generator=gen)
        bank = torch.nn.functional.normalize(torch.randn(9, 6, dtype=torch.float64, generator=gen), dim=1)
        bank_labels = torch.tensor([0, 1, 2, 3, 5, 5, 0, 1, 6])
        start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        shard = slice(*[(0, 4, 9)[min(k, 2)] for k in (rank, rank + 1)]) if world > 1 else slice(None)
        mine = slice(start, stop)

        def check(got, want):
            torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
            for g, w in zip(got[1:], want[1:]):
                torch.testing.assert_close(g, w[mine], rtol=1e-10, atol=1e-12)

        for form in ("hinge", "squared", "weighted", "circle"):
            kw = dict(form=form, beta=8.0, margin=0.3, lam=0.2)
            want = _derivatives(lambda x: R.oucl_embeddings(x, labels, **kw), emb, vec)
            for backend in backends:
                check(_derivatives(lambda x: oucl_embeddings_all_gather(x, labels[mine], backend=backend, **kw),
                                   emb[mine], vec[mine]), want)
            if "cpp" not in backends:
                continue
            # The C++ row ops take the split Hessian sums; hidden, PyTorch ops take them, as on CUDA and Triton.
            for hidden in (False, True):
                with _without_row_hvp_ops(hidden):
                    for overlap in (True, False):
                        check(_derivatives(lambda x: oucl_embeddings_ring(x, labels[mine], overlap=overlap, **kw),
                                           emb[mine], vec[mine]), want)
                    # Against a bank split across the ranks (rank 2 of 3 holds none of it).
                    want_bank = _derivatives(lambda x: R.oucl_embeddings(x, labels, bank, bank_labels, **kw), emb,
                                             vec)
                    check(_derivatives(lambda x: oucl_embeddings_sharded(x, labels[mine], bank[shard],
                                                                         bank_labels[shard], shard_unit=True, **kw),
                                       emb[mine], vec[mine]), want_bank)
        want = _derivatives(lambda x: R.info_nce_embeddings(x, labels, temperature=0.2), emb, vec)
        for backend in backends:
            check(_derivatives(lambda x: info_nce_embeddings_all_gather(x, labels[mine], temperature=0.2,
                                                                        backend=backend), emb[mine], vec[mine]), want)
        # A third derivative is refused, not wrong.
        if "cpp" in backends:
            x = emb[mine].clone().requires_grad_()
            (g,) = torch.autograd.grad(oucl_embeddings_ring(x, labels[mine]), x, create_graph=True)
            (h,) = torch.autograd.grad((g * vec[mine]).sum(), x, create_graph=True)
            with pytest.raises(RuntimeError, match="first and second derivatives only"):
                torch.autograd.grad(h.sum(), x)
            dist.barrier()
    finally:
        shutdown()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
def test_second_order_through_every_mode_equals_one_process(world):
    """Loss, gradient and Hessian-vector product of every rank's rows equal one process's (fp64, 1e-10), in
    all_gather, ring (overlapped and blocking) and sharded-bank mode, for every OUCL form and InfoNCE."""
    _spawn(_second_order_worker, world, [b for b in ("reference", "cpp") if b in metaug_fast.available_backends()])


def test_module_checks_distributed_arguments():
    with pytest.raises(ValueError, match="distributed"):
        metaug_fast.OUCLLoss(distributed="nccl_ring")
    with pytest.raises(ValueError, match="reduction='none'"):
        metaug_fast.OUCLLoss(distributed="ring", reduction="none")
    with pytest.raises(ValueError, match="ref_emb"):
        metaug_fast.OUCLLoss(distributed="all_gather").embeddings(torch.randn(2, 3), torch.arange(2),
                                                                 torch.randn(2, 3), torch.arange(2))


# ------------------------------------------------------------------ every distributed mode, every backend
class _OpNamespaces(torch.utils._python_dispatch.TorchDispatchMode):
    """The namespaces of the library's ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace = func.name().split("::")[0]
        if namespace.startswith("metaug_fast"):
            self.seen.add(namespace)
        return func(*args, **(kwargs or {}))


def _modes_worker(rank, world, init_file, backends):
    from metaug_fast.distributed import oucl_embeddings_sharded

    _init(rank, world, init_file)
    try:
        emb, labels = _global_batch()
        start, stop = _rows_of(rank, world)
        bank, bank_labels = emb[:-1].flip(0).contiguous(), labels[:-1] + 1
        shard = slice(0, 6) if rank == 0 else slice(6, 11)
        shard = slice(0, 11) if world == 1 else shard
        kw = dict(form="weighted", beta=8.0, margin=0.3)
        want = {}
        for target, ref in (("gather", ()), ("sharded", (bank, bank_labels))):
            whole = emb.clone().requires_grad_()
            loss = R.oucl_embeddings(whole, labels, *ref, **kw)
            want[target] = loss.detach(), torch.autograd.grad(loss, whole)[0][start:stop]
        modes = {
            "all_gather": ("gather", lambda x, b: oucl_embeddings_all_gather(x, labels[start:stop], backend=b, **kw)),
            "ring": ("gather", lambda x, b: oucl_embeddings_ring(x, labels[start:stop], backend=b, **kw)),
            "sharded": ("sharded", lambda x, b: oucl_embeddings_sharded(x, labels[start:stop], bank[shard],
                                                                        bank_labels[shard], backend=b, **kw)),
        }
        for backend in backends:
            # The op namespace of the backend's kernels (None: the reference runs torch ops only).
            kernels = metaug_fast._backend.REGISTRY[backend].kernels
            namespace = None if kernels is None else kernels.ops.name
            for mode, (target, fn) in modes.items():
                x = emb[start:stop].clone().requires_grad_()
                if namespace is None and mode != "all_gather":  # refused: no label kernels to run
                    with pytest.raises(metaug_fast.BackendUnavailableError, match="has no fused label kernels"):
                        fn(x, backend)
                    continue
                with _OpNamespaces() as ops:
                    loss = fn(x, backend)
                    loss.backward()
                assert ops.seen == ({namespace} if namespace else set()), (mode, backend, ops.seen)
                torch.testing.assert_close((loss, x.grad), want[target], rtol=1e-10, atol=1e-12)
            scores = metaug_fast.OUCLLoss(backend=backend, distributed="ring", **kw)
            with _OpNamespaces() as ops:
                scores(torch.rand(3, 2, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64))
            assert ops.seen == ({namespace} if namespace else set()), ("score", backend, ops.seen)
    finally:
        shutdown()


@pytest.mark.timeout(180)
def test_every_distributed_mode_runs_the_kernels_of_the_backend_asked_for():
    backends = metaug_fast.available_backends()
    _spawn(_modes_worker, 2, backends)


# --------------------------------------------------------------------------------- sharded memory bank
BANK_ROWS = 11  # 6 + 5 rows on two ranks: unequal shards


def _bank_worker(rank, world, init_file, forms):
    from metaug_fast.distributed import oucl_embeddings_sharded
    from metaug_fast.metaug import MemoryBank, ShardedMemoryBank

    _init(rank, world, init_file)
    try:
        emb, labels = _global_batch()
        start, stop = _rows_of(rank, world)
        bank = ShardedMemoryBank(BANK_ROWS, emb.shape[1], views=2, seed=3)
        # The initial bank depends on the seed only, not on the world size.
        single = ShardedMemoryBank.__new__(ShardedMemoryBank)
        single.start, single.stop = 0, BANK_ROWS
        initial = torch.nn.functional.normalize(single._initial_rows(3, 2, emb.shape[1]).double(), dim=2)
        torch.testing.assert_close(bank.full(1), single._initial_rows(3, 2, emb.shape[1])[1], rtol=0, atol=0)
        bank.features = torch.nn.functional.normalize(bank.features.double(), dim=2)  # unit rows in fp64
        full = bank.full(1)
        bank_labels = torch.tensor([0, 1, 2, 3, 5, 5, 0, 1, 6, 2, 0])  # class 4: no positive in the bank
        for form, reduction in forms:
            kw = dict(form=form, beta=8.0, margin=0.3, lam=0.2)
            whole = emb.clone().requires_grad_()
            want = R.oucl_embeddings(whole, labels, full, bank_labels, reduction=reduction, **kw)
            want.backward()
            mine = emb[start:stop].clone().requires_grad_()
            got = bank.score_all(1, mine, labels[start:stop], bank_labels, reduction=reduction, **kw)
            got.backward()
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(mine.grad, whole.grad[start:stop], rtol=1e-10, atol=1e-12)
        # A rank may hold no reference rows at all.
        empty = oucl_embeddings_sharded(emb[start:stop], labels[start:stop], full[:0] if rank else full,
                                        bank_labels[:0] if rank else bank_labels)
        torch.testing.assert_close(empty, R.oucl_embeddings(emb, labels, full, bank_labels), rtol=1e-10, atol=1e-12)
        # Updates reach the rows' owners: the same bank as one process updating with the whole batch.
        index = torch.tensor([10, 0, 4, 7, 1, 9, 2, 5, 3, 8, 6, 9])[:-1]  # distinct rows
        z = torch.nn.functional.normalize(emb[:-1], dim=1)
        lo, hi = (0, 5) if rank == 0 or world == 1 else (5, 11)
        hi = 11 if world == 1 else hi
        bank.update(0, index[lo:hi], z[lo:hi])
        ref = MemoryBank(BANK_ROWS, emb.shape[1], momentum=bank.momentum)
        ref.features = torch.stack([bank.full(0), full]).clone()
        ref.features[0] = initial[0]
        ref.update(0, index, z)
        torch.testing.assert_close(bank.full(0), ref.features[0], rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="bank_labels"):
            bank.score_all(0, mine, labels[start:stop], bank_labels[:-1])
        # The caller's backend scores the shards: the C++ kernels when named, refused when it has none.
        torch.testing.assert_close(bank.score_all(1, emb[start:stop], labels[start:stop], bank_labels, backend="cpp"),
                                   R.oucl_embeddings(emb, labels, full, bank_labels), rtol=1e-10, atol=1e-12)
        with pytest.raises(metaug_fast.BackendUnavailableError, match="backend='reference' has no fused label kernels"):
            bank.score_all(1, emb[start:stop], labels[start:stop], bank_labels, backend="reference")
        with pytest.raises(ValueError, match="shard"):
            bank.load_state_dict(dict(bank.state_dict(), start=bank.start + 1))
    finally:
        shutdown()


@requires_cpp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [1, 2])
def test_sharded_bank_equals_one_process(world):
    forms = [("weighted", "mean"), ("circle", "sum"), ("hinge", "mean"), ("squared", "mean")]
    _spawn(_bank_worker, world, forms)


def test_sharded_bank_requires_an_initialized_process_group():
    from metaug_fast.metaug import ShardedMemoryBank

    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedMemoryBank(10, 4)
