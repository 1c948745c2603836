"""``make train``: MetAug under the official configuration against its controls and baselines on digits.

    python -m metaug_fast.cli.compare [--epochs 4] [--seeds 0 1 2] [--out runs/compare]

Every method trains the same encoder (small_cnn, three augmented crops of each 8×8 digit, one shared
encoder), on the same data, schedule and official memory objective, for the same number of epochs:

- MetAug (official): :meth:`MetAugConfig.official`;
- the controls: MetAug with η = 0 and with η = 1, and only-OUCL with MetAug's side effects (its extra
  BatchNorm forwards and bank writes, no MAG);
- only-OUCL and InfoNCE under the same memory; a randomly initialized encoder.

Digits-scale changes to the official configuration, the same for every method: K = 128 negatives per call,
well below the bank's 1400 rows, so that 9 % of the anchors draw themselves as a negative (52 % at the
official K = 1024), and MAGs of width 128 (the paper's 2048 is for AlexNet features of CIFAR images).

The probe is the few-label linear probe (3 labels per class, 5 draws; see
:func:`metaug_fast.metaug.probe.few_label_accuracy`) on the fc and conv features, where a random encoder
is clearly below a trained one; the full-label linear probe on fc is reported beside it. The table gives
mean ± std over the seeds, and the MAGs' relative parameter change per epoch. Every number is measured in
this run; results go to ``<out>/results.csv`` and a chart to ``<out>/results.png``.
"""
from __future__ import annotations

import csv
import os
import statistics
import time
from typing import Dict, List, Optional

from ..metaug.probe import extract, few_label_accuracy, fit_linear
from ..metaug.step import MetAugConfig
from ..metaug.trainer import TrainConfig, Trainer
from ._parser import Parser

# (name, MetAugConfig.official overrides); None: a randomly initialized encoder, never trained.
RUNS = [
    ("MetAug (official)", {}),
    ("MetAug, eta=0", {"eta": 0.0}),
    ("MetAug, eta=1", {"eta": 1.0}),
    ("only-OUCL, matched", {"method": "oucl", "matched_side_effects": True}),
    ("only-OUCL", {"method": "oucl"}),
    ("InfoNCE", {"method": "infonce"}),
    ("random init", None),
]
METRICS = ("fc@3", "conv@3", "fc (all labels)")


def run_one(name: str, overrides: Optional[dict], seed: int, args) -> Dict[str, float]:
    metaug = MetAugConfig.official(k_neg=args.k_neg, backend=args.backend, **(overrides or {}))
    cfg = TrainConfig.official(
        dataset="digits", epochs=args.epochs, seed=seed, mag_hidden=args.mag_hidden, lr_decay_epochs=(),
        max_steps=args.max_steps,
        probe_protocol="standard", progress=not args.quiet, metaug=metaug,
        out_dir=os.path.join(args.out, "".join(c if c.isalnum() else "_" for c in name) + f"-seed{seed}"),
    )
    trainer = Trainer(cfg)
    change = []
    if overrides is not None:
        while trainer.epoch < cfg.epochs:
            change.append(trainer.train_epoch()["mag_change"])
            trainer.epoch += 1
    out = {"mag_change": statistics.mean(change) if change else 0.0}
    for layer in ("fc", "conv"):
        xtr, ytr = extract(trainer.model, trainer.probe_train, layer)
        xte, yte = extract(trainer.model, trainer.probe_test, layer)
        out[f"{layer}@3"] = 100 * few_label_accuracy(xtr, ytr, xte, yte, trainer.n_classes, seed=seed,
                                                     epochs=args.probe_epochs)
        if layer == "fc":
            out["fc (all labels)"] = 100 * fit_linear(xtr, ytr, xte, yte, trainer.n_classes, seed=seed)
    return out


def _fmt(values: List[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {sd:4.2f}"


def main(argv=None) -> int:
    ap = Parser("metaug_fast.cli.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4, help="training epochs of every method")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of every method per seed")
    ap.add_argument("--mag-hidden", type=int, default=128, help="hidden width of each MAG")
    ap.add_argument("--k-neg", type=int, default=128, help="negatives drawn from the memory per call")
    ap.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0: the whole split)")
    ap.add_argument("--probe-epochs", type=int, default=100, help="epochs of each few-label probe")
    ap.add_argument("--backend", default="auto", help="auto or a backend name (metaug_fast.available_backends())")
    ap.add_argument("--out", default="runs/compare", help="folder for results.csv and results.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if min(args.epochs, args.k_neg, args.mag_hidden, args.probe_epochs) < 1 or args.max_steps < 0:
        ap.error("--epochs, --k-neg, --mag-hidden and --probe-epochs must be >= 1, --max-steps >= 0")
    t0 = time.perf_counter()
    rows = []
    for seed in args.seeds:
        for name, overrides in RUNS:
            t = time.perf_counter()
            res = run_one(name, overrides, seed, args)
            rows.append({"method": name, "seed": seed, **res, "seconds": time.perf_counter() - t})
            print(f"seed {seed} {name:<20} " + "  ".join(f"{m} {res[m]:6.2f} %" for m in METRICS)
                  + f"  MAG change/epoch {res['mag_change']:.2e}  ({rows[-1]['seconds']:.0f} s)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", *METRICS, "mag_change", "seconds"])
        w.writeheader()
        w.writerows(rows)
    print(f"\nLinear-probe top-1 (%) on held-out digits, {args.epochs} epochs, seeds {args.seeds}, mean ± std; "
          f"@3: 3 labels per class ({time.perf_counter() - t0:.0f} s in all):")
    print("| method | " + " | ".join(METRICS) + " | MAG change per epoch |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    summary = {}
    for name, _ in RUNS:
        mine = [r for r in rows if r["method"] == name]
        summary[name] = {m: [r[m] for r in mine] for m in METRICS}
        change = statistics.mean(r["mag_change"] for r in mine)
        cells = [_fmt(summary[name][m]) for m in METRICS] + [f"{change:.1e}" if change else "–"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    _plot(summary, os.path.join(args.out, "results.png"), args.epochs)
    return 0


def _plot(summary, path: str, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(METRICS)
    for k, metric in enumerate(METRICS):
        means = [statistics.mean(summary[n][metric]) for n in names]
        sds = [statistics.stdev(summary[n][metric]) if len(summary[n][metric]) > 1 else 0 for n in names]
        ax.bar([i + (k - (len(METRICS) - 1) / 2) * width for i in range(len(names))], means, width, yerr=sds,
               label=metric, capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylim(0, 100)
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.set_title(f"digits, {epochs} epochs, official memory objective: mean ± std over seeds (@3: 3 labels per class)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
