"""Command line for MetAug training: ``python -m metaug_fast.cli.train [options]``.

Examples::

    python -m metaug_fast.cli.train --dataset digits --epochs 20 --mag-hidden 256 --out runs/digits
    python -m metaug_fast.cli.train --dataset cifar10 --data-root /data --arch alexnet_half   # the paper's setup
    python -m metaug_fast.cli.train --resume runs/digits/checkpoint.pt --epochs 30             # continue a run
    torchrun --standalone --nproc_per_node=2 -m metaug_fast.cli.train --dataset digits --out runs/ddp
    torchrun --nproc_per_node=8 -m metaug_fast.cli.train --dataset cifar10 --data-root /data --device cuda
    torchrun --standalone --nproc_per_node=2 -m metaug_fast.cli.train --dataset digits --objective batch \
        --distributed ring --out runs/ring   # in-batch negatives over both processes' rows, the ring's way

Under torchrun (WORLD_SIZE > 1) the process group is initialized here (gloo on CPU, NCCL with
``--device cuda``, timeout ``--dist-timeout``) and the model trains in DistributedDataParallel;
``--batch-size`` is per process. Rank 0 prints, probes and writes the checkpoint; ``--resume`` it with
the same number of processes.

Defaults are this library's formulation of MetAug (the paper's loss on two views); ``--preset official``
switches every default to the official code's configuration (three views, the CMC-style memory objective,
the criterion at its own scale, the MAG optimizer with momentum, bank writes on every scoring, the official
probe), and any option given after it still overrides. Bad arguments print a message and exit
with status 2; a missing dataset says where its files go. Ctrl-C stops after saving nothing partial:
the checkpoint of the last complete epoch stays usable with ``--resume``.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import List, Optional

import torch

from .._backend import REGISTRY
from ..metaug.augment import AUGMENTATIONS, PAPER_SETS, paper_set
from ..metaug.bank import BANK_INITS
from ..metaug.data import DATASETS, VIEWS, DatasetNotFoundError
from ..metaug.models import ARCHS
from ..metaug.probe import PROTOCOLS
from ..metaug.step import (
    BANK_WRITES,
    DISTRIBUTED,
    MARGIN_IN,
    METHODS,
    OBJECTIVES,
    SIDE_EFFECTS,
    VARIANTS,
    MetAugConfig,
)
from ..metaug.trainer import TrainConfig, Trainer
from ..reference import FORMS, SIMILARITIES
from ._parser import Parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


PRESETS = ("default", "official")


def build_parser(preset: str = "default") -> argparse.ArgumentParser:
    """The command line, its defaults those of ``preset``."""
    d = TrainConfig.official() if preset == "official" else TrainConfig()
    m = d.metaug
    ap = Parser("metaug_fast.cli.train", description="MetAug training (OUCL + MAG + meta step)")
    ap.add_argument("--preset", choices=PRESETS, default=preset,
                    help="official: every default from the official code (TrainConfig.official())")
    g = ap.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="the training images (digits is embedded; the others are read from --data-root)")
    g.add_argument("--data-root", default=None, help="folder holding the dataset's files (never downloaded)")
    g.add_argument("--arch", choices=ARCHS, default=None,
                   help="the encoder; None: small_cnn for digits, alexnet_half otherwise")
    g.add_argument("--views", choices=VIEWS, default=None,
                   help="how the views are made; None: crops for digits, lab otherwise")
    g.add_argument("--n-views", type=int, choices=(2, 3), default=d.n_views,
                   help="3: L, ab and Lab (lab), or three crops")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="side of the square crops; None: the dataset's (8 for digits, 32 for CIFAR, ...)")
    g.add_argument("--feat-dim", type=_positive_int, default=d.feat_dim,
                   help="size of the embeddings the loss compares")
    g.add_argument("--mag-hidden", type=_positive_int, default=d.mag_hidden,
                   help="hidden width of each meta feature augmentation generator (MAG)")
    g = ap.add_argument_group("optimization")
    g.add_argument("--method", choices=METHODS, default=m.method,
                   help="metaug: OUCL + MAGs + meta step; oucl: OUCL alone; infonce: the InfoNCE baseline")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs,
                   help="training epochs (the paper's schedule is long: set a few for a first run)")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="samples per step (per process under torchrun)")
    g.add_argument("--chunk-size", type=int, default=m.chunk_size,
                   help="gradient caching: run the encoder on this many samples at a time, so that any batch size "
                        "fits in memory (0: off; MetAug's meta step then uses a sub-batch of this size)")
    g.add_argument("--lr", type=_positive_float, default=m.lr, help="the encoder's SGD learning rate")
    g.add_argument("--lr-decay-epochs", type=_positive_int, nargs="*", default=list(d.lr_decay_epochs),
                   help="epochs at which the learning rate is multiplied by --lr-decay-rate")
    g.add_argument("--lr-decay-rate", type=_positive_float, default=d.lr_decay_rate,
                   help="the learning rate's factor at each of --lr-decay-epochs")
    g.add_argument("--momentum", type=_non_negative_float, default=m.momentum, help="the encoder's SGD momentum")
    g.add_argument("--weight-decay", type=_non_negative_float, default=m.weight_decay,
                   help="the encoder's SGD weight decay")
    g.add_argument("--inner-lr", type=_positive_float, default=m.inner_lr,
                   help="the meta step's inner learning rate (its virtual encoder update)")
    g.add_argument("--mag-lr", type=_positive_float, default=m.mag_lr, help="the MAGs' SGD learning rate")
    g.add_argument("--mag-momentum", type=_non_negative_float, default=m.mag_momentum, help="the MAGs' SGD momentum")
    g.add_argument("--mag-weight-decay", type=_non_negative_float, default=m.mag_weight_decay,
                   help="the MAGs' SGD weight decay")
    g.add_argument("--variant", choices=VARIANTS, default=m.variant,
                   help="metaug: train_MetAug.py; metaug2: train_MetAug2.py (a second MAG update, then a "
                        "look-ahead encoder update); first_upload: train_MetAug.py's first upload; lookahead: "
                        "metaug + the look-ahead encoder update (this library's own)")
    g.add_argument("--matched-side-effects", nargs="?", const="all", choices=SIDE_EFFECTS,
                   default=m.matched_side_effects,
                   help="with --method oucl, a control: MetAug's extra forwards without a MAG, keeping their bank "
                        "writes and BatchNorm statistics (all, the bare flag's), only the writes, or only the "
                        "statistics")
    g.add_argument("--eta", type=_non_negative_float, default=m.eta,
                   help="weight of the OUCL terms of the augmented features")
    g.add_argument("--alpha", type=_non_negative_float, default=m.alpha, help="weight of the margin regularizer R_σ")
    g.add_argument("--margin-in", choices=MARGIN_IN, default=m.margin_in,
                   help="meta: R_σ in the meta objective only; all: in the encoder's loss too")
    g.add_argument("--margin-pos-weight", type=_non_negative_float, default=m.margin_pos_weight,
                   help="weight of R_σ's positive half (the official code: 1e-4)")
    g.add_argument("--k-neg", type=_positive_int, default=m.k_neg,
                   help="negatives drawn from the memory bank per step (features) or per call (memory)")
    g.add_argument("--bank-momentum", type=_non_negative_float, default=m.bank_momentum,
                   help="the memory bank's update momentum")
    g.add_argument("--bank-init", choices=BANK_INITS, default=m.bank_init,
                   help="the memory bank's initial rows (uniform: the official code's)")
    g.add_argument("--bank-writes", choices=BANK_WRITES, default=m.bank_writes,
                   help="after_step: the bank is written once per step; every_scoring: after every scoring of "
                        "the original features (the official code's)")
    g.add_argument("--objective", choices=OBJECTIVES, default=m.objective,
                   help="features: the library's pairs; memory: the official CMC-style memory; batch: in-batch "
                        "negatives in label mode over the global batch (no memory bank)")
    g.add_argument("--distributed", choices=DISTRIBUTED, default=m.distributed,
                   help="under torchrun, how --objective batch reaches every rank's rows: all_gather (the "
                        "batch gathered on every rank) or ring (one rank's rows at a time)")
    aug = g.add_mutually_exclusive_group()
    aug.add_argument("--augment", default=None,
                     help=f"the training views' augmentations, comma-separated from {','.join(AUGMENTATIONS)} "
                          "(none given: resized crop, flip and colour; shift, dropout and noise for digits)")
    aug.add_argument("--augment-id", type=int, choices=sorted(PAPER_SETS), default=None,
                     help="the paper's augmentation set: 1 flip+rotate, 2 crop, 3 grey, 4 jitter, 5 flip+crop, "
                          "6 rotate+jitter, 7 flip+crop+mixup, 8 all six")
    g.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0: the whole split)")
    g.add_argument("--drop-last", action="store_true", default=d.drop_last,
                   help="drop each epoch's last partial batch (the official loader keeps it)")
    g = ap.add_argument_group("loss")
    g.add_argument("--form", choices=FORMS, default=m.form, help="the OUCL form")
    g.add_argument("--beta", type=_positive_float, default=m.beta, help="OUCL's scale β")
    g.add_argument("--gamma-pos", type=float, default=m.gamma_pos,
                   help="the weighted and circle forms' positive margin γ⁺")
    g.add_argument("--gamma-neg", type=float, default=m.gamma_neg,
                   help="the weighted and circle forms' negative margin γ⁻")
    g.add_argument("--loss-scale", type=_positive_float, default=m.loss_scale,
                   help="multiplies the OUCL terms (the official criterion: 16)")
    g.add_argument("--margin", type=float, default=m.margin, help="the circle form's relaxation margin m")
    g.add_argument("--similarity", choices=SIMILARITIES, default=m.similarity, help="how embeddings become scores")
    g.add_argument("--temperature", type=_positive_float, default=m.temperature,
                   help="InfoNCE's temperature (--method infonce)")
    g.add_argument("--detach-margin", action="store_true",
                   help="take R_σ's margins as constants (no gradient through them)")
    g.add_argument("--backend", default=m.backend, help="auto or a backend name (metaug_fast.available_backends())")
    g = ap.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="the random seed of the data order, views and initialization")
    g.add_argument("--no-deterministic", action="store_true",
                   help="allow nondeterministic kernels (faster on a GPU, not bit-reproducible)")
    g.add_argument("--out", default=d.out_dir, help="folder for metrics.csv, metrics.png and checkpoint.pt")
    g.add_argument("--resume", default=None, help="checkpoint.pt of an earlier run with the same settings")
    g.add_argument("--probe-epochs", type=_positive_int, default=d.probe_epochs,
                   help="epochs of the linear probe trained on the frozen encoder")
    g.add_argument("--probe-lr", type=_positive_float, default=d.probe_lr, help="the linear probe's learning rate")
    g.add_argument("--probe-every", type=int, default=0, help="probe every this many epochs (0: only after the last)")
    g.add_argument("--probe-protocol", choices=PROTOCOLS, default=d.probe_protocol,
                   help="standard: a held-out test split; official: the official code's evaluation")
    g.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (None: torch's default)")
    g.add_argument("--device", choices=("cpu", "cuda"), default=d.device,
                   help="cuda: this process's GPU (LOCAL_RANK under torchrun)")
    g.add_argument("--dist-timeout", type=_positive_float, default=1800.0,
                   help="seconds a rank waits for the others in a collective before failing (torchrun runs)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    metaug = MetAugConfig(
        method=args.method, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        inner_lr=args.inner_lr, mag_lr=args.mag_lr, mag_momentum=args.mag_momentum,
        mag_weight_decay=args.mag_weight_decay, eta=args.eta, alpha=args.alpha,
        margin_pos_weight=args.margin_pos_weight, margin_in=args.margin_in, k_neg=args.k_neg,
        chunk_size=args.chunk_size, bank_momentum=args.bank_momentum, bank_init=args.bank_init,
        bank_writes=args.bank_writes, objective=args.objective, loss_scale=args.loss_scale, variant=args.variant,
        matched_side_effects=args.matched_side_effects, form=args.form, beta=args.beta,
        gamma_pos=args.gamma_pos, gamma_neg=args.gamma_neg, margin=args.margin,
        similarity=args.similarity, temperature=args.temperature, detach_margin=args.detach_margin,
        backend=args.backend, distributed=args.distributed,
    )
    return TrainConfig(
        dataset=args.dataset, data_root=args.data_root, arch=args.arch, views=args.views, n_views=args.n_views,
        image_size=args.image_size, feat_dim=args.feat_dim, mag_hidden=args.mag_hidden,
        batch_size=args.batch_size, epochs=args.epochs, lr_decay_epochs=tuple(args.lr_decay_epochs),
        lr_decay_rate=args.lr_decay_rate, seed=args.seed, deterministic=not args.no_deterministic,
        out_dir=args.out, probe_epochs=args.probe_epochs, probe_lr=args.probe_lr,
        probe_every=args.probe_every, probe_protocol=args.probe_protocol, max_steps=args.max_steps,
        drop_last=args.drop_last, progress=not args.quiet, device=args.device,
        augment=paper_set(args.augment_id) if args.augment_id else args.augment, metaug=metaug,
    )


def _init_distributed(args: argparse.Namespace) -> bool:
    """Joins the process group torchrun describes (WORLD_SIZE > 1); False for a single process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=args.dist_timeout))
    return True


