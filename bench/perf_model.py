"""A static performance model of the Triton label kernels on a GPU: what the compiler produced, against what a
device can do per clock, gives each kernel's time and the limit that binds it, without a GPU.

    python -m bench.perf_model                      # the table for H100 and H200 at N = 16k, 64k and 1M
    python -m bench.perf_model --markdown           # the same as docs/gpu-status.md shows it
    python -m bench.perf_model --csv bench/results/perf_model.csv

Inputs: ``bench/results/gpu_static.csv`` (``make gpu-static``: each kernel compiled for sm_90 and
disassembled; per score, the SASS instructions a thread issues in the kernel's tile loop by class, loops over
feature chunks counted as many times as they run) and a :class:`Device` (multiprocessors, clock, and per
multiprocessor per clock what each unit completes, from the datasheets, with the bf16 matrix rate and the
copy bandwidth measured on this workplace's machines). Per kernel and per limit:

- **mma**: the tile products' FLOPs (2·D per product per score, :data:`KERNELS` says how many products) at
  the device's dense matrix rate for the inputs' dtype (fp16/bf16; fp32 products at ``ieee`` precision run
  as FFMA and count under fma);
- **fma**, **fp64**, **mufu** (exp, log, reciprocal), **int**, **lsu** (loads and stores): the SASS
  instructions of that class per score times the scores, over the unit's lanes per clock;
- **issue**: every instruction, over the 4 warp schedulers' 128 lanes per clock;
- **memory**: the rows read once from HBM plus the streamed side re-read per block of rows from L2.

A kernel takes the largest of these (the binding limit), plus a launch; an op is its kernels in sequence.
Static counts of one loop body are a floor for latency-bound code, and the clock, the L2 bandwidth and the
non-bf16 rates are leads: the GPU check (``bench/gpu_kernels.py``) records each prediction beside its
measurement, so the first GPU run calibrates the model.
"""
from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "bench" / "results" / "gpu_static.csv"
LIMITS = ("mma", "fma", "fp64", "mufu", "int", "lsu", "issue", "memory")
LAUNCH_S = 4e-6  # one kernel launch, back to back on a stream


@dataclass(frozen=True)
class Device:
    """A GPU's rates: ``lanes`` per multiprocessor per clock (thread-level results of each unit),
    ``tensor_tflops`` the dense matrix rate by input dtype, ``hbm_tbs`` and ``l2_tbs`` in TB/s."""

    name: str
    sms: int
    clock_ghz: float
    hbm_tbs: float
    l2_tbs: float
    tensor_tflops: Dict[str, float]
    lanes: Dict[str, int] = field(default_factory=lambda: dict(issue=128, fma=128, fp64=64, mufu=16, int=64, lsu=32))

    def per_second(self, unit: str) -> float:
        return self.lanes[unit] * self.sms * self.clock_ghz * 1e9


# Hopper's units per multiprocessor per clock: 4 schedulers issuing one warp instruction each (128 lanes),
# 128 fp32 lanes, 64 fp64, 16 MUFU (ex2, lg2, rcp), 64 integer, 32 load/store. The clock is the sustained
# boost under matrix load (a lead). bf16 rates and copy bandwidths: measured on this workplace's H100
# (798 TFLOP/s, 3.0 TB/s) and H200 (788, 4.3) machines; fp64's matrix rate and L2 are datasheet leads.
DEVICES = {
    "H100": Device("NVIDIA H100 SXM 80GB", 132, 1.755, 3.0, 7.0,
                   {"bfloat16": 798.0, "float16": 798.0, "float64": 67.0}),
    "H200": Device("NVIDIA H200 SXM 141GB", 132, 1.755, 4.3, 7.0,
                   {"bfloat16": 788.0, "float16": 788.0, "float64": 67.0}),
}


class Kernel(NamedTuple):
    """One launch of an op: the kernel, its dtype and constexprs (as ``gpu_static.csv`` specs them), how
    many tile products each score takes, how many operand rows each tile streams (``streamed``), and how
    often every score is computed (``passes``: once per chunk of output features)."""

    kernel: str
    dtype: str
    spec: Dict[str, object]
    products: int
    streamed: int
    passes: int = 1


