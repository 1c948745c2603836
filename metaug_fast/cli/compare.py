"""``make train``: MetAug under the official configuration against its controls and baselines on digits, with
paired statistics.

    python -m metaug_fast.cli.compare [--epochs 2] [--seeds 0 1 2 3 4] [--jobs 2] [--out runs/compare]
    python -m metaug_fast.cli.compare --ablation augment [--epochs 1]        # the paper's augmentation sets
    python -m metaug_fast.cli.compare --ablation batch-size [--batch-sizes 32 64 128 256]

Every method trains the same encoder (small_cnn, three augmented crops of each 8×8 digit, one shared
encoder), on the same data, schedule and official memory objective, for the same number of epochs, once per
seed; a seed fixes the initial encoder, the data order and the probe's label draws, so every method of one
seed starts from the same weights and is probed on the same labels:

- MetAug (official): :meth:`MetAugConfig.official`; and with η = 0, with η = 1 and with the MAGs' weight
  decay off;
- only-OUCL with MetAug's side effects and no MAG: its extra bank writes and BatchNorm forwards together
  ("matched"), the writes alone, the forwards alone;
- only-OUCL and InfoNCE under the same memory; a randomly initialized encoder.

Digits-scale changes to the official configuration, the same for every method: K = 128 negatives per call,
well below the bank's 1400 rows, so that 9 % of the anchors draw themselves as a negative (52 % at the
official K = 1024), and MAGs of width 128 (the paper's 2048 is for AlexNet features of CIFAR images).

The probe is the few-label linear probe (3 labels per class, 5 draws; see
:func:`metaug_fast.metaug.probe.few_label_accuracy`) on the fc and conv features, where a random encoder
is clearly below a trained one; the full-label linear probe on fc is reported beside it. The tables give
each method's mean ± std over the seeds and its paired difference (same seed) from only-OUCL, from the
matched control and from the random encoder: the mean difference, its 95 % t-interval and the paired
t-test's p-value, raw and Holm-adjusted over the methods of the table. What moved the MAGs is reported per epoch (see
:class:`metaug_fast.metaug.trainer.Trainer`) and over the run (the output change from the first to the last
step). Every number is measured in this run; results go to ``<out>/results.csv``,
``<out>/differences.csv`` and a chart to ``<out>/results.png``.
"""
from __future__ import annotations

import copy
import csv
import math
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ..metaug.data import DATASETS
from ..metaug.mag import output_change
from ..metaug.probe import extract, few_label_accuracy, fit_linear
from ..metaug.step import MetAugConfig
from ..metaug.trainer import TrainConfig, Trainer
from . import ablation
from ._parser import Parser

ONLY_OUCL, MATCHED, RANDOM = "only-OUCL", "only-OUCL, matched", "random init"
# (name, MetAugConfig.official overrides); None: a randomly initialized encoder, never trained.
RUNS = [
    ("MetAug (official)", {}),
    ("MetAug, eta=0", {"eta": 0.0}),
    ("MetAug, eta=1", {"eta": 1.0}),
    ("MetAug, MAG wd=0", {"mag_weight_decay": 0.0}),
    (MATCHED, {"method": "oucl", "matched_side_effects": "all"}),
    ("only-OUCL, bank writes", {"method": "oucl", "matched_side_effects": "bank_writes"}),
    ("only-OUCL, BN forwards", {"method": "oucl", "matched_side_effects": "batchnorm"}),
    (ONLY_OUCL, {"method": "oucl"}),
    ("InfoNCE", {"method": "infonce"}),
    (RANDOM, None),
]
METRICS = ("fc@3", "conv@3", "fc (all labels)")
# Per-epoch means of the trainer's MAG metrics, and the output change over the whole run.
MAG_METRICS = ("mag_change", "mag_output_change", "mag_grad_part", "mag_decay_part", "mag_run_output_change")


