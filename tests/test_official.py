"""The official preset against a transcription of the official training loop's arithmetic.

The transcription below follows the official code's order of operations (github.com/jiangmengli/metaug:
train_MetAug.py's loop and, for the variants, train_MetAug2.py's and the first upload of train_MetAug.py,
NCEAverage's memory, the CircleLoss criterion and util.py's margin injection), written here from their
description: its own memory with six named
outputs per call, the criterion written out with logsumexp, fast weights applied by an explicit functional
forward. One or two iterations on a tiny three-view model in fp64 must leave the same encoder, BatchNorm
statistics, MAGs and memory bank as :class:`MetAugStep` under :meth:`MetAugConfig.official`.
"""
import copy
import csv
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from metaug_fast.cli import train as cli
from metaug_fast.metaug import MemoryBank, MetaFeatureAugmenter, MetAugConfig, MetAugStep
from metaug_fast.metaug.step import VARIANTS
from metaug_fast.metaug.trainer import TrainConfig

f64 = torch.float64
B, IN, H, D, N, K = 6, 5, 7, 4, 20, 5


class ThreeEncoders(nn.Module):
    """Three encoders (one per view: L, ab, Lab): linear → BatchNorm → ReLU → linear → normalize.

    ``forward(l, ab, ori)`` is what MetAugStep calls; ``fast(views, weights)`` is the official code's
    fast-weight forward: batch statistics, the running statistics untouched."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList(nn.Sequential(nn.Linear(IN, H), nn.BatchNorm1d(H), nn.ReLU(), nn.Linear(H, D))
                                 for _ in range(3))

    def forward(self, *views):
        return tuple(F.normalize(e(x), dim=1) for e, x in zip(self.enc, views))

    def fast(self, views, w):
        out = []
        for v, x in enumerate(views):
            p = f"enc.{v}."
            h = F.linear(x, w[p + "0.weight"], w[p + "0.bias"])
            h = F.batch_norm(h, torch.zeros(H, dtype=f64), torch.ones(H, dtype=f64), w[p + "1.weight"],
                             w[p + "1.bias"], training=True)
            out.append(F.normalize(F.linear(F.relu(h), w[p + "3.weight"], w[p + "3.bias"]), dim=1))
        return out


class Memory:
    """NCEAverage: three banks; a call returns out_ab2l, out_l2ab, out_ori2l, out_l2ori, out_ab2ori,
    out_ori2ab, each [B, K+1, 1] with the own-index row first, and writes the banks when asked."""

    def __init__(self, banks, gen, momentum=0.5):
        self.mem_l, self.mem_ab, self.mem_ori = (b.clone() for b in banks)
        self.gen, self.m = gen, momentum
        self.writes = 0

    def __call__(self, l, ab, ori, y, updatemem=True):  # noqa: E741  (the official code's names)
        negatives = torch.randint(0, N, (B, K), generator=self.gen)
        idx = torch.cat([y[:, None], negatives], 1)
        w_l, w_ab, w_ori = (m[idx.view(-1)].view(B, K + 1, D) for m in (self.mem_l, self.mem_ab, self.mem_ori))
        outs = (torch.bmm(w_l, ab[:, :, None]), torch.bmm(w_ab, l[:, :, None]), torch.bmm(w_l, ori[:, :, None]),
                torch.bmm(w_ori, l[:, :, None]), torch.bmm(w_ori, ab[:, :, None]), torch.bmm(w_ab, ori[:, :, None]))
        if updatemem:
            self.writes += 1
            with torch.no_grad():
                for name, feat in (("mem_l", l), ("mem_ab", ab), ("mem_ori", ori)):
                    mem = getattr(self, name)
                    mixed = mem[y] * self.m + feat * (1 - self.m)
                    mem[y] = mixed / mixed.pow(2).sum(1, keepdim=True).pow(0.5)
        return outs


def criterion(*outs, gamma=16.0):
    """CircleLoss.forward with δ and Γ off: (16/γ)·mean softplus(LSE γ·n + LSE −γ·p) on (s + 1)/2 (the
    softplus exact: the official nn.Softplus switches to x above 20, a point these scores never reach)."""
    s = [(o.squeeze(2) + 1) / 2 for o in outs]
    p = torch.cat([x[:, :1] for x in s], 1)
    n = torch.cat([x[:, 1:] for x in s], 1)
    z = torch.logsumexp(gamma * n, 1) + torch.logsumexp(-gamma * p, 1)
    return (16 / gamma) * torch.logaddexp(z, torch.zeros_like(z)).mean()


def margin_injection(mt_outs, outs, pos_weight):
    """util.py's margin_injection_loss_calc, margin type "large"."""
    split = lambda o: ((o[:, :1, 0] + 1) / 2, (o[:, 1:, 0] + 1) / 2)
    mt_pos = torch.cat([split(o)[0] for o in mt_outs], 1)
    mt_neg = torch.cat([split(o)[1] for o in mt_outs], 1)
    pos = torch.cat([split(o)[0] for o in outs], 1)
    neg = torch.cat([split(o)[1] for o in outs], 1)
    p_min, n_max = pos.min(1).values, neg.max(1).values
    m_pos = torch.minimum(p_min, n_max)[:, None]
    m_neg = torch.maximum(p_min, n_max)[:, None]
    return torch.clamp(mt_pos - m_pos, min=0).mean() * pos_weight + torch.clamp(m_neg - mt_neg, min=0).mean()