class Prediction(NamedTuple):
    seconds: float
    limit: str
    terms: Dict[str, float]


def _rows(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _spec(text: str) -> Dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)


def find(rows: List[dict], kernel: Kernel, D: int) -> dict:
    """The row of ``kernel`` at width D (every field of its spec equal); ValueError when the CSV has none
    (``make gpu-static`` compiles the label kernels at D = 128, and the half dtypes' at the other widths
    whose tiles differ: a width's loops over feature chunks run D/BD times, so rows are per width)."""
    want = {k: str(v) for k, v in {"D": D, **kernel.spec}.items()}
    for r in rows:
        spec = _spec(r["spec"])
        if r["source"] == "triton" and r["kernel"] == kernel.kernel and r["dtype"] == kernel.dtype and all(
                spec.get(k) == v for k, v in want.items()):
            return r
    raise ValueError(f"{kernel.kernel} {kernel.dtype} {want} is not in gpu_static.csv (run make gpu-static)")


def kernel_time(row: dict, kernel: Kernel, n_scores: float, D: int, dev: Device) -> Prediction:
    """One launch over ``n_scores`` scores (each computed ``kernel.passes`` times)."""
    per = {c: float(row[f"{c}_per_score"] or 0) for c in ("mma", "ffma", "fmul_fadd", "fp64", "mufu", "int", "load",
                                                          "store", "local", "other")}
    scores = n_scores * kernel.passes
    elem = 2 if kernel.dtype in ("bfloat16", "float16") else 8 if kernel.dtype == "float64" else 4
    spec = {k: int(v) for k, v in kernel.spec.items() if isinstance(v, int) and not isinstance(v, bool)}
    block = spec.get("BM", 64)
    on_tensor = per["mma"] > 0 and kernel.dtype in dev.tensor_tflops
    n = math.sqrt(n_scores)
    terms = {
        "mma": scores * kernel.products * 2 * D / (dev.tensor_tflops[kernel.dtype] * 1e12) if on_tensor else 0.0,
        "fma": scores * (per["ffma"] + per["fmul_fadd"]) / dev.per_second("fma"),
        "fp64": scores * per["fp64"] / dev.per_second("fp64"),
        "mufu": scores * per["mufu"] / dev.per_second("mufu"),
        "int": scores * per["int"] / dev.per_second("int"),
        "lsu": scores * (per["load"] + per["store"] + per["local"]) / dev.per_second("lsu"),
        "issue": scores * sum(per.values()) / dev.per_second("issue"),
        "memory": (4 * n * D * elem) / (dev.hbm_tbs * 1e12)
        + scores * kernel.streamed * D * elem / block / (dev.l2_tbs * 1e12),
    }
    limit = max(terms, key=terms.get)
    return Prediction(terms[limit] + LAUNCH_S, limit, terms)