def main(argv: Optional[List[str]] = None) -> int:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=PRESETS, default="default")
    known, _ = first.parse_known_args(argv)
    ap = build_parser(known.preset)
    args = ap.parse_args(argv)
    if args.backend != "auto" and args.backend not in REGISTRY:
        ap.error(f"--backend must be auto or one of {', '.join(REGISTRY)}, got {args.backend!r}")
    if args.max_steps < 0 or args.probe_every < 0:
        ap.error("--max-steps and --probe-every must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = _init_distributed(args)
    try:
        code = _run(ap, args)
    except BaseException:
        if distributed:  # the other ranks may never reach shutdown's barrier
            import torch.distributed as dist

            dist.destroy_process_group()
        raise
    if distributed:
        from ..distributed import shutdown

        shutdown()
    return code


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        trainer = Trainer(cfg)
        if args.resume:
            trainer.resume(args.resume)
    except (ValueError, DatasetNotFoundError, FileNotFoundError) as exc:
        ap.error(str(exc))
    say = print if trainer.is_main else (lambda *a, **k: None)
    world = f" on {trainer.world} processes" if trainer.world > 1 else ""
    say(f"MetAug [{cfg.metaug.method}] on {cfg.dataset} ({cfg.arch}, views {cfg.views}){world}, "
        f"epochs {trainer.epoch + 1}..{cfg.epochs}, output in {cfg.out_dir}", flush=True)
    try:
        last = trainer.fit()
    except KeyboardInterrupt:
        say(f"\ninterrupted during epoch {trainer.epoch + 1}; the checkpoint of epoch {trainer.epoch} is "
            f"{trainer.ckpt_path} (resume with --resume {trainer.ckpt_path})", file=sys.stderr)
        return 130
    if not trainer.is_main:
        return 0
    if "probe_conv" in last:
        ranks = " of every rank" if trainer.world > 1 else ""
        print(f"epoch {last['epoch']}: mean loss {last['loss']:.4f} (its steps{ranks}); linear probe top-1: conv "
              f"{last['probe_conv']:.2f} %, fc {last['probe_fc']:.2f} %; k-NN on fc {last['probe_knn']:.2f} %")
    print(f"metrics: {cfg.out_dir}/metrics.csv, plot: {cfg.out_dir}/metrics.png, checkpoint: {trainer.ckpt_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