def run_one(name: str, overrides: Optional[dict], seed: int, args, train: Optional[dict] = None) -> Dict[str, float]:
    """One run: ``overrides`` of :meth:`MetAugConfig.official` (None: a random encoder, never trained) and
    ``train``, of the run's :class:`TrainConfig` (an ablation's setting)."""
    metaug = MetAugConfig.official(k_neg=args.k_neg, backend=args.backend, **(overrides or {}))
    cfg = TrainConfig.official(**{
        **dict(dataset=args.dataset, data_root=args.data_root, epochs=args.epochs, seed=seed,
               mag_hidden=args.mag_hidden, lr_decay_epochs=(),
               max_steps=args.max_steps, probe_protocol="standard", progress=not args.quiet, metaug=metaug,
               out_dir=os.path.join(args.out, "".join(c if c.isalnum() else "_" for c in name) + f"-seed{seed}")),
        **(train or {})})
    trainer = Trainer(cfg)
    rows = []
    out = {k: 0.0 for k in MAG_METRICS}
    if overrides is not None:
        start = copy.deepcopy(trainer.mags)
        while trainer.epoch < cfg.epochs:
            rows.append(trainer.train_epoch())
            trainer.epoch += 1
        out = {k: statistics.mean(r[k] for r in rows) for k in MAG_METRICS[:-1]}
        out["mag_run_output_change"] = output_change(start, trainer.mags, trainer.mag_inputs())
    for layer in ("fc", "conv"):
        xtr, ytr = extract(trainer.model, trainer.probe_train, layer)
        xte, yte = extract(trainer.model, trainer.probe_test, layer)
        out[f"{layer}@3"] = 100 * few_label_accuracy(xtr, ytr, xte, yte, trainer.n_classes, seed=seed,
                                                     epochs=args.probe_epochs)
        if layer == "fc":
            out["fc (all labels)"] = 100 * fit_linear(xtr, ytr, xte, yte, trainer.n_classes, seed=seed)
    return out


def _timed_run(name: str, overrides: Optional[dict], seed: int, args, train: Optional[dict] = None) -> dict:
    # One thread per run, whatever --jobs is: the numbers then do not depend on it (a reduction split
    # across threads rounds differently, and training amplifies that).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time.perf_counter()
        res = run_one(name, overrides, seed, args, train)
        return {"method": name, "seed": seed, **res, "seconds": time.perf_counter() - t}
    finally:
        torch.set_num_threads(threads)


def run_all(tasks: List[tuple], args) -> List[dict]:
    """Every (method, overrides, seed[, train]) of ``tasks``, ``args.jobs`` at a time in as many processes; a
    line per finished run, and a bar over the runs. Returns the rows in the order of ``tasks``."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="runs", disable=args.quiet, leave=False)
    done: Dict[Tuple[str, int], dict] = {}

    def report(row: dict) -> None:
        done[row["method"], row["seed"]] = row
        bar.update()
        bar.write(f"seed {row['seed']} {row['method']:<22} " + "  ".join(f"{m} {row[m]:6.2f} %" for m in METRICS)
                  + f"  MAG output change {row['mag_run_output_change']:.1e}  ({row['seconds']:.0f} s)")

    def call(task: tuple) -> tuple:
        name, overrides, seed, *train = task
        return (name, overrides, seed, args if args.jobs == 1 else quiet, *train)

    quiet = copy.copy(args)
    quiet.quiet = True  # with several processes the runs print nothing themselves (no bars at once)
    if args.jobs == 1:
        for task in tasks:
            report(_timed_run(*call(task)))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_timed_run, *call(task)) for task in tasks]):
                report(future.result())
    bar.close()
    return [done[name, seed] for name, _, seed, *_ in tasks]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float, float]:
    """The paired difference of ``a`` and ``b`` (one value per seed, in the same order): its mean, the 95 %
    t-interval's ends and the two-sided paired t-test's p-value. With identical pairs, the interval is the
    point and p = 1; with fewer than two pairs, the interval and p are NaN."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(d)
    if len(d) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = statistics.stdev(d)
    if sd == 0:
        return mean, mean, mean, 1.0 if mean == 0 else 0.0
    half = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    p = 2 * stats.t.sf(abs(mean) / (sd / math.sqrt(len(d))), len(d) - 1)
    return mean, mean - half, mean + half, float(p)


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjustment of ``pvalues`` (NaN stays NaN): each adjusted p-value can be compared with
    0.05 while the chance of any false rejection among them stays at most 0.05."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def differences(rows: List[dict], metric: str, reference: str) -> List[dict]:
    """Every method's paired difference from ``reference`` on ``metric``, Holm-adjusted over the methods."""
    return paired_differences(rows, metric, [(name, reference) for name, _ in RUNS if name != reference])