def official_loss(feats, mags, memory, y, opt_: dict):
    """One evaluation of the official loss: the original call (writing the memory), the three one-view
    augmented calls, the all-augmented call, and the margin term."""
    fl, fab, fori = feats
    ml, mab, mori = (m(f) for m, f in zip(mags, feats))
    out_ab2l, out_l2ab, out_ori2l, out_l2ori, out_ab2ori, out_ori2ab = memory(fl, fab, fori, y)
    loss = criterion(out_ab2l, out_l2ab, out_ori2l, out_l2ori, out_ab2ori, out_ori2ab)
    mtl_ab2l, mtl_l2ab, mtl_ori2l, mtl_l2ori, out_ab2ori, out_ori2ab = memory(ml, fab, fori, y, updatemem=False)
    loss = loss + opt_["eta"] * criterion(mtl_ab2l, mtl_l2ab, mtl_ori2l, mtl_l2ori, out_ab2ori, out_ori2ab)
    mtab_ab2l, mtab_l2ab, out_ori2l, out_l2ori, mtab_ab2ori, mtab_ori2ab = memory(fl, mab, fori, y, updatemem=False)
    loss = loss + opt_["eta"] * criterion(mtab_ab2l, mtab_l2ab, out_ori2l, out_l2ori, mtab_ab2ori, mtab_ori2ab)
    out_ab2l, out_l2ab, mtori_ori2l, mtori_l2ori, mtori_ab2ori, mtori_ori2ab = memory(fl, fab, mori, y, updatemem=False)
    loss = loss + opt_["eta"] * criterion(out_ab2l, out_l2ab, mtori_ori2l, mtori_l2ori, mtori_ab2ori, mtori_ori2ab)
    loss = loss + opt_["eta"] * criterion(*memory(ml, mab, mori, y, updatemem=False))
    mt = (mtl_ab2l, mtl_l2ab, mtl_ori2l, mtl_l2ori, mtab_ab2l, mtab_l2ab, mtab_ab2ori, mtab_ori2ab,
          mtori_ori2l, mtori_l2ori, mtori_ab2ori, mtori_ori2ab)
    orig = (out_ab2l, out_l2ab, out_ori2l, out_l2ori, out_ab2ori, out_ori2ab)
    return loss + opt_["alpha"] * margin_injection(mt, orig, opt_["pos_weight"])


