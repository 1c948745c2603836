"""MetAug training: the second-order meta step, the memory bank, resume, data readers and the CLI."""
import copy
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as tF

import metaug_fast
from metaug_fast import reference
from metaug_fast.cli import train as cli
from metaug_fast.metaug import MemoryBank, MetaFeatureAugmenter, MetAugConfig
from metaug_fast.metaug.data import DatasetNotFoundError, Views, load_split, rgb_to_lab
from metaug_fast.metaug.step import batch_objective, margin_terms, meta_gradient, objective
from metaug_fast.metaug.trainer import TrainConfig, Trainer, lr_at

f64 = torch.float64


# ------------------------------------------------------------------------------------------- meta step
class _Tiny(nn.Module):
    """A shared linear encoder + head: (v1, v2) -> normalized (z1, z2)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, v1, v2):
        f = lambda v: tF.normalize(self.head(torch.tanh(self.enc(v))), dim=1)
        return f(v1), f(v2)


def _setup(backend, form):
    torch.manual_seed(0)
    model = _Tiny().double()
    mags = nn.ModuleList([MetaFeatureAugmenter(4, 6).double() for _ in range(2)])
    # Batch statistics only (train mode computes the same values): torch.func cannot mutate running stats.
    torch.func.replace_all_batch_norm_modules_(mags)
    bank = MemoryBank(12, 4, views=2, generator=torch.Generator().manual_seed(1))
    bank.features = bank.features.double()
    v1, v2 = torch.randn(6, 5, dtype=f64), torch.randn(6, 5, dtype=f64)
    neg_index = bank.sample(6, 5, torch.Generator().manual_seed(2))
    cfg = MetAugConfig(eta=0.5, alpha=0.3, inner_lr=0.5, beta=4.0, form=form, backend=backend)
    return model, mags, bank, (v1, v2), neg_index, cfg


def _meta_objective(model, mags, bank, views, neg_index, cfg):
    """L(θ̂(ω), ω) + α·R_σ, θ̂(ω) = θ - ℓ·∇_θ L(θ, ω): evaluated with first-order autograd only."""
    theta = dict(model.named_parameters())
    loss, _ = objective(*model(*views), mags, bank, neg_index, cfg)
    grads = torch.autograd.grad(loss, list(theta.values()))
    theta_hat = {k: p.detach() - cfg.inner_lr * g for (k, p), g in zip(theta.items(), grads)}
    loss_hat, scores = objective(*functional_call(model, theta_hat, views), mags, bank, neg_index, cfg)
    return (loss_hat + cfg.alpha * margin_terms(scores, cfg)).item()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("form", ["weighted", "circle"])
def test_meta_gradient_matches_unrolled_and_finite_difference(backend, form):
    if backend not in metaug_fast.available_backends():
        pytest.skip("C++ extension not built")
    model, mags, bank, views, neg_index, cfg = _setup(backend, form)
    grads, _ = meta_gradient(model, mags, bank, views, neg_index, cfg)
    omega = [p for m in mags for p in m.parameters()]

    # Explicit unrolled computation with torch.func on reference.py: grad of ω ↦ outer(θ - ℓ∇_θ inner(θ, ω), ω).
    ref_cfg = MetAugConfig(**{**cfg.__dict__, "backend": "reference"})
    theta0 = {k: p.detach() for k, p in model.named_parameters()}
    names = [(i, k) for i, m in enumerate(mags) for k, _ in m.named_parameters()]

    def outer(omega_flat):
        om = [{k: w for (j, k), w in zip(names, omega_flat) if j == i} for i in range(2)]
        fm = [lambda z, i=i: functional_call(mags[i], om[i], (z,)) for i in range(2)]

        def inner(theta):
            return objective(*functional_call(model, theta, views), fm, bank, neg_index, ref_cfg)[0]

        g = torch.func.grad(inner)(theta0)
        theta_hat = {k: theta0[k] - cfg.inner_lr * g[k] for k in theta0}
        loss, scores = objective(*functional_call(model, theta_hat, views), fm, bank, neg_index, ref_cfg)
        return loss + cfg.alpha * margin_terms(scores, ref_cfg)

    unrolled = torch.func.grad(outer)(tuple(p.detach() for p in omega))
    for g, u in zip(grads, unrolled):
        torch.testing.assert_close(g, u, rtol=1e-8, atol=1e-11)

    # Central finite differences along random directions in ω. Not for circle: its Γ weights are
    # constants for differentiation by definition, so its gradient is not the derivative of its value.
    if form == "circle":
        return
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        dirs = [torch.randn(p.shape, generator=gen, dtype=f64) for p in omega]
        eps = 1e-5
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(omega, dirs):
                    p.add_(sign * eps * d)
            vals.append(_meta_objective(model, mags, bank, views, neg_index, cfg))
            with torch.no_grad():
                for p, d in zip(omega, dirs):
                    p.sub_(sign * eps * d)
        fd = (vals[0] - vals[1]) / (2 * eps)
        analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
        assert fd == pytest.approx(analytic, rel=1e-5, abs=1e-9)


def test_meta_gradient_is_second_order():
    model, mags, bank, views, neg_index, cfg = _setup("reference", "weighted")
    grads, _ = meta_gradient(model, mags, bank, views, neg_index, cfg)
    # Without the second-order path (θ̂ detached from ω) the gradient differs.
    theta = dict(model.named_parameters())
    loss, _ = objective(*model(*views), mags, bank, neg_index, cfg)
    g1 = torch.autograd.grad(loss, list(theta.values()))
    theta_hat = {k: p.detach() - cfg.inner_lr * g for (k, p), g in zip(theta.items(), g1)}
    loss_hat, scores = objective(*functional_call(model, theta_hat, views), mags, bank, neg_index, cfg)
    first = torch.autograd.grad(loss_hat + cfg.alpha * margin_terms(scores, cfg), list(mags.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(grads, first)) > 1e-8


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_the_batch_objective_is_label_mode_over_the_batch(backend):
    # L = C([z1; z2]) + η·C([z1; z2; ẑ1; ẑ2]) with the samples' indices as labels, and R_σ from the same
    # label-mode scores (σ from the original rows, applied to the augmented anchors' rows of X̂).
    if backend not in metaug_fast.available_backends():
        pytest.skip("C++ extension not built")
    _, mags, _, _, _, _ = _setup(backend, "weighted")
    gen = torch.Generator().manual_seed(5)
    z1, z2 = (torch.nn.functional.normalize(torch.randn(5, 4, dtype=f64, generator=gen), dim=1) for _ in range(2))
    index = torch.arange(5) + 10
    cfg = MetAugConfig(objective="batch", eta=0.5, alpha=0.3, margin_in="all", beta=4.0, backend=backend)
    loss, scores = batch_objective(z1, z2, mags, index, cfg)
    x, y = torch.cat([z1, z2]), torch.cat([index, index])
    a = torch.cat([mags[0](z1), mags[1](z2)])
    x_hat, y_hat = torch.cat([x, a]), torch.cat([y, y])
    kw = dict(form="weighted", beta=4.0)
    want = reference.oucl_embeddings(x, y, **kw) + 0.5 * reference.oucl_embeddings(x_hat, y_hat, **kw)
    sigma_pos, sigma_neg = reference.margin_statistics_embeddings(x, y)
    s, pm, nm = reference.label_scores(a, y, x_hat, y_hat, self_offset=x.shape[0])
    want = want + 0.3 * reference.margin_injection_loss(s, s, sigma_pos, sigma_neg, pos_mask=pm, neg_mask=nm)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    assert scores["aug_pos"].shape == (10, 3) and scores["aug_neg"].shape == (10, 16)
    with pytest.raises(ValueError, match="bank_writes must be 'after_step'"):
        MetAugConfig(objective="batch", bank_writes="every_scoring")
    with pytest.raises(ValueError, match="InfoNCE baseline takes distributed='all_gather'"):
        MetAugConfig(method="infonce", distributed="ring")
    with pytest.raises(ValueError, match="distributed must be one of"):
        MetAugConfig(distributed="nccl")


# ----------------------------------------------------------------------------------------- memory bank
# -------------------------------------------------------------------------------- what the MAGs do
def test_output_change_sees_the_function_not_the_parameter_norm():
    from metaug_fast.metaug.mag import output_change

    torch.manual_seed(0)
    mags = nn.ModuleList(MetaFeatureAugmenter(8, 16) for _ in range(2))
    feats = [tF.normalize(torch.randn(64, 8), dim=1) for _ in range(2)]
    assert output_change(mags, mags, feats) == 0.0
    # Halving the first layer (weight and bias) halves a large part of the parameter norm; the BatchNorm
    # after it undoes the change: the function moves only through BatchNorm's ε.
    halved = copy.deepcopy(mags)
    with torch.no_grad():
        for m in halved:
            m.net[0].weight.mul_(0.5)
            m.net[0].bias.mul_(0.5)
    moved = [torch.cat([p.reshape(-1) for p in m.parameters()]) for m in (mags, halved)]
    assert (moved[0] - moved[1]).norm() / moved[0].norm() > 0.1
    assert output_change(mags, halved, feats) < 1e-4
    fresh = nn.ModuleList(MetaFeatureAugmenter(8, 16) for _ in range(2))
    assert output_change(mags, fresh, feats) > 0.2
    # Running statistics are left alone.
    assert all(int(m.net[1].num_batches_tracked) == 0 for m in mags)


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_the_mag_update_splits_into_its_gradient_and_weight_decay_parts(weight_decay):
    # Without momentum one update moves ω by ℓ′·(g + λω): with λ = 0 the gradient part is the whole move,
    # and the decay part is ℓ′·λ·‖ω‖ of the parameters before the update.
    from metaug_fast.metaug import MetAugStep

    model, mags, bank, views, _, _ = _setup("reference", "weighted")
    cfg = MetAugConfig(eta=0.5, alpha=0.3, inner_lr=0.5, beta=4.0, k_neg=5, mag_lr=0.2,
                       mag_weight_decay=weight_decay, backend="reference")
    step = MetAugStep(model, mags, bank, cfg)
    before = torch.cat([p.detach().reshape(-1) for p in mags.parameters()]).clone()
    step(views, torch.arange(6), torch.Generator().manual_seed(3))
    moved = torch.cat([p.detach().reshape(-1) for p in mags.parameters()]) - before
    grad, decay = step.take_mag_update_parts()
    assert grad > 0
    assert decay == pytest.approx(0.2 * weight_decay * before.norm().item(), rel=1e-5)
    if weight_decay == 0:
        assert moved.norm().item() == pytest.approx(grad, rel=1e-5)
    assert step.take_mag_update_parts() == (0.0, 0.0)  # reset by the call


def _mag_epoch(tmp_path, metaug, official=False):
    make = TrainConfig.official if official else TrainConfig
    extra = dict(lr_decay_epochs=(), probe_protocol="standard") if official else {}
    cfg = make(dataset="digits", epochs=1, max_steps=12, mag_hidden=32, progress=False, out_dir=str(tmp_path),
               metaug=metaug, **extra)
    return Trainer(cfg).train_epoch()


def test_the_paper_formulation_mags_learn_at_eta_1_and_not_at_the_default(tmp_path):
    # The paper's loss with η = 1: no weight decay on the MAGs, so all of their movement is the meta
    # gradient's, and their outputs change measurably in 12 steps (1.9e-4 here). At the default η = 1e-5 the MAG
    # gradient is ~1e5 times smaller and the outputs stay put to ~1e-12.
    learning = _mag_epoch(tmp_path / "eta1", MetAugConfig(k_neg=64, eta=1.0))
    default = _mag_epoch(tmp_path / "default", MetAugConfig(k_neg=64))
    assert learning["mag_decay_part"] == default["mag_decay_part"] == 0.0
    assert learning["mag_grad_part"] > 1e-3 and learning["mag_output_change"] > 3e-5
    assert default["mag_output_change"] < 1e-4 * learning["mag_output_change"]


def test_under_the_official_preset_weight_decay_outweighs_the_meta_gradient(tmp_path):
    # What the digits benchmark reports per epoch, on 12 steps: λ·ω is far larger than the meta gradient.
    row = _mag_epoch(tmp_path, MetAugConfig.official(k_neg=64), official=True)
    assert row["mag_decay_part"] > 10 * row["mag_grad_part"] > 0
    assert 0 < row["mag_output_change"] < 1e-6


def test_bank_update_rule_and_normalization():
    bank = MemoryBank(5, 3, views=2, momentum=0.5, generator=torch.Generator().manual_seed(0))
    old = bank.features.clone()
    z = tF.normalize(torch.randn(2, 3), dim=1)
    idx = torch.tensor([1, 4])
    bank.update(1, idx, z)
    want = tF.normalize(0.5 * old[1, idx] + 0.5 * z, dim=1)
    torch.testing.assert_close(bank.features[1, idx], want)
    torch.testing.assert_close(bank.features[0], old[0])  # the other view is untouched
    torch.testing.assert_close(bank.features[1, [0, 2, 3]], old[1, [0, 2, 3]])
    torch.testing.assert_close(bank.features.norm(dim=2), torch.ones(2, 5))


def test_bank_sampling_is_uniform_with_replacement():
    bank = MemoryBank(10, 2)
    idx = bank.sample(400, 500, torch.Generator().manual_seed(0))
    assert idx.shape == (400, 500) and idx.min() >= 0 and idx.max() < 10
    counts = torch.bincount(idx.flatten(), minlength=10).double()
    expected = idx.numel() / 10
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    assert (idx[0].unique().numel() < 10) or True  # with replacement: duplicates are allowed
    assert any(row.unique().numel() < row.numel() for row in idx[:5])


def test_bank_checkpoint_round_trip_and_full_scoring(tmp_path):
    bank = MemoryBank(7, 3, generator=torch.Generator().manual_seed(0))
    bank.update(0, torch.tensor([2]), torch.randn(1, 3))
    path = tmp_path / "bank.pt"
    torch.save(bank.state_dict(), path)
    other = MemoryBank(7, 3, generator=torch.Generator().manual_seed(9))
    other.load_state_dict(torch.load(path))
    assert torch.equal(other.features, bank.features) and other.momentum == bank.momentum
    with pytest.raises(ValueError, match="bank shape"):
        MemoryBank(8, 3).load_state_dict(bank.state_dict())
    z, labels, bank_labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.arange(7) % 4
    torch.testing.assert_close(bank.score_all(1, z, labels, bank_labels),
                               metaug_fast.reference.oucl_embeddings(z, labels, bank.features[1], bank_labels))


# ------------------------------------------------------------------------------------------ trainer
def _tiny_cfg(tmp_path, name, epochs, preset="default", **kw):
    official = preset == "official"
    metaug = (MetAugConfig.official if official else MetAugConfig)(k_neg=16, method=kw.pop("method", "metaug"))
    base = dict(dataset="digits", epochs=epochs, batch_size=16, mag_hidden=8, feat_dim=8, max_steps=2,
                probe_epochs=1, progress=False, out_dir=str(tmp_path / name), metaug=metaug)
    return (TrainConfig.official if official else TrainConfig)(**{**base, **kw})


@pytest.mark.parametrize("preset", ["default", "official"])
def test_resume_continues_exactly(tmp_path, preset):
    # official: three views, MAG optimizer momentum, bank writes on every scoring, the official probe
    straight = Trainer(_tiny_cfg(tmp_path, "straight", 3, preset))
    straight.fit()
    first = Trainer(_tiny_cfg(tmp_path, "split", 2, preset))
    first.fit()
    resumed = Trainer(_tiny_cfg(tmp_path, "split", 3, preset))
    resumed.resume(first.ckpt_path)
    assert resumed.epoch == 2
    resumed.fit()
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for a, b in zip(straight.mags.parameters(), resumed.mags.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(straight.bank.features, resumed.bank.features)
    assert [r["loss"] for r in straight.metrics] == [r["loss"] for r in resumed.metrics]
    assert os.path.isfile(os.path.join(resumed.cfg.out_dir, "metrics.png"))
    with open(os.path.join(resumed.cfg.out_dir, "metrics.csv")) as f:
        assert len(f.read().strip().splitlines()) == 4


def test_resume_rejects_a_different_run(tmp_path):
    t = Trainer(_tiny_cfg(tmp_path, "a", 1))
    t.fit()
    other = Trainer(_tiny_cfg(tmp_path, "b", 2, seed=5))
    with pytest.raises(ValueError, match="seed"):
        other.resume(t.ckpt_path)


def _official_lr(epoch, learning_rate, lr_decay_epochs, lr_decay_rate):
    """util.py's adjust_learning_rate (jiangmengli/metaug at HEAD), called by train_MetAug.py with the epochs
    1..epochs: ``steps = np.sum(epoch > np.asarray(opt.lr_decay_epochs))``."""
    steps = np.sum(epoch > np.asarray(lr_decay_epochs))
    return learning_rate * (lr_decay_rate ** steps) if steps > 0 else learning_rate


def test_lr_schedule():
    cfg = TrainConfig(lr_decay_epochs=(3, 5))
    assert [round(lr_at(cfg, e), 8) for e in (1, 2, 3, 4, 5, 6)] == [0.03, 0.03, 0.03, 0.003, 0.003, 0.0003]
    official = TrainConfig.official()
    assert all(lr_at(official, e) == pytest.approx(_official_lr(e, 0.03, (120, 160, 200), 0.1), rel=1e-12)
               for e in range(1, 301))


@pytest.mark.parametrize("drop_last", [False, True])
def test_the_last_partial_batch_is_kept_as_the_official_loader_keeps_it(tmp_path, drop_last, monkeypatch):
    # train_MetAug.py's DataLoader has no drop_last: digits' 1400 training images in batches of 96 end with
    # a batch of 56, which trains too; --drop-last drops it. A last batch of one sample is always dropped
    # (BatchNorm cannot normalize it in training).
    trainer = Trainer(_tiny_cfg(tmp_path, "run", 1, method="oucl", max_steps=0, batch_size=96,
                                drop_last=drop_last))
    sizes, call = [], type(trainer.step).__call__

    def recording(step, views, *args):
        sizes.append(views[0].shape[0])
        return call(step, views, *args)
    monkeypatch.setattr(type(trainer.step), "__call__", recording)
    trainer.train_epoch()
    assert sizes == [96] * 14 + ([] if drop_last else [56])
    from metaug_fast.metaug.trainer import _drop_last
    assert _drop_last(TrainConfig(batch_size=16), 33) and not _drop_last(TrainConfig(batch_size=16), 34)


def test_the_official_probe_runs_the_mags_in_train_mode(tmp_path, monkeypatch):
    # LinearProbing_MetAug.py never calls .eval() on its MAGs: their BatchNorm uses each batch's statistics.
    # The probe runs copies, so that the training MAGs' running statistics stay as they were.
    trainer = Trainer(_tiny_cfg(tmp_path, "run", 1, "official"))
    seen, hidden = [], MetaFeatureAugmenter.hidden

    def recording(mag, z):
        seen.append((mag.training, any(mag is m for m in trainer.mags)))
        return hidden(mag, z)
    monkeypatch.setattr(MetaFeatureAugmenter, "hidden", recording)
    buffers = [b.clone() for b in trainer.mags.buffers()]
    trainer.mags.eval()
    trainer.probe()
    assert seen and all(training and not original for training, original in seen)
    assert all(torch.equal(a, b) for a, b in zip(buffers, trainer.mags.buffers()))
    assert not any(mag.training for mag in trainer.mags)


# -------------------------------------------------------------------------------------------- data
def _write_cifar(root, n_classes):
    rng = np.random.default_rng(0)
    if n_classes == 10:
        base = root / "cifar-10-batches-py"
        names, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    else:
        base = root / "cifar-100-python"
        names, key = ["train", "test"], "fine_labels"
    base.mkdir(parents=True)
    for name in names:
        d = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), key: [0, 1, 2, 3]}
        with open(base / name, "wb") as f:
            pickle.dump(d, f)


@pytest.mark.parametrize("n_classes", [10, 100])
def test_cifar_files_load_through_the_training_path(tmp_path, n_classes):
    _write_cifar(tmp_path, n_classes)
    name = "cifar10" if n_classes == 10 else "cifar100"
    train, test = load_split(name, str(tmp_path), True), load_split(name, str(tmp_path), False)
    assert len(train) == (20 if n_classes == 10 else 4) and len(test) == 4 and train.n_classes == n_classes
    v1, v2, y, i = Views(train, "lab", augment=True, image_size=32)[3]
    assert v1.shape == (1, 32, 32) and v2.shape == (2, 32, 32) and int(y) == 3 and i == 3
    if n_classes == 10:  # the whole trainer on the files: half AlexNet on L/ab, one step, probe
        cfg = TrainConfig(dataset=name, data_root=str(tmp_path), epochs=1, batch_size=4, mag_hidden=8, feat_dim=8,
                          max_steps=1, probe_epochs=1, progress=False, out_dir=str(tmp_path / "run"),
                          metaug=MetAugConfig(k_neg=4))
        last = Trainer(cfg).fit()
        assert 0 <= last["probe_conv"] <= 100 and cfg.arch == "alexnet_half"
        # The official preset's three views of a Lab image: L, ab and Lab, one encoder each.
        official = TrainConfig.official(dataset=name, data_root=str(tmp_path), epochs=1, batch_size=4, mag_hidden=8,
                                        feat_dim=8, max_steps=1, probe_epochs=1, progress=False,
                                        out_dir=str(tmp_path / "official"), metaug=MetAugConfig.official(k_neg=4))
        trainer = Trainer(official)
        assert trainer.train_data.channels() == (1, 2, 3) and len(trainer.model.encoders) == 3
        assert 0 <= trainer.fit()["probe_fc"] <= 100


def test_stl10_binary_files(tmp_path):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    x = np.arange(2 * 3 * 96 * 96, dtype=np.uint32).astype(np.uint8)
    for split in ("train", "test"):
        x.tofile(base / f"{split}_X.bin")
        np.array([1, 10], dtype=np.uint8).tofile(base / f"{split}_y.bin")
    s = load_split("stl10", str(tmp_path), True)
    assert s.images.shape == (2, 3, 96, 96) and s.labels.tolist() == [0, 9]
    # stored column-major: pixel (row 0, col 1) is the 97th byte of the channel
    assert int(s.images[0, 0, 0, 1]) == 96


def test_missing_data_gives_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py.*No download"):
        load_split("cifar10", str(tmp_path), True)
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        load_split("stl10", None, True)
    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200"):
        load_split("tiny-imagenet", str(tmp_path), True)


def test_rgb_to_lab_reference_colors():
    white = rgb_to_lab(torch.ones(3, 1, 1, dtype=f64))
    torch.testing.assert_close(white.flatten(), torch.tensor([1.0, 0.0, 0.0], dtype=f64), atol=1e-3, rtol=0)
    red = rgb_to_lab(torch.tensor([1.0, 0.0, 0.0], dtype=f64)[:, None, None]).flatten()
    # CIE Lab of sRGB red: (53.24, 80.09, 67.20)
    torch.testing.assert_close(red * torch.tensor([100, 110, 110], dtype=f64),
                               torch.tensor([53.24, 80.09, 67.20], dtype=f64), atol=0.1, rtol=0)


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs"),
    (["--dataset", "mnist"], "--dataset"),
    (["--method", "simclr"], "--method"),
    (["--dataset", "cifar10"], "needs --data-root"),
    (["--dataset", "digits", "--arch", "resnet18"], "small_cnn"),
    (["--backend", "gpu"], "--backend"),
    (["--beta", "-1"], "--beta"),
    (["--resume", "/nonexistent/checkpoint.pt", "--quiet"], "no checkpoint"),
])
def test_cli_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_trains_and_ctrl_c_leaves_a_usable_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--epochs", "3", "--batch-size", "16", "--mag-hidden", "8", "--feat-dim", "8", "--k-neg", "16",
            "--max-steps", "2", "--probe-epochs", "1", "--quiet", "--out", str(out)]
    real = Trainer.train_epoch

    def interrupt_in_epoch_2(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_in_epoch_2)
    assert cli.main(args) == 130
    assert "resume with --resume" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "train_epoch", real)
    assert cli.main(args + ["--resume", str(out / "checkpoint.pt")]) == 0
    text = capsys.readouterr().out
    assert "epochs 2..3" in text and "linear probe top-1" in text


def test_tiny_imagenet_layouts(tmp_path):
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    for wnid in ("n01", "n02"):
        d = base / "train" / wnid / "images"
        d.mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{wnid}_{k}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "val" / "images" / "val_0.JPEG")
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
    train, val = load_split("tiny-imagenet", str(tmp_path), True), load_split("tiny-imagenet", str(tmp_path), False)
    assert len(train) == 4 and train.n_classes == 2 and val.labels.tolist() == [1]
    v1, v2, _, _ = Views(val, "lab", augment=False, image_size=64)[0]
    assert v1.shape == (1, 64, 64) and v2.shape == (2, 64, 64)


@pytest.mark.parametrize("arch, views, channels, dims", [
    ("resnet18", "crops", (3, 3), (512, 512)),
    ("alexnet_half", "lab", (1, 2), (2 * 512, 2 * 2048)),  # L and ab features concatenated: conv5, fc6
])
def test_models_give_normalized_features_and_probe_layers(arch, views, channels, dims):
    from metaug_fast.metaug.models import MultiViewModel

    model = MultiViewModel(arch, channels, dim=16, shared=views != "lab", image_size=32)
    v1, v2 = torch.randn(2, channels[0], 32, 32), torch.randn(2, channels[1], 32, 32)
    z1, z2 = model(v1, v2)
    torch.testing.assert_close(z1.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(z2.norm(dim=1), torch.ones(2))
    model.eval()
    conv, fc = model.probe_features(v1, v2, layer="conv"), model.probe_features(v1, v2, layer="fc")
    assert conv.shape == (2, dims[0]) and fc.shape == (2, dims[1])