def paired_differences(rows: List[dict], metric: str, pairs: Sequence[Tuple[str, str]]) -> List[dict]:
    """For each (method, reference) of ``pairs`` with runs of both, the paired difference method − reference
    on ``metric`` over their common seeds; the p-values Holm-adjusted over the pairs."""
    by: Dict[str, Dict[int, float]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r[metric]
    out = []
    for name, reference in pairs:
        if not by.get(reference) or not by.get(name):
            continue
        seeds = sorted(set(by[name]) & set(by[reference]))
        mean, lo, hi, p = paired_difference([by[name][s] for s in seeds], [by[reference][s] for s in seeds])
        out.append({"metric": metric, "reference": reference, "method": name, "n": len(seeds), "difference": mean,
                    "ci_low": lo, "ci_high": hi, "p": p})
    for row, adjusted in zip(out, holm([r["p"] for r in out])):
        row["p_holm"] = adjusted
    return out


def _fmt(values: List[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {sd:4.2f}"


def _fmt_p(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else "<0.001"


def _fmt_difference(d: dict) -> str:
    if math.isnan(d["ci_low"]):
        return f"{d['difference']:+.2f}"
    return (f"{d['difference']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] p {_fmt_p(d['p'])} "
            f"({_fmt_p(d['p_holm'])})")


def main(argv=None) -> int:
    ap = Parser("metaug_fast.cli.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of every method")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="one run of every method per seed; the differences are paired by seed")
    ap.add_argument("--mag-hidden", type=int, default=128, help="hidden width of each MAG")
    ap.add_argument("--k-neg", type=int, default=128, help="negatives drawn from the memory per call")
    ap.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0: the whole split)")
    ap.add_argument("--probe-epochs", type=int, default=100, help="epochs of each few-label probe")
    ap.add_argument("--backend", default="auto", help="auto or a backend name (metaug_fast.available_backends())")
    ap.add_argument("--out", default="runs/compare", help="folder for results.csv, differences.csv and results.png")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs at a time, each in its own process on one thread")
    ap.add_argument("--summarize", metavar="RESULTS_CSV",
                    help="train nothing: print the tables of an earlier run's results.csv and write its "
                         "differences.csv and chart to --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    g = ap.add_argument_group("the paper's ablations (metaug_fast.cli.ablation): MetAug against only-OUCL")
    g.add_argument("--ablation", choices=ablation.KINDS,
                   help="augment: the paper's eight augmentation sets; batch-size: a sweep of --batch-sizes")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256],
                   help="the batch sizes of --ablation batch-size")
    g.add_argument("--chunk-size", type=int, default=0,
                   help="gradient caching in chunks of this many samples, for batches beyond memory (needs "
                        "--objective features)")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="the ablation's data set (digits: embedded; the others from --data-root)")
    g.add_argument("--data-root", default=None, help="folder holding the data set's files (never downloaded)")
    g.add_argument("--objective", choices=("memory", "features"), default="memory",
                   help="the ablation's objective: the official memory (default) or the paper's pairs")
    args = ap.parse_args(argv)
    if min(args.epochs, args.k_neg, args.mag_hidden, args.probe_epochs, args.jobs) < 1 or args.max_steps < 0:
        ap.error("--epochs, --k-neg, --mag-hidden, --probe-epochs and --jobs must be >= 1, --max-steps >= 0")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds must be distinct: the differences are paired by seed")
    if min(args.batch_sizes) < 2 or args.chunk_size < 0:
        ap.error("--batch-sizes must be >= 2 (BatchNorm needs two samples), --chunk-size >= 0")
    if not args.ablation and args.dataset != "digits":
        ap.error("--dataset is for --ablation; the comparison of methods runs on digits")
    if args.chunk_size and args.objective != "features":
        ap.error("--chunk-size (gradient caching) needs --objective features")
    t0 = time.perf_counter()
    results = f"ablation_{args.ablation}.csv" if args.ablation else "results.csv"
    if args.summarize:
        rows = _read_results(args.summarize, ap)
    else:
        tasks = (ablation.tasks(args.ablation, args) if args.ablation else
                 [(name, overrides, seed) for seed in args.seeds for name, overrides in RUNS])
        rows = run_all(tasks, args)
        for row in rows:
            row["epochs"] = args.epochs
    os.makedirs(args.out, exist_ok=True)
    if not args.summarize:
        _write_csv(os.path.join(args.out, results), rows, RESULT_FIELDS)
    if args.ablation:
        ablation.summarize(args.ablation, rows, args)
    else:
        summarize(rows, args.out)
    if not args.summarize:
        print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s, {args.jobs} at a time")
    return 0


RESULT_FIELDS = ["method", "seed", "epochs", *METRICS, *MAG_METRICS, "seconds"]
REFERENCES = (ONLY_OUCL, MATCHED, RANDOM)


