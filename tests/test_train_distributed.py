"""The MetAug trainer on 2 CPU processes: through torchrun (smoke run, checkpoint, exact resume) and through
torch.multiprocessing.spawn (every rank ends with the same model, MAGs and bank, with and without gradient
caching, and under the official preset)."""
import copy
import os
import subprocess
import sys
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaug_fast.distributed import shutdown
from metaug_fast.metaug import MetAugConfig
from metaug_fast.metaug.trainer import TrainConfig, Trainer

TINY = ["--dataset", "digits", "--batch-size", "16", "--mag-hidden", "8", "--feat-dim", "8", "--k-neg", "16",
        "--max-steps", "2", "--probe-epochs", "1", "--quiet", "--threads", "1", "--dist-timeout", "120"]


def _torchrun(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "metaug_fast.cli.train", *TINY, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(600)
def test_torchrun_trains_writes_one_checkpoint_and_resumes_exactly(tmp_path):
    straight = _torchrun(tmp_path / "straight", "--epochs", "2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "on 2 processes" in straight.stdout and straight.stdout.count("linear probe top-1") == 1  # rank 0 only
    assert sorted(os.listdir(tmp_path / "straight")) == ["checkpoint.pt", "config.json", "metrics.csv",
                                                        "metrics.png"]
    first = _torchrun(tmp_path / "split", "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(tmp_path / "split", "--epochs", "2", "--resume", str(tmp_path / "split" / "checkpoint.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epochs 2..2" in resumed.stdout
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["world_size"] == b["world_size"] == 2 and len(a["rng"]) == 2
    for key in ("model", "mags"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert torch.equal(a["bank"]["features"], b["bank"]["features"])
    assert [r["loss"] for r in a["metrics"]] == [r["loss"] for r in b["metrics"]]
    # A checkpoint of 2 processes is not resumed by 1: the data order and random streams would differ.
    single = Trainer(TrainConfig(dataset="digits", epochs=3, batch_size=16, mag_hidden=8, feat_dim=8,
                                 max_steps=2, probe_epochs=1, progress=False, out_dir=str(tmp_path / "one"),
                                 metaug=MetAugConfig(k_neg=16)))
    with pytest.raises(ValueError, match="written by 2 process"):
        single.resume(str(tmp_path / "split" / "checkpoint.pt"))


@pytest.mark.timeout(300)
def test_torchrun_trains_the_batch_objective_around_the_ring(tmp_path):
    run = _torchrun(tmp_path / "ring", "--epochs", "1", "--objective", "batch", "--distributed", "ring")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 processes" in run.stdout
    saved = torch.load(tmp_path / "ring" / "checkpoint.pt", weights_only=False)
    assert saved["world_size"] == 2
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in saved["metrics"]])))


SETTINGS = {
    "plain": lambda **kw: TrainConfig(metaug=MetAugConfig(k_neg=16), **kw),
    # the encoder step in chunks of 6 under DDP, the meta step on a sub-batch of 6 per rank
    "gradient_cached": lambda **kw: TrainConfig(metaug=MetAugConfig(k_neg=16, chunk_size=6), **kw),
    # three views, bank writes inside every scoring (gathered from every rank), the look-ahead encoder
    # update (its gradient averaged over ranks)
    "official_lookahead": lambda **kw: TrainConfig.official(
        metaug=MetAugConfig.official(k_neg=16, variant="lookahead"), **kw),
}


def _sync_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        for setting, make in SETTINGS.items():  # one process group for all: spawning costs more than a setting
            cfg = make(dataset="digits", epochs=1, batch_size=16, mag_hidden=8, feat_dim=8, max_steps=3,
                       probe_epochs=1, progress=False, out_dir=os.path.join(out_dir, setting))
            trainer = Trainer(cfg)
            before = trainer.bank.features.clone()
            trainer.train_epoch()
            state = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()] +
                              [p.detach().reshape(-1) for p in trainer.mags.parameters()] +
                              [trainer.bank.features.reshape(-1)])
            states = [torch.empty_like(state) for _ in range(world)]
            dist.all_gather(states, state)
            assert torch.equal(states[0], states[1]), setting  # the same model, MAGs and bank on every rank
            # 3 steps × 2 ranks × 16 samples, every view: every rank's features reached the bank.
            changed = (trainer.bank.features != before).any(2).sum(1)
            assert changed.tolist() == [96] * cfg.n_views, setting
    finally:
        shutdown()


@pytest.mark.timeout(300)
def test_ranks_stay_in_sync():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_sync_worker, args=(2, os.path.join(d, "init"), os.path.join(d, "run")), nprocs=2, join=True)


# ------------------------------------------------------------------- the batch objective across processes
def _batch_step_worker(rank, world, init_file):
    from torch import nn

    from metaug_fast.metaug import MemoryBank, MetaFeatureAugmenter, MetAugStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))

    class TwoViews(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(10, 8)

        def forward(self, v1, v2):
            return tuple(nn.functional.normalize(self.enc(v), dim=1) for v in (v1, v2))

    try:
        gen = torch.Generator().manual_seed(0)
        views = (torch.randn(12, 10, dtype=torch.float64, generator=gen),
                 torch.randn(12, 10, dtype=torch.float64, generator=gen))
        index = torch.arange(12)
        mine = slice(6 * rank, 6 * rank + 6)
        torch.manual_seed(0)
        model0 = TwoViews().double()
        # In eval mode the MAGs' BatchNorm is a function of each sample alone, as it must be for the ranks'
        # halves to equal the whole batch (in train mode each rank normalizes with its own batch).
        mags0 = nn.ModuleList(MetaFeatureAugmenter(8, 16) for _ in range(2)).double().eval()
        for distributed in ("all_gather", "ring"):
            for variant in ("metaug", "metaug2"):
                cfg = MetAugConfig(objective="batch", distributed=distributed, variant=variant, alpha=0.0, eta=0.5,
                                   form="weighted", beta=8.0, lr=0.5, inner_lr=0.5, mag_lr=0.5, k_neg=4)
                states = []
                for parallel in (False, True):
                    model, mags = copy.deepcopy(model0), copy.deepcopy(mags0)
                    bank = MemoryBank(12, 8, views=2)
                    ddp = nn.parallel.DistributedDataParallel(model) if parallel else None
                    step = MetAugStep(model, mags, bank, cfg, data_parallel=ddp)
                    rows = mine if parallel else slice(None)
                    out = step(tuple(v[rows] for v in views), index[rows], torch.Generator().manual_seed(1))
                    states.append((out, [p.detach().clone() for p in [*model.parameters(), *mags.parameters()]]))
                (one, whole), (got, split) = states
                assert got["loss"] == pytest.approx(one["loss"], rel=1e-10)
                assert got["meta"] == pytest.approx(one["meta"], rel=1e-10)
                for a, b in zip(split, whole):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
                moved = [(a - b).abs().max() for a, b in zip(whole, [*model0.parameters(), *mags0.parameters()])]
                assert min(moved[2:]) > 1e-6, (distributed, variant)  # every MAG parameter took a step
    finally:
        shutdown()


@pytest.mark.timeout(300)
def test_the_batch_objective_on_two_processes_steps_as_one_process():
    """objective='batch' under DDP, gathered and around the ring: one MetAug step (and metaug2's, with its ω̂
    and look-ahead updates) of two processes holding 6 samples each leaves the encoder and MAGs where one
    process holding all 12 does (fp64, 1e-10): the meta step's second derivative crosses the ranks."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_batch_step_worker, args=(2, os.path.join(d, "init")), nprocs=2, join=True)
