"""The paper's two ablations as commands, run by ``metaug-compare --ablation augment|batch-size``: MetAug
against only-OUCL under each of the paper's eight augmentation sets, or under several batch sizes, on digits
by default, with the seeds and paired statistics of ``make train`` (:mod:`metaug_fast.cli.compare`).

Each setting trains MetAug (the official configuration) and only-OUCL (the same without the MAGs) once per
seed; a seed fixes the initial encoder, the data order and the probe's label draws, so the two methods of one
seed and setting differ only by the method. The tables give both methods' mean ± std and their paired
difference (same seed) with its 95 % t-interval and paired t-test p, Holm-adjusted over the settings.
Digits take every augmentation but grey (one channel: sets 3 and 8 are reported as not applicable). Results go
to ``<out>/ablation_<kind>.csv``, ``<out>/ablation_<kind>_differences.csv`` and a chart
``<out>/ablation_<kind>.png``.
"""
from __future__ import annotations

import csv
import os
import statistics
from typing import Dict, List, Optional, Tuple

from ..metaug.augment import PAPER_SETS, check_for

METHODS = (("MetAug", {}), ("only-OUCL", {"method": "oucl"}))
KINDS = ("augment", "batch-size")
SHOWN = ("fc (all labels)", "fc@3")  # the metrics the tables show (the CSV has every one)


def settings(kind: str, batch_sizes: List[int], digits: bool = True) -> List[Tuple[str, Optional[dict], str]]:
    """(setting, its TrainConfig overrides or None, why not) for the ablation ``kind`` (on ``digits``, or on
    images)."""
    if kind == "batch-size":
        return [(f"batch {b}", {"batch_size": b}, "") for b in batch_sizes]
    out = []
    for i, names in PAPER_SETS.items():
        label = f"{i}: {' + '.join(names)}"
        try:
            check_for(names, digits)
        except ValueError as exc:
            out.append((label, None, str(exc).split(": ", 1)[1]))
            continue
        out.append((label, {"augment": names}, ""))
    return out


def tasks(kind: str, args) -> List[tuple]:
    """The runs: (name, MetAug overrides, seed, TrainConfig overrides) per applicable setting, method and seed."""
    extra = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    if args.objective != "memory":
        extra["objective"] = args.objective
    return [(f"{method} | {setting}", {**overrides, **extra}, seed, train)
            for setting, train, _ in settings(kind, args.batch_sizes, args.dataset == "digits") if train is not None
            for seed in args.seeds for method, overrides in METHODS]


def summarize(kind: str, rows: List[dict], args) -> List[dict]:
    """Prints the ablation's tables, writes its differences CSV and chart; returns the differences."""
    from .compare import _fmt, _fmt_difference, paired_differences

    # The batch sizes of the rows (a re-tabulated CSV may hold others than --batch-sizes).
    sizes = sorted({int(r["method"].rsplit(" ", 1)[1]) for r in rows}) if kind == "batch-size" else []
    table = settings(kind, sizes, args.dataset == "digits")
    seeds, epochs = sorted({r["seed"] for r in rows}), "/".join(str(e) for e in sorted({r["epochs"] for r in rows}))
    by: Dict[Tuple[str, str], Dict[int, dict]] = {}
    for r in rows:
        method, setting = r["method"].split(" | ", 1)
        by.setdefault((setting, method), {})[r["seed"]] = r
    names = [s for s, train, _ in table if train is not None]
    (first, _), (second, _) = METHODS
    diffs = [dict(d, setting=d["method"].split(" | ", 1)[1]) for metric in SHOWN for d in paired_differences(
        rows, metric, [(f"{first} | {s}", f"{second} | {s}") for s in names])]
    what = "augmentation set (the paper's IDs)" if kind == "augment" else "batch size"
    print(f"\nAblation: {what}; linear-probe top-1 (%) on held-out {args.dataset}, {epochs} epochs, "
          f"{len(seeds)} seeds {seeds}, mean ± std; MetAug − only-OUCL: paired by seed, "
          "mean [95 % t-interval], p (Holm over the settings):")
    for metric in SHOWN:
        print(f"\n{metric}:\n| setting | MetAug | only-OUCL | MetAug − only-OUCL |\n|---|---|---|---|")
        for setting, train, why in table:
            if train is None:
                print(f"| {setting} | n/a: {why} | | |")
                continue
            cells = [_fmt([r[metric] for r in by[(setting, m)].values()]) for m, _ in METHODS]
            d = next(d for d in diffs if d["metric"] == metric and d["setting"] == setting)
            print(f"| {setting} | {cells[0]} | {cells[1]} | {_fmt_difference(d)} |")
    path = os.path.join(args.out, f"ablation_{kind}_differences.csv")
    with open(path, "w", newline="") as f:
        fields = ["metric", "setting", "n", "difference", "ci_low", "ci_high", "p", "p_holm"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: d[k] for k in fields} for d in diffs)
    _plot(kind, table, by, os.path.join(args.out, f"ablation_{kind}.png"), f"{args.dataset}, {kind} ablation, "
          f"{epochs} epochs, {len(seeds)} seeds")
    return diffs


def _plot(kind: str, table, by, path: str, title: str) -> None:
    """Each setting's two methods side by side (mean ± std over seeds), one panel per shown metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s, t, _ in table if t is not None]
    fig, axes = plt.subplots(1, len(SHOWN), figsize=(max(9.0, 2.4 * len(shown)), 4.2))
    for ax, metric in zip(axes, SHOWN):
        for k, (method, _) in enumerate(METHODS):
            values = [[r[metric] for r in by[(s, method)].values()] for s in shown]
            ax.bar([i + (k - 0.5) * 0.38 for i in range(len(shown))], [statistics.mean(v) for v in values], 0.38,
                   yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], capsize=3, label=method)
        lows = [r[metric] for seeds in by.values() for r in seeds.values()]
        ax.set_xticks(range(len(shown)), shown, rotation=20, ha="right")
        ax.set(ylim=(max(0.0, min(lows) - 10), 100), ylabel=f"linear-probe top-1, {metric} (%)")
        ax.legend(loc="lower right")
    fig.suptitle(f"{title} (mean ± std; @3: 3 labels per class)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