def _read_results(path: str, ap: Parser) -> List[dict]:
    if not os.path.isfile(path):
        ap.error(f"--summarize: no file {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = set(RESULT_FIELDS) - set(rows[0] if rows else {})
    if missing:
        ap.error(f"--summarize: {path} lacks the columns {sorted(missing)}")
    return [{k: (r[k] if k == "method" else int(r[k]) if k in ("seed", "epochs") else float(r[k]))
             for k in RESULT_FIELDS} for r in rows]


def summarize(rows: List[dict], out: str) -> None:
    """Prints the tables of ``rows`` (one per method and seed) and writes ``differences.csv`` and
    ``results.png`` to ``out``."""
    seeds = sorted({r["seed"] for r in rows})
    epochs = sorted({r["epochs"] for r in rows})
    diffs = [d for ref in REFERENCES for metric in METRICS for d in differences(rows, metric, ref)]
    _write_csv(os.path.join(out, "differences.csv"), diffs,
               ["metric", "reference", "method", "n", "difference", "ci_low", "ci_high", "p", "p_holm"])
    print(f"\nLinear-probe top-1 (%) on held-out digits, {'/'.join(map(str, epochs))} epochs, {len(seeds)} seeds "
          f"{seeds}, mean ± std; @3: 3 labels per class:")
    print("| method | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, _ in RUNS:
        print(f"| {name} | " + " | ".join(_fmt([r[m] for r in rows if r["method"] == name]) for m in METRICS) + " |")
    for ref in REFERENCES:
        print(f"\nPaired difference from {ref} (percentage points, the same seed): mean [95 % t-interval], "
              "paired t-test p (Holm-adjusted over the column's methods):")
        print("| method | " + " | ".join(METRICS) + " |")
        print("|---|" + "---|" * len(METRICS))
        for name, _ in RUNS:
            cells = [next((_fmt_difference(d) for d in diffs if (d["metric"], d["reference"], d["method"]) ==
                           (metric, ref, name)), "–") for metric in METRICS]
            if name != ref:
                print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nWhat moved the MAGs, per epoch (relative to ‖ω‖ at the epoch's start: the parameter change, the "
          "meta-gradient and weight-decay inputs of their optimizer, ℓ′·‖Σg‖ and ℓ′·‖Σλω‖) and their output "
          "change (1 − mean cosine on fixed features) per epoch and over the run; mean over seeds:")
    print("| method | parameter change | meta-gradient part | weight-decay part | gradient / decay "
          "| output change per epoch | output change, whole run |")
    print("|---|---|---|---|---|---|---|")
    for name, overrides in RUNS:
        if overrides is None or overrides.get("method", "metaug") != "metaug":
            continue
        m = {k: statistics.mean(r[k] for r in rows if r["method"] == name) for k in MAG_METRICS}
        ratio = f"{m['mag_grad_part'] / m['mag_decay_part']:.3g}" if m["mag_decay_part"] else "∞ (no decay)"
        print(f"| {name} | {m['mag_change']:.2e} | {m['mag_grad_part']:.2e} | {m['mag_decay_part']:.2e} | {ratio} "
              f"| {m['mag_output_change']:.2e} | {m['mag_run_output_change']:.2e} |")
    _plot(rows, diffs, os.path.join(out, "results.png"), epochs, seeds)


def _write_csv(path: str, rows: List[dict], fields: List[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r[k] for k in fields} for r in rows)


def _plot(rows: List[dict], diffs: List[dict], path: str, epochs: List[int], seeds: List[int]) -> None:
    """Left: each method's mean ± std; right: its paired difference from only-OUCL with the 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in RUNS]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 4.6))
    width = 0.8 / len(METRICS)
    for k, metric in enumerate(METRICS):
        values = [[r[metric] for r in rows if r["method"] == n] for n in names]
        ax1.bar([i + (k - (len(METRICS) - 1) / 2) * width for i in range(len(names))],
                [statistics.mean(v) for v in values], width, label=metric, capsize=2,
                yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values])
        mine = [d for d in diffs if d["metric"] == metric and d["reference"] == ONLY_OUCL]
        y = [i + (k - (len(METRICS) - 1) / 2) * width for i in range(len(mine))]
        errors = [[d["difference"] - d["ci_low"] for d in mine], [d["ci_high"] - d["difference"] for d in mine]]
        ax2.errorbar([d["difference"] for d in mine], y, xerr=errors, fmt="o", capsize=3, label=metric)
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax1.set(ylim=(0, 100), ylabel="linear-probe top-1 (%)", title="mean ± std over seeds")
    ax1.legend(loc="lower left")
    others = [d["method"] for d in diffs if d["metric"] == METRICS[0] and d["reference"] == ONLY_OUCL]
    ax2.set_yticks(range(len(others)), others)
    ax2.axvline(0, color="gray", lw=1)
    ax2.invert_yaxis()
    ax2.set(xlabel=f"difference from {ONLY_OUCL}, same seed (percentage points)",
            title="paired difference, 95 % t-interval")
    ax2.legend(loc="lower right")
    fig.suptitle(f"digits, {'/'.join(map(str, epochs))} epochs, {len(seeds)} seeds, official memory objective "
                 "(@3: 3 labels per class)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
