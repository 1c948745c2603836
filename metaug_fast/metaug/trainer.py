"""The MetAug trainer: data, models, the MetAug step, schedule, checkpoints, resume, metrics and plots.

Every epoch ends with a checkpoint written atomically (a temporary file, then ``os.replace``), so an
interrupted run (Ctrl-C included) always leaves the last complete epoch on disk, and ``resume`` continues
exactly where it stopped: model, MAGs, memory bank, optimizers, data order and every random state.

Under torchrun (a process group initialized before the trainer is built, see ``metaug_fast.cli.train``) every
rank trains on its part of each epoch (``DistributedSampler``) with the model in
``DistributedDataParallel``; the MAG gradients are averaged over ranks and every rank's features update
the (replicated) memory bank, so all ranks hold the same model, MAGs and bank. Rank 0 alone prints,
probes, writes metrics and checkpoints; a checkpoint keeps every rank's random state and is resumed by
the same number of processes.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from .augment import check_for, mixup, parse_augment
from .bank import MemoryBank
from .data import DATASETS, VIEWS, Views, load_split
from .mag import MetaFeatureAugmenter, output_change
from .models import ARCHS, MultiViewModel
from .probe import PROTOCOLS, linear_probe
from .step import MetAugConfig, MetAugStep

# Per dataset: (architecture, views, image size) unless the command line says otherwise.
DEFAULTS = {
    "digits": ("small_cnn", "crops", 8),
    "cifar10": ("alexnet_half", "lab", 32),
    "cifar100": ("alexnet_half", "lab", 32),
    "stl10": ("alexnet_half", "lab", 64),
    "tiny-imagenet": ("alexnet_half", "lab", 64),
}
# Fields that must match between a checkpoint and the run that resumes it.
_RESUME_KEYS = ("dataset", "arch", "views", "n_views", "image_size", "feat_dim", "mag_hidden", "batch_size", "seed",
                "augment")


@dataclass
class TrainConfig:
    """A training run: data, views, model, schedule, probe, output, and the step's :class:`MetAugConfig`.

    ``arch``, ``views`` and ``image_size`` default to the dataset's (:data:`DEFAULTS`); :meth:`official` is the
    official code's run.

    Example:
        >>> from metaug_fast.metaug.trainer import TrainConfig
        >>> cfg = TrainConfig.official(dataset="digits", epochs=1)
        >>> cfg.n_views, cfg.views, cfg.metaug.objective
        (3, 'crops', 'memory')
    """

    dataset: str = "digits"
    data_root: Optional[str] = None
    arch: Optional[str] = None  # None: the dataset's default
    views: Optional[str] = None
    n_views: int = 2
    image_size: Optional[int] = None
    feat_dim: int = 128
    mag_hidden: int = 2048
    batch_size: int = 64
    epochs: int = 300
    lr_decay_epochs: Tuple[int, ...] = (120, 160, 200)
    lr_decay_rate: float = 0.1
    seed: int = 0
    deterministic: bool = True
    out_dir: str = "runs/metaug"
    probe_epochs: int = 60
    probe_lr: float = 0.1
    probe_every: int = 0  # 0: only after the last epoch
    probe_protocol: str = "standard"  # or "official" (see metaug_fast.metaug.probe)
    max_steps: int = 0  # per epoch; 0: the whole training split
    drop_last: bool = False  # True: drop each epoch's last partial batch (the official loader keeps it)
    progress: bool = True
    device: str = "cpu"  # "cuda": this process's GPU (LOCAL_RANK under torchrun)
    # a set of metaug_fast.metaug.augment.AUGMENTATIONS ("flip,crop" or a tuple) for the training views;
    # None: the defaults (resized crop, flip, colour for RGB; shift, dropout, noise for digits)
    augment: Optional[Tuple[str, ...]] = None
    metaug: MetAugConfig = field(default_factory=MetAugConfig)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        arch, views, size = DEFAULTS[self.dataset]
        self.arch = self.arch or arch
        self.views = self.views or views
        self.image_size = self.image_size or size
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {self.views!r}")
        if self.dataset == "digits" and (self.views != "crops" or self.arch != "small_cnn"):
            raise ValueError("digits are 8×8 grayscale: use --arch small_cnn with --views crops")
        if self.n_views not in (2, 3):
            raise ValueError(f"n_views must be 2 or 3, got {self.n_views}")
        if self.probe_protocol not in PROTOCOLS:
            raise ValueError(f"probe_protocol must be one of {PROTOCOLS}, got {self.probe_protocol!r}")
        for name in ("feat_dim", "mag_hidden", "batch_size", "epochs", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (BatchNorm needs two samples)")
        self.lr_decay_epochs = tuple(int(e) for e in self.lr_decay_epochs)
        if self.augment is not None:
            self.augment = parse_augment(self.augment if isinstance(self.augment, str) else ",".join(self.augment))
            check_for(self.augment, self.dataset == "digits")

    @classmethod
    def official(cls, metaug: Optional[MetAugConfig] = None, **overrides) -> "TrainConfig":
        """The official code's run: three views (L, ab, Lab, one encoder each on Lab data), batch 64, 300
        epochs with lr ×0.1 at 120/160/200, MAGs 128 → 2048 → 2048 → 128, the official probe protocol, and
        ``metaug`` (default :meth:`MetAugConfig.official`)."""
        base = dict(n_views=3, batch_size=64, epochs=300, lr_decay_epochs=(120, 160, 200), lr_decay_rate=0.1,
                    feat_dim=128, mag_hidden=2048, probe_epochs=60, probe_lr=0.1, probe_protocol="official")
        return cls(**{**base, **overrides, "metaug": metaug or MetAugConfig.official()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set_seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace (read when CUDA initializes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def _atomic_save(obj: dict, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Step schedule: lr × rate for every decay epoch passed (epochs counted from 1), the official
    ``adjust_learning_rate``'s ``epoch > e``: the decay at e = 120 applies from epoch 121."""
    return cfg.metaug.lr * cfg.lr_decay_rate ** sum(epoch > e for e in cfg.lr_decay_epochs)