def label_ops(dtype: str, D: int) -> Dict[str, List[Kernel]]:
    """The Triton backend's kernels of each label-mode op in self mode (the weighted form: MetAug's label
    mode), as they launch at width D: ``forward``, ``backward`` (self mode's single TWO_WAY row kernel), and
    ``HVP``, the meta step's second-order part: the first derivative taken with a graph (the backward's own
    op on the raw rows) and the fused second derivative's three kernels, in the rows' dtype (fp16's in
    fp32: kernels/label_hvp.ROW_DTYPES)."""
    import torch

    from metaug_fast.contract import Form
    from metaug_fast.kernels import label, label_hvp
    from tools.check_triton_compile import gpu_configs, label_config

    weighted = int(Form.WEIGHTED)
    cfg = label.Config(**label_config(dtype, D))
    chunks = math.ceil(D / cfg.BDO)
    fwd = Kernel("_label_fwd_kernel", dtype, dict(FORM=weighted, SIM=0, **cfg.forward_meta()), 1, 1)
    rows = label.rows_meta(cfg, weighted, True)
    bwd = Kernel("_label_bwd_rows_kernel", dtype, dict(SIM=0, **rows), 2, 1 if cfg.RESIDENT else 2, chunks)
    hvp_dtype = dtype if getattr(torch, dtype) in label_hvp.ROW_DTYPES else "float32"
    with gpu_configs():
        t = label_hvp.tiles(getattr(torch, hvp_dtype), D)
    out_chunks = math.ceil(D / t["BDO"])
    sums = dict(BM=t["BM"], BN=t["sums_BN"], BD=t["BD"], SPLIT=t["SPLIT"], num_warps=t["sums_warps"])
    t = {k: v for k, v in t.items() if not k.startswith("sums_")}
    flags = dict(FORM=weighted, WITH_R=True, PREC="tf32" if hvp_dtype == "bfloat16" else "ieee", UPCAST=False,
                 EVEN_D=t["SPLIT"] and D % t["BD"] == 0 and D % t["BDO"] == 0)
    hvp = [bwd,
           Kernel("_hvp_sums_kernel", hvp_dtype, {**flags, **sums}, 3, 3),
           Kernel("_hvp_out_kernel", hvp_dtype, {**flags, **t, "BY_COLS": False}, 5, 5, out_chunks),
           Kernel("_hvp_out_kernel", hvp_dtype, {**flags, **t, "BY_COLS": True}, 5, 5, out_chunks)]
    return {"forward": [fwd], "backward": [bwd], "HVP": hvp}


def predict(n: int, D: int, dtype: str, device: str, static: Path = STATIC) -> Dict[str, Prediction]:
    """{op: Prediction} for self mode at N = n rows: forward, backward, forward+backward and HVP, the limit
    being the one that binds the op's longest kernel."""
    dev, rows = DEVICES[device], _rows(static)
    out = {}
    for op, kernels in label_ops(dtype, D).items():
        parts = [kernel_time(find(rows, k, D), k, float(n) * n, D, dev) for k in kernels]
        longest = max(parts, key=lambda p: p.seconds)
        terms = {f"{k.kernel}[{k.dtype}]": p.seconds for k, p in zip(kernels, parts)}
        out[op] = Prediction(sum(p.seconds for p in parts), longest.limit, terms)
    both = (out["forward"].seconds + out["backward"].seconds)
    out["forward+backward"] = Prediction(both, out["backward"].limit, {})
    return out


def device_key(name: str) -> Optional[str]:
    """The :data:`DEVICES` key of a CUDA device name (``torch.cuda.get_device_name``), None if not modelled."""
    for key in DEVICES:
        if key in name:
            return key
    return None


SIZES = (16384, 65536, 1 << 20)


def table(D: int = 128, dtype: str = "bfloat16") -> List[dict]:
    rows = []
    for device in DEVICES:
        for n in SIZES:
            pred = predict(n, D, dtype, device)
            fb = pred["forward+backward"].seconds
            for op in ("forward", "backward", "forward+backward", "HVP"):
                p = pred[op]
                rows.append(dict(device=device, N=n, D=D, dtype=dtype, op=op, ms=p.seconds * 1e3, limit=p.limit,
                                 x_fwd_bwd=p.seconds / fb))
    return rows


def _ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def markdown(rows: List[dict]) -> str:
    head = ("| device | N | forward | backward | forward+backward | HVP | HVP / (fwd+bwd) |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for device in DEVICES:
        for n in SIZES:
            by_op = {r["op"]: r for r in rows if r["device"] == device and r["N"] == n}
            cell = lambda op: f"{_ms(by_op[op]['ms'])} ms ({by_op[op]['limit']})"
            lines.append(f"| {device} | {n} | {cell('forward')} | {cell('backward')} | {cell('forward+backward')} | "
                         f"{cell('HVP')} | {by_op['HVP']['x_fwd_bwd']:.1f}× |")
    return head + "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--csv", type=Path)
    args = ap.parse_args(argv)
    rows = table(args.D, args.dtype)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    if args.markdown:
        print(markdown(rows))
    else:
        for r in rows:
            print(f"{r['device']} N={r['N']:>7} {r['op']:>16}: {r['ms']:9.3f} ms  {r['limit']:>6}  "
                  f"{r['x_fwd_bwd']:.2f}x fwd+bwd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