def official_iteration(model, mags, memory, optimizer, mag_opts, views, y, opt_, variant="metaug"):
    """One iteration of the official loop that ``variant`` names, its steps in the order its file runs them
    (github.com/jiangmengli/metaug):

    - ``"metaug"``: train_MetAug.py at the head (98acb57): step 1, step 2 through θ̂;
    - ``"metaug2"``: train_MetAug2.py at the head (33a9fd0): step 1, step 2 through θ̂, step 2 again through
      ω̂ (its margin condition ``>= 1`` there, ``== 1`` elsewhere: the same at the default 1), step 3;
    - ``"first_upload"``: train_MetAug.py as first uploaded (3124b2e): step 1, step 2 through ω̂, step 3;
    - ``"lookahead"``, this library's own: step 1, step 2 through θ̂, step 3.
    """
    def set_mags(flag):
        for m in mags:
            for p in m.parameters():
                p.requires_grad = flag

    def lookahead_loss():
        loss = official_loss(model(*views), mags, memory, y, opt_)
        names = [n for n, _ in model.named_parameters()]
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        fast = {n: p - opt_["inner_lr"] * g for (n, p), g in zip(model.named_parameters(), grads)}
        assert list(fast) == names
        return official_loss(model.fast(views, fast), mags, memory, y, opt_)

    def encoder_step():  # step 1: "Fix metagen aug, and optimize main_model"
        set_mags(False)
        optimizer.zero_grad()
        official_loss(model(*views), mags, memory, y, opt_).backward()
        optimizer.step()

    def mag_step_through_theta_hat():  # step 2: "Fix main_model, and optimize metagen aug"
        set_mags(True)
        for o in mag_opts:
            o.zero_grad()
        lookahead_loss().backward()
        for o in mag_opts:
            o.step()

    def mag_step_through_omega_hat():  # step 2 of 3124b2e: the fast weights are each MAG's
        set_mags(True)
        for o in mag_opts:
            o.zero_grad()
        loss = official_loss(model(*views), mags, memory, y, opt_)
        feats = model(*views)
        fast_mags = []
        for m in mags:
            grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
            w = {n: p - opt_["inner_lr"] * g for (n, p), g in zip(m.named_parameters(), grads)}
            fast_mags.append(lambda z, m=m, w=w: mag_fast(m, z, w))
        official_loss(feats, fast_mags, memory, y, opt_).backward()
        for o in mag_opts:
            o.step()

    def lookahead_encoder_step():  # step 3: "optimize main_model by using the updated meta feature aug"
        set_mags(False)
        optimizer.zero_grad()
        lookahead_loss().backward()
        optimizer.step()
        set_mags(True)

    steps = {
        "metaug": (encoder_step, mag_step_through_theta_hat),
        "metaug2": (encoder_step, mag_step_through_theta_hat, mag_step_through_omega_hat, lookahead_encoder_step),
        "first_upload": (encoder_step, mag_step_through_omega_hat, lookahead_encoder_step),
        "lookahead": (encoder_step, mag_step_through_theta_hat, lookahead_encoder_step),
    }[variant]
    for step in steps:
        step()


def mag_fast(mag, z, w):
    """metagen_net's fast-weight forward: batch statistics, the running statistics untouched."""
    h = z
    for i in (0, 3):
        h = F.linear(h, w[f"net.{i}.weight"], w[f"net.{i}.bias"])
        hidden = h.shape[1]
        h = F.relu(F.batch_norm(h, torch.zeros(hidden, dtype=f64), torch.ones(hidden, dtype=f64),
                                w[f"net.{i + 1}.weight"], w[f"net.{i + 1}.bias"], training=True))
    return F.normalize(F.linear(h, w["net.6.weight"], w["net.6.bias"]), dim=1)