def _drop_last(cfg: TrainConfig, n: int) -> bool:
    """Whether the loader of ``n`` samples drops its last partial batch: ``cfg.drop_last``, or a last batch of
    one sample, which BatchNorm cannot normalize in training (the official loop would fail on it)."""
    return cfg.drop_last or n % cfg.batch_size == 1


class Trainer:
    """Builds the data, model, MAGs, bank and step of ``cfg`` and trains them: :meth:`fit` runs the epochs,
    probes, writes ``metrics.csv``/``metrics.png`` and a checkpoint per epoch; :meth:`resume` continues one.

    Example:
        >>> import tempfile
        >>> from metaug_fast.metaug.trainer import TrainConfig, Trainer
        >>> cfg = TrainConfig(dataset="digits", epochs=1, max_steps=2, mag_hidden=16, probe_epochs=1,
        ...                   progress=False, out_dir=tempfile.mkdtemp())
        >>> last = Trainer(cfg).fit()
        >>> sorted(k for k in last if k.startswith("probe"))
        ['probe_conv', 'probe_fc', 'probe_knn']
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.is_main = self.rank == 0
        self.device = torch.device("cpu") if cfg.device == "cpu" else \
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        _set_seed(cfg.seed, cfg.deterministic)
        train_split = load_split(cfg.dataset, cfg.data_root, train=True)
        test_split = load_split(cfg.dataset, cfg.data_root, train=False)
        if cfg.views == "lab" and train_split.image(0).shape[0] != 3:
            raise ValueError("views='lab' needs RGB images")
        self.n_classes = train_split.n_classes
        views = dict(views=cfg.views, image_size=cfg.image_size, n_views=cfg.n_views)
        self.train_data = Views(train_split, augment=True, augmentations=cfg.augment, **views)
        self.probe_train = Views(train_split, augment=False, **views)
        self.probe_test = Views(test_split, augment=False, **views)
        self.model = MultiViewModel(cfg.arch, self.train_data.channels(), cfg.feat_dim, shared=cfg.views != "lab",
                                    image_size=cfg.image_size).to(self.device)
        self.mags = nn.ModuleList([MetaFeatureAugmenter(cfg.feat_dim, cfg.mag_hidden)
                                   for _ in range(cfg.n_views)]).to(self.device)
        self.bank = MemoryBank(len(train_split), cfg.feat_dim, views=cfg.n_views, momentum=cfg.metaug.bank_momentum,
                               generator=torch.Generator().manual_seed(cfg.seed), device=self.device,
                               init=cfg.metaug.bank_init)
        ddp = None
        if self.world > 1:
            ddp = DistributedDataParallel(self.model, device_ids=None if self.device.type == "cpu" else [self.device])
            # Same initial model and MAGs on every rank (drawn above); from here each rank draws its own
            # augmentations and negatives.
            torch.manual_seed(cfg.seed + 7919 * self.rank)
        self.step = MetAugStep(self.model, self.mags, self.bank, cfg.metaug, data_parallel=ddp)
        self.loader_gen = torch.Generator().manual_seed(cfg.seed)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 1 + 7919 * self.rank)
        self.epoch = 0
        self.metrics: List[Dict[str, float]] = []
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The whole run; with several ranks a collective call (it gathers every rank's random state)."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "loader": self.loader_gen.get_state(), "sample": self.sample_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        every_rank = [rng]
        if self.world > 1:
            every_rank = [None] * self.world
            dist.all_gather_object(every_rank, rng)
        return {
            "epoch": self.epoch, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
            "mags": self.mags.state_dict(), "bank": self.bank.state_dict(), "step": self.step.state_dict(),
            "metrics": self.metrics, "world_size": self.world, "rng": every_rank,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["config"]
        # A checkpoint from before a key existed holds its default (None).
        diff = [k for k in _RESUME_KEYS if saved.get(k) != getattr(self.cfg, k)]
        if diff:
            raise ValueError("checkpoint does not match this run's " + ", ".join(
                f"{k} ({saved.get(k)!r} vs {getattr(self.cfg, k)!r})" for k in diff))
        if state["world_size"] != self.world:
            raise ValueError(f"checkpoint was written by {state['world_size']} process(es): resume it with as many "
                             f"(this run has {self.world}), or the data order and random streams would differ")
        self.model.load_state_dict(state["model"])
        self.mags.load_state_dict(state["mags"])
        self.bank.load_state_dict(state["bank"])
        self.step.load_state_dict(state["step"])
        self.metrics = list(state["metrics"])
        self.epoch = int(state["epoch"])
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.loader_gen.set_state(rng["loader"])
        self.sample_gen.set_state(rng["sample"])

    def resume(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    # -------------------------------------------------------------------------------------- training
    def train_epoch(self) -> Dict[str, float]:
        from tqdm import tqdm

        cfg = self.cfg
        lr = lr_at(cfg, self.epoch + 1)
        for group in self.step.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        self.mags.train()
        if self.world > 1:  # each rank its own part of the epoch's permutation
            sampler = DistributedSampler(self.train_data, num_replicas=self.world, rank=self.rank, shuffle=True,
                                         seed=cfg.seed, drop_last=cfg.drop_last)
            sampler.set_epoch(self.epoch)
            loader = DataLoader(self.train_data, batch_size=cfg.batch_size, sampler=sampler,
                                drop_last=_drop_last(cfg, len(sampler)), num_workers=0)
        else:
            loader = DataLoader(self.train_data, batch_size=cfg.batch_size, shuffle=True,
                                drop_last=_drop_last(cfg, len(self.train_data)), generator=self.loader_gen,
                                num_workers=0)
        total = {"loss": 0.0, "meta": 0.0}
        mags_before, mag_inputs = copy.deepcopy(self.mags), self.mag_inputs()
        mag_start = torch.nn.utils.parameters_to_vector(mags_before.parameters()).detach()
        self.step.take_mag_update_parts()
        steps = 0
        t0 = time.perf_counter()
        n = min(len(loader), cfg.max_steps) if cfg.max_steps else len(loader)
        # The bar shows the mean loss of the epoch's steps so far, as the epoch's line does at its end; under
        # torchrun, of rank 0's steps (the line's is over every rank's: averaging each step would wait for all).
        rank = f", rank 0 of {self.world}" if self.world > 1 else ""
        bar = tqdm(loader, total=n, desc=f"epoch {self.epoch + 1}/{cfg.epochs} [{cfg.metaug.method}{rank}]",
                   disable=not (cfg.progress and self.is_main), leave=False)
        for *views, _, index in bar:
            views, index = [v.to(self.device) for v in views], index.to(self.device)
            if cfg.augment and "mixup" in cfg.augment:
                views = list(mixup(views, self.sample_gen))
            out = self.step(views, index, self.sample_gen)
            for k, v in out.items():
                total[k] += v
            steps += 1
            bar.set_postfix(mean_loss=f"{total['loss'] / steps:.4f}")
            if steps >= n:
                break
        bar.close()
        if self.world > 1:  # the mean over every rank's steps
            sums = torch.tensor([total["loss"], total["meta"], steps], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums)
            total["loss"], total["meta"], steps = sums[0].item(), sums[1].item(), int(sums[2].item())
        # How far the MAGs moved this epoch, relative to where they started (0 without a meta step), what
        # moved them, and how much their outputs changed.
        mag_end = torch.nn.utils.parameters_to_vector(self.mags.parameters()).detach()
        scale = mag_start.norm().clamp(min=1e-30).item()
        mag_change = (mag_end - mag_start).norm().item() / scale
        grad_part, decay_part = self.step.take_mag_update_parts()
        return {"epoch": self.epoch + 1, "lr": lr, "loss": total["loss"] / max(steps, 1),
                "meta": total["meta"] / max(steps, 1), "mag_change": mag_change,
                "mag_grad_part": grad_part / scale, "mag_decay_part": decay_part / scale,
                "mag_output_change": output_change(mags_before, self.mags, mag_inputs),
                "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def mag_inputs(self, n: int = 512) -> List[torch.Tensor]:
        """The MAGs' inputs on which :func:`output_change` compares them: the encoder's features (eval mode,
        so no BatchNorm statistic moves) of the first ``n`` training images without augmentation, one
        ``[n, D]`` tensor per view."""
        # Indexed directly: a DataLoader would draw its seed from the global stream the training uses.
        *views, _, _ = default_collate([self.probe_train[i] for i in range(min(n, len(self.probe_train)))])
        mode = self.model.training
        self.model.eval()
        feats = self.model(*[v.to(self.device) for v in views])
        self.model.train(mode)
        return list(feats)

    def probe(self) -> Dict[str, float]:
        return linear_probe(self.model, self.probe_train, self.probe_test, self.n_classes,
                            epochs=self.cfg.probe_epochs, lr=self.cfg.probe_lr, seed=self.cfg.seed,
                            device=self.device, protocol=self.cfg.probe_protocol, mags=self.mags,
                            augmented_train=self.train_data)

    def fit(self) -> Dict[str, float]:
        """Train to ``cfg.epochs`` (from wherever a resumed run stopped); returns the last metrics row."""
        cfg = self.cfg
        if self.is_main:
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(dict(cfg.to_dict(), world_size=self.world), f, indent=2)
        while self.epoch < cfg.epochs:
            row = self.train_epoch()
            self.epoch += 1
            last = self.epoch == cfg.epochs
            if self.is_main and (last or (cfg.probe_every and self.epoch % cfg.probe_every == 0)):
                acc = self.probe()
                row.update(probe_conv=acc["conv"], probe_fc=acc["fc"], probe_knn=acc["knn"])
            self.metrics.append(row)
            state = self.state_dict()  # collective: the other ranks wait here while rank 0 probes
            if self.is_main:
                _atomic_save(state, self.ckpt_path)
                self.write_metrics()
        return self.metrics[-1] if self.metrics else {}

    def write_metrics(self) -> None:
        keys = ["epoch", "lr", "loss", "meta", "mag_change", "mag_grad_part", "mag_decay_part", "mag_output_change",
                "seconds", "probe_conv", "probe_fc", "probe_knn"]
        path = os.path.join(self.cfg.out_dir, "metrics.csv")
        with open(path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in self.metrics:
                w.writerow({k: r.get(k, "") for k in keys})
        os.replace(path + ".tmp", path)
        plot_metrics(self.metrics, os.path.join(self.cfg.out_dir, "metrics.png"), title=self.cfg.metaug.method)


def plot_metrics(metrics: List[Dict[str, float]], path: str, title: str = "") -> None:
    """Loss per epoch and, where probed, linear-probe accuracy, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [r["epoch"] for r in metrics]
    ax1.plot(ep, [r["loss"] for r in metrics], marker=".")
    ax1.set(xlabel="epoch", ylabel="training loss", title=f"{title} loss")
    probed = [r for r in metrics if "probe_conv" in r]
    for key, label in (("probe_conv", "conv"), ("probe_fc", "fc")):
        ax2.plot([r["epoch"] for r in probed], [r[key] for r in probed], marker="o", label=label)
    ax2.set(xlabel="epoch", ylabel="linear-probe top-1 (%)", title="linear probe")
    if probed:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
