"""``make train``: MetAug against its ablations on digits, same budget, several seeds, one table.

    python -m metaug_fast.cli.compare [--epochs 8] [--seeds 0 1 2] [--out runs/compare]

Trains MetAug, MetAug (only OUCL, no MAG) and InfoNCE with the same encoder, data, schedule and number of
epochs, probes a randomly initialized encoder too, and prints linear-probe top-1 accuracy (conv and fc
features) as mean ± std over the seeds. Every number is measured in this run; results go to
``<out>/results.csv`` and a bar chart to ``<out>/results.png``.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from typing import Dict, List

from ..metaug.step import MetAugConfig
from ..metaug.trainer import TrainConfig, Trainer

RUNS = [("MetAug", "metaug"), ("MetAug (only OUCL)", "oucl"), ("InfoNCE", "infonce"), ("random init", None)]


def run_one(method, seed: int, args) -> Dict[str, float]:
    cfg = TrainConfig(
        dataset="digits", epochs=args.epochs, batch_size=args.batch_size, seed=seed, mag_hidden=args.mag_hidden,
        lr_decay_epochs=(), out_dir=os.path.join(args.out, f"{method or 'random'}-seed{seed}"),
        probe_epochs=args.probe_epochs, progress=not args.quiet,
        metaug=MetAugConfig(method=method or "oucl", k_neg=args.k_neg, backend=args.backend),
    )
    trainer = Trainer(cfg)
    if method is None:
        return trainer.probe()
    last = trainer.fit()
    return {"conv": last["probe_conv"], "fc": last["probe_fc"]}


def _fmt(values: List[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {sd:4.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metaug_fast.cli.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mag-hidden", type=int, default=256, help="MAG width (the paper's 2048 is for 128-d CIFAR features)")
    ap.add_argument("--k-neg", type=int, default=1024)
    ap.add_argument("--probe-epochs", type=int, default=60)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2 or args.probe_epochs < 1:
        ap.error("--epochs and --probe-epochs must be >= 1 and --batch-size >= 2")

    t0 = time.perf_counter()
    rows = []
    for seed in args.seeds:
        for name, method in RUNS:
            t = time.perf_counter()
            acc = run_one(method, seed, args)
            rows.append({"method": name, "seed": seed, "conv": acc["conv"], "fc": acc["fc"],
                         "seconds": time.perf_counter() - t})
            print(f"seed {seed} {name:<20} conv {acc['conv']:6.2f} %  fc {acc['fc']:6.2f} %  "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "conv", "fc", "seconds"])
        w.writeheader()
        w.writerows(rows)
    print(f"\nLinear-probe top-1 (%) on held-out digits, {args.epochs} epochs, seeds {args.seeds}, "
          f"mean ± std ({time.perf_counter() - t0:.0f} s in all):")
    print(f"| {'method':<20} | {'conv':>13} | {'fc':>13} |\n|{'-' * 22}|{'-' * 15}|{'-' * 15}|")
    summary = {}
    for name, _ in RUNS:
        conv = [r["conv"] for r in rows if r["method"] == name]
        fc = [r["fc"] for r in rows if r["method"] == name]
        summary[name] = (conv, fc)
        print(f"| {name:<20} | {_fmt(conv):>13} | {_fmt(fc):>13} |")
    _plot(summary, os.path.join(args.out, "results.png"))
    return 0


def _plot(summary, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, (layer, offset) in enumerate((("conv", -0.2), ("fc", 0.2))):
        means = [statistics.mean(summary[n][k]) for n in names]
        sds = [statistics.stdev(summary[n][k]) if len(summary[n][k]) > 1 else 0 for n in names]
        ax.bar([i + offset for i in range(len(names))], means, 0.4, yerr=sds, label=layer, capsize=3)
    ax.set_xticks(range(len(names)), names)
    lo = min(min(v) for c, f in summary.values() for v in (c, f))
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.set_title("digits: MetAug vs ablations (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
