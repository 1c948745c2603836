"""Draw the benchmark CSVs as PNG charts (time and peak memory per backend).

    python -m bench.plot                       # every bench/results/*.csv -> bench/results/<name>*.png
    python -m bench.plot some.csv --out-dir d  # chosen files

A sweep (a CSV whose sizes are numbers, bench.sweep) gives one figure per op: log-log time against size
for each pass and peak memory of forward+backward, a line per backend, OOM marked with a cross at the top
of the axis. Any other CSV gives one bar chart: time and memory per (op, size, pass) and backend, OOM as a
hatched bar. CPU and GPU results live in different CSVs, so they never share a figure.
"""
from __future__ import annotations

import argparse
import csv
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

from .common import FIELDS, benchmark_csvs


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
    for ax, key, unit in ((axes[0], "time_ms", "time (ms, log)"), (axes[1], "peak_mem_mb",
                                                                   "peak extra memory (MiB, log)")):
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


def _is_sweep(rows) -> bool:
    return all(r["size"].isdigit() for r in rows) and len({r["size"] for r in rows}) > 1


def plot_sweep(path: Path, out_dir: Path) -> List[Path]:
    """One PNG per op: ``<stem>_<op>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read(path)
    outs = []
    for op in OrderedDict.fromkeys(r["op"] for r in rows):
        sub = [r for r in rows if r["op"] == op]
        passes = list(OrderedDict.fromkeys(r["pass"] for r in sub))
        panels = [(p, "time_ms") for p in passes] + [("forward+backward", "peak_mem_mb")]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        lines = list(OrderedDict.fromkeys((r["backend"], r["dtype"]) for r in sub))
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        color = {k: cycle[i % len(cycle)] for i, k in enumerate(lines)}  # one colour per line in every panel
        for ax, (pass_name, key) in zip(axes[0], panels):
            cells = [r for r in sub if r["pass"] == pass_name and r[key] != ""]
            numbers = [float(r[key]) for r in cells if r[key] != "OOM"]
            top = max(numbers) * 2 if numbers else 1.0
            for key_dtype in OrderedDict.fromkeys((r["backend"], r["dtype"]) for r in cells):
                line = sorted((int(r["size"]), r[key]) for r in cells if (r["backend"], r["dtype"]) == key_dtype)
                label = key_dtype[0] if len({r["dtype"] for r in sub}) == 1 else f"{key_dtype[0]} {key_dtype[1]}"
                ok = [(x, float(y)) for x, y in line if y != "OOM"]
                ax.plot([x for x, _ in ok], [y for _, y in ok], marker="o", ms=3, label=label, color=color[key_dtype])
                oom = [x for x, y in line if y == "OOM"]
                if oom:
                    ax.plot(oom, [top] * len(oom), "x", color=color[key_dtype], ms=8)
                    ax.annotate("OOM", (oom[0], top), fontsize=7, ha="center", va="bottom")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("size (B rows, or N embeddings)")
            ax.set_ylabel("peak extra memory (MiB)" if key == "peak_mem_mb" else "time (ms)")
            ax.set_title(f"{op}: {pass_name}" + (" memory" if key == "peak_mem_mb" else ""), fontsize=9)
            ax.grid(alpha=0.3, which="both")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{path.stem}: {sub[0]['device']}, torch {sub[0]['torch']}, commit {sub[0]['commit']}",
                     fontsize=9)
        fig.tight_layout()
        out = out_dir / f"{path.stem}_{op}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=90)
        plt.close(fig)
        outs.append(out)
    return outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="*", type=Path, help="default: bench/results/*.csv")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: next to each CSV")
    args = ap.parse_args(argv)
    paths = args.csv or benchmark_csvs(Path("bench/results"))
    if not paths:
        ap.error("no CSV to plot")
    for p in paths:
        out_dir = args.out_dir or p.parent
        outs = plot_sweep(p, out_dir) if _is_sweep(_read(p)) else [plot_csv(p, out_dir / f"{p.stem}.png")]
        for out in outs:
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
