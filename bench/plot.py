"""Draw the benchmark CSVs as PNG charts (time and peak memory per backend), one figure per CSV.

    python -m bench.plot                       # every bench/results/*.csv -> bench/results/<name>.png
    python -m bench.plot some.csv --out-dir d  # chosen files

Rows whose time or memory is "OOM" are drawn as hatched bars at the top of the axis and labelled OOM.
CPU and GPU results live in different CSVs, so they never share a figure.
"""
from __future__ import annotations

import argparse
import csv
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

from .common import FIELDS


def _read(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and list(rows[0]) != FIELDS:
        raise ValueError(f"{path}: not a metaug_fast benchmark CSV (columns {list(rows[0])})")
    return rows


def plot_csv(path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    groups = OrderedDict()  # (op, size, pass) -> {backend: row}
    for r in rows:
        groups.setdefault((r["op"], r["size"], r["pass"]), OrderedDict())[r["backend"]] = r
    backends = list(OrderedDict.fromkeys(r["backend"] for r in rows))
    labels = [f"{op}\n{size}\n{name}" for op, size, name in groups]
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.1 * len(groups)), 7), sharex=True)
    width = 0.8 / len(backends)
    for ax, key, unit in ((axes[0], "time_ms", "time (ms, log)"), (axes[1], "peak_mem_mb", "peak extra memory (MiB, log)")):
        values = [float(r[key]) for g in groups.values() for r in g.values() if r[key] not in ("", "OOM")]
        top = max(values) * 3 if values else 1.0
        for b, backend in enumerate(backends):
            xs, hs, ooms = [], [], []
            for x, g in enumerate(groups.values()):
                r = g.get(backend)
                if r is None or r[key] == "":
                    continue
                xs.append(x + (b - (len(backends) - 1) / 2) * width)
                ooms.append(r[key] == "OOM")
                hs.append(top if r[key] == "OOM" else float(r[key]))
            bars = ax.bar(xs, hs, width, label=backend)
            for bar, oom in zip(bars, ooms):
                if oom:
                    bar.set_hatch("//")
                    bar.set_alpha(0.4)
                    ax.annotate("OOM", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{path.stem}: {rows[0]['device']}, torch {rows[0]['torch']}, commit {rows[0]['commit']}",
                      fontsize=9)
    axes[1].set_xticks(range(len(groups)), labels, fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="*", type=Path, help="default: bench/results/*.csv")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: next to each CSV")
    args = ap.parse_args(argv)
    paths = args.csv or sorted(Path("bench/results").glob("*.csv"))
    paths = [p for p in paths if p.name != "train_digits_compare.csv"]  # drawn by metaug_fast.compare
    if not paths:
        ap.error("no CSV to plot")
    for p in paths:
        out = plot_csv(p, (args.out_dir or p.parent) / f"{p.stem}.png")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