def _setup(cfg):
    torch.manual_seed(0)
    model = ThreeEncoders().double()
    mags = nn.ModuleList(MetaFeatureAugmenter(D, 8) for _ in range(3)).double()
    bank = MemoryBank(N, D, views=3, momentum=cfg.bank_momentum, init=cfg.bank_init,
                      generator=torch.Generator().manual_seed(1))
    bank.features = bank.features.double()
    batches = [(tuple(torch.randn(B, IN, dtype=f64) for _ in range(3)), torch.randperm(N)[:B]) for _ in range(2)]
    return model, mags, bank, batches


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_preset_equals_the_official_loop(variant):
    # η, α, the positive half's weight and the learning rates are raised so that every term moves the
    # parameters by far more than the tolerance; the structure is the official one.
    cfg = MetAugConfig.official(k_neg=K, eta=0.3, alpha=0.2, margin_pos_weight=0.01, inner_lr=0.2, lr=0.1,
                                mag_lr=0.1, variant=variant, backend="reference")
    model, mags, bank, batches = _setup(cfg)
    o_model, o_mags = copy.deepcopy(model), copy.deepcopy(mags)
    memory = Memory(bank.features, torch.Generator().manual_seed(7), momentum=cfg.bank_momentum)
    optimizer = torch.optim.SGD(o_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    mag_opts = [torch.optim.SGD(m.parameters(), lr=cfg.mag_lr, momentum=cfg.mag_momentum,
                                weight_decay=cfg.mag_weight_decay) for m in o_mags]
    opt_ = {"eta": cfg.eta, "alpha": cfg.alpha, "pos_weight": cfg.margin_pos_weight, "inner_lr": cfg.inner_lr}

    step = MetAugStep(model, mags, bank, cfg)
    writes, update = [], bank.update
    bank.update = lambda v, i, z: (writes.append(v), update(v, i, z))
    gen = torch.Generator().manual_seed(7)
    for views, y in batches:  # two iterations: the optimizers' momentum buffers take part in the second
        step(views, y, gen)
        official_iteration(o_model, o_mags, memory, optimizer, mag_opts, views, y, opt_, variant)
    per_iteration = {"metaug": 3, "metaug2": 7, "first_upload": 5, "lookahead": 5}[variant]
    assert len(writes) == 3 * memory.writes == 3 * 2 * per_iteration  # three views

    for ours, theirs in ((model, o_model), (mags, o_mags)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    for v, mem in enumerate((memory.mem_l, memory.mem_ab, memory.mem_ori)):
        torch.testing.assert_close(bank.features[v], mem, rtol=1e-9, atol=1e-10)
    # The parameters moved: the comparison is not between two untouched copies.
    start_model, start_mags = _setup(cfg)[:2]
    assert all((p - q).abs().max() > 1e-6 for p, q in zip(model.parameters(), start_model.parameters()))
    assert all((p - q).abs().max() > 1e-6 for p, q in zip(mags.parameters(), start_mags.parameters()))


def test_the_official_margin_is_in_every_loss_and_its_positive_half_weighted():
    # Changing α alone changes the encoder's update (margin_in="all"), and the positive half's weight
    # changes the value of R_σ by exactly its share.
    from metaug_fast.metaug.step import margin_terms

    torch.manual_seed(0)
    scores = {k: torch.rand(4, n, dtype=f64) for k, n in
              (("orig_pos", 6), ("orig_neg", 30), ("aug_pos", 12), ("aug_neg", 60))}
    full = MetAugConfig(margin_pos_weight=1.0)
    pos_half = margin_terms({**scores, "aug_neg": torch.full((4, 60), 10.0, dtype=f64)}, full)  # N̂ ≥ σ⁻
    neg_half = margin_terms({**scores, "aug_pos": torch.full((4, 12), -10.0, dtype=f64)}, full)  # P̂ ≤ σ⁺
    assert pos_half > 0 and neg_half > 0
    weighted = margin_terms(scores, MetAugConfig(margin_pos_weight=1e-4)).item()
    assert weighted == pytest.approx(1e-4 * pos_half.item() + neg_half.item(), rel=1e-12)

    cfgs = [MetAugConfig.official(k_neg=K, alpha=a, backend="reference") for a in (0.0, 1.0)]
    params = []
    for cfg in cfgs:
        model, mags, bank, batches = _setup(cfg)
        MetAugStep(model, mags, bank, dataclasses.replace(cfg, mag_lr=1e-12))(*batches[0],
                                                                              torch.Generator().manual_seed(3))
        params.append([p.detach().clone() for p in model.parameters()])
    assert any((a - b).abs().max() > 1e-9 for a, b in zip(*params))


def test_controls_side_effects_match_metaug():
    # Only-OUCL with matched side effects writes the bank as often as MetAug (three times with "metaug",
    # the last from θ̂) and runs as many BatchNorm-updating forwards, and leaves the MAGs as they were;
    # "bank_writes" and "batchnorm" keep one of the two.
    outs = {}
    configs = {"metaug": MetAugConfig.official(k_neg=K, backend="reference"),
               "oucl": MetAugConfig.official(k_neg=K, method="oucl", backend="reference")}
    configs.update({side: MetAugConfig.official(k_neg=K, method="oucl", matched_side_effects=side,
                                                backend="reference") for side in ("all", "bank_writes", "batchnorm")})
    for name, cfg in configs.items():
        model, mags, bank, batches = _setup(cfg)
        writes = []
        update = bank.update
        bank.update = lambda v, i, z: (writes.append(v), update(v, i, z))
        mag_before = copy.deepcopy(mags.state_dict())
        MetAugStep(model, mags, bank, cfg)(*batches[0], torch.Generator().manual_seed(3))
        outs[name] = (len(writes), int(model.enc[0][1].num_batches_tracked), mags.state_dict(), mag_before,
                      model.enc[0][1].running_mean.clone())
    assert outs["metaug"][:2] == outs["all"][:2] == (9, 2)  # 3 writes × 3 views; 2 BN updates
    assert outs["oucl"][:2] == (3, 1)
    assert outs["bank_writes"][:2] == (9, 1) and outs["batchnorm"][:2] == (3, 2)
    # The statistics restored are the encoder step's: the same as only-OUCL's.
    assert torch.equal(outs["bank_writes"][4], outs["oucl"][4])
    assert not torch.equal(outs["batchnorm"][4], outs["oucl"][4])
    for name in ("all", "bank_writes", "batchnorm", "oucl"):
        after, before = outs[name][2], outs[name][3]
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_official_configs_and_cli_preset(tmp_path):
    m = MetAugConfig.official()
    assert (m.objective, m.loss_scale, m.mag_momentum, m.mag_weight_decay, m.margin_in, m.margin_pos_weight,
            m.bank_writes, m.bank_init, m.alpha, m.eta, m.k_neg) == \
        ("memory", 16.0, 0.9, 1e-4, "all", 1e-4, "every_scoring", "uniform", 1e-11, 1e-5, 1024)
    assert MetAugConfig.official(eta=0.0).eta == 0.0
    with pytest.raises(TypeError, match="unknown MetAugConfig fields"):
        MetAugConfig.official(etta=1)
    t = TrainConfig.official(dataset="digits")
    assert (t.n_views, t.probe_protocol, t.mag_hidden, t.lr_decay_epochs) == (3, "official", 2048, (120, 160, 200))
    ap = cli.build_parser("official")
    cfg = cli.config_from_args(ap.parse_args(["--eta", "1", "--out", str(tmp_path)]))
    assert cfg.metaug.eta == 1.0 and cfg.metaug.objective == "memory" and cfg.n_views == 3
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--out", str(tmp_path)]))
    assert cfg.metaug.objective == "features" and cfg.n_views == 2


@pytest.mark.parametrize("argv, side", [([], "none"), (["--matched-side-effects"], "all"),
                                         (["--matched-side-effects", "bank_writes"], "bank_writes")])
def test_cli_matched_side_effects(argv, side, tmp_path):
    args = cli.build_parser().parse_args(["--method", "oucl", "--out", str(tmp_path), *argv])
    assert cli.config_from_args(args).metaug.matched_side_effects == side


@pytest.mark.parametrize("bad, match", [
    (dict(objective="pairs"), "objective must be one of"),
    (dict(variant="lookahead", method="oucl"), "needs method='metaug'"),
    (dict(matched_side_effects="all"), "needs method='oucl'"),
    (dict(method="oucl", matched_side_effects=True), "matched_side_effects must be one of"),
    (dict(chunk_size=4, objective="memory"), "chunk_size"),
    (dict(mag_momentum=-1.0), "mag_momentum must be >= 0"),
    (dict(loss_scale=0.0), "loss_scale must be > 0"),
    (dict(bank_init="zeros"), "bank_init must be one of"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        MetAugConfig(**bad)


def test_step_checks_views():
    model, mags, bank, _ = _setup(MetAugConfig.official())
    with pytest.raises(ValueError, match="objective='features' is defined for 2 views"):
        MetAugStep(model, mags, bank, MetAugConfig())
    with pytest.raises(ValueError, match="one MAG per view"):
        MetAugStep(model, mags[:2], bank, MetAugConfig.official())


# ------------------------------------------------------------------------------- probes, trainer, make train
def test_probes_separate_structure_from_noise():
    from metaug_fast.metaug.probe import few_label_accuracy, knn_accuracy

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    centres = torch.randn(4, 8, generator=gen) * 3
    x = centres[y] + torch.randn(200, 8, generator=gen)
    noise = torch.randn(200, 8, generator=gen)
    assert knn_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.9
    assert knn_accuracy(noise[:150], y[:150], noise[150:], y[150:]) < 0.5
    assert few_label_accuracy(x[:150], y[:150], x[150:], y[150:], 4, per_class=2, epochs=50) > 0.8
    assert few_label_accuracy(noise[:150], y[:150], noise[150:], y[150:], 4, per_class=2, epochs=50) < 0.5


def test_official_run_on_digits_three_views(tmp_path):
    # The whole official preset end to end (scaled down): three views, the official probe protocol with the
    # MAGs' hidden layers and augmented probe images, the MAG change per epoch in the metrics.

    from metaug_fast.metaug.trainer import Trainer

    cfg = TrainConfig.official(dataset="digits", epochs=1, max_steps=2, mag_hidden=16, probe_epochs=2,
                               progress=False, out_dir=str(tmp_path),
                               metaug=MetAugConfig.official(k_neg=8, backend="reference"))
    last = Trainer(cfg).fit()
    assert 0 < last["mag_change"] < 1 and all(0 <= last[k] <= 100 for k in ("probe_conv", "probe_fc", "probe_knn"))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[0]["mag_change"]) == pytest.approx(last["mag_change"])


def test_compare_reports_every_method(tmp_path, monkeypatch, capsys):
    from metaug_fast.cli import compare

    monkeypatch.setattr(compare, "RUNS", [("MetAug (official)", {}), ("only-OUCL, matched",
                        {"method": "oucl", "matched_side_effects": "all"}), ("only-OUCL", {"method": "oucl"}),
                        ("random init", None)])
    assert compare.main(["--epochs", "1", "--max-steps", "2", "--probe-epochs", "5", "--seeds", "0", "1", "--k-neg",
                         "8", "--mag-hidden", "8", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| MetAug (official) |" in out and "| random init |" in out and " ± " in out
    with pytest.raises(SystemExit):
        compare.main(["--probe-epochs", "0"])
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 8 and all(0 < float(r["fc@3"]) <= 100 for r in rows)
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "Paired difference from only-OUCL (" in out and "Paired difference from random init" in out
    diffs = list(csv.DictReader(open(tmp_path / "differences.csv")))
    assert len(diffs) == 3 * 3 * 3  # metrics × references (only-OUCL, matched, random) × the other methods
    assert all(float(d["ci_low"]) <= float(d["difference"]) <= float(d["ci_high"]) for d in diffs)
    fc = {r["seed"]: float(r["fc@3"]) for r in rows if r["method"] == "MetAug (official)"}
    rnd = {r["seed"]: float(r["fc@3"]) for r in rows if r["method"] == "random init"}
    mine = next(d for d in diffs if d["metric"] == "fc@3" and d["reference"] == "random init"
                and d["method"] == "MetAug (official)")
    assert float(mine["difference"]) == pytest.approx((fc["0"] - rnd["0"] + fc["1"] - rnd["1"]) / 2)
    with pytest.raises(SystemExit):
        compare.main(["--seeds", "0", "0"])


def test_paired_statistics():
    from scipy import stats

    from metaug_fast.cli.compare import holm, paired_difference

    a, b = [81.0, 83.5, 80.2, 84.0, 82.2], [80.1, 82.0, 80.9, 82.5, 80.0]
    mean, lo, hi, p = paired_difference(a, b)
    assert mean == pytest.approx(1.08) and p == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-10)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (lo, hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert paired_difference([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0, 0.0, 1.0)
    assert paired_difference([1.0], [0.5])[0] == 0.5 and math.isnan(paired_difference([1.0], [0.5])[3])
    # Holm: sorted p·(m − rank), made monotone; NaN is left out of m.
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1


def test_official_probe_protocol_reads_mags_and_augmented_images():
    from metaug_fast.metaug.data import Views, load_split
    from metaug_fast.metaug.models import MultiViewModel
    from metaug_fast.metaug.probe import extract, fit_linear

    split = load_split("digits", None, train=True)
    data = Views(split, "crops", augment=False, image_size=8, n_views=3)
    model = MultiViewModel("small_cnn", data.channels(), dim=8)
    mags = nn.ModuleList(MetaFeatureAugmenter(8, 6) for _ in range(3))
    plain, _ = extract(model, data, "fc")
    with_mags, y = extract(model, data, "fc", mags=mags)
    assert with_mags.shape[1] == plain.shape[1] + 3 * 6
    torch.testing.assert_close(with_mags[:, :plain.shape[1]], plain)
    assert model.training and all(m.training for m in mags)  # modes restored

    calls = []

    def epoch_features(epoch):
        calls.append(epoch)
        return with_mags, y

    acc = fit_linear(with_mags, y, with_mags[:100], y[:100], 10, epochs=4, protocol="official",
                     train_features=epoch_features)
    assert calls == [0, 1, 2, 3] and 0 <= acc <= 1
    with pytest.raises(ValueError, match="protocol must be one of"):
        fit_linear(plain, y, plain, y, 10, epochs=1, protocol="paper")


def test_memory_objective_with_two_views():
    # Two views (L and ab): the two pairs, the margin's σ from the original call (no pair is left original
    # by a one-view call), and the MAGs move.
    cfg = MetAugConfig.official(k_neg=K, eta=0.5, alpha=0.5, backend="reference")
    torch.manual_seed(0)
    encoders = ThreeEncoders().double()
    mags = nn.ModuleList(MetaFeatureAugmenter(D, 8) for _ in range(2)).double()
    bank = MemoryBank(N, D, views=2, init="uniform", generator=torch.Generator().manual_seed(1))
    bank.features = bank.features.double()
    from metaug_fast.metaug.step import memory_objective

    zs = encoders(*(torch.randn(B, IN, dtype=f64) for _ in range(3)))[:2]
    loss, scores = memory_objective(zs, mags, bank, torch.arange(B), cfg, torch.Generator().manual_seed(2))
    assert scores["orig_pos"].shape == (B, 2) and scores["aug_pos"].shape == (B, 4)
    assert scores["aug_neg"].shape == (B, 4 * K) and torch.isfinite(loss)
    own = [bank.features[v][torch.arange(B)] for v in range(2)]
    expected = torch.stack([(zs[1] * own[0]).sum(1), (zs[0] * own[1]).sum(1)], 1)  # ab→l, l→ab
    torch.testing.assert_close(scores["orig_pos"], (1 + expected) / 2)
    grads = torch.autograd.grad(loss, list(mags.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_a_parameter_the_loss_does_not_reach_is_left_alone(variant):
    # As after backward(), a parameter without a gradient is skipped by the optimizer (no weight decay).
    cfg = MetAugConfig.official(k_neg=K, variant=variant, backend="reference")
    model, mags, bank, batches = _setup(cfg)
    model.unused = nn.Parameter(torch.ones(3, dtype=f64))
    MetAugStep(model, mags, bank, cfg)(*batches[0], torch.Generator().manual_seed(3))
    assert torch.equal(model.unused, torch.ones(3, dtype=f64))
