"""Static evidence about the GPU kernels without a GPU: every Triton kernel specialization (the ones
``make check-triton`` compiles) and every kernel of the CUDA extension (as ``make check-cuda`` builds it),
disassembled for sm_90.

    python -m tools.gpu_static [--cuda-lib build/check-cuda/lib] [--out bench/results/gpu_static.csv]

Per kernel: registers, stack frame, spill stores (bytes per thread; Triton: ptxas -v, CUDA: cuobjdump's
resource usage, where spills show as stack), shared memory, and the SASS instruction mix by class (tensor-core
MMA, FFMA, FMUL/FADD, fp64, MUFU for exp/log, integer, loads, stores, local memory) over the whole kernel and
in its loops per score: the instructions of its outermost loops, each body counted once, divided by the
scores one thread handles per iteration (BM·BN or BLOCK_B·BLOCK_K over the threads of a program for Triton;
one score a lane per iteration in the CUDA kernels, where nvcc may unroll a loop, so theirs are per unrolled
iteration: an upper bound). Static counts: a loop run twice counts once, and a kernel with several passes
(positives, negatives, a second sweep) sums them, except the label kernels, which run each tile through an
interior or an edge copy of one loop: theirs count the interior (leanest) copy, the one nearly every tile
takes. FFMA that remain with contraction off come from the math library's exp/log. Triton kernels are
compiled as check_triton_compile specializes them (label kernels: contiguous rows of width D, in spec). For
comparing versions of the same kernel, not for predicting time. Writes the CSV and a chart beside it
(``make gpu-static``).
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List

from tools.check_triton_compile import LABEL_MODULES, compile_job, jobs, resources, toolkit_binary

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("mma", "ffma", "fmul_fadd", "fp64", "mufu", "int", "load", "store", "local", "other")
FIELDS = ("source", "kernel", "dtype", "spec", "registers", "stack", "spill_stores", "shared", "instructions",
          "loops", "scores_per_iter", "inner_trips") + tuple(f"{c}_total" for c in CLASSES) + tuple(
              f"{c}_per_score" for c in CLASSES)
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*(.*?);")
_TARGET = re.compile(r"`?\(?(\.L_x_\d+|0x[0-9a-f]+)\)?`?")


def classify(opcode: str) -> str:
    if opcode in ("HMMA", "HGMMA", "IMMA", "DMMA", "WGMMA", "BMMA"):
        return "mma"
    if opcode == "FFMA":
        return "ffma"
    if opcode in ("FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSET"):
        return "fmul_fadd"
    if opcode.startswith("D") and opcode[1:] in ("FMA", "MUL", "ADD", "SETP", "MNMX"):
        return "fp64"
    if opcode == "MUFU":
        return "mufu"
    if opcode in ("LDL", "STL"):
        return "local"
    if opcode.startswith(("LDG", "LDS", "LDC", "LD", "ULDC", "UTMALDG")):
        return "load"
    if opcode.startswith(("STG", "STS", "ST", "RED", "ATOM")):
        return "store"
    if opcode.startswith(("IMAD", "IADD", "ISETP", "IMNMX", "LOP", "SHF", "LEA", "SEL", "PRMT", "POPC", "FLO",
                          "UIADD", "UIMAD", "ULOP", "USHF", "ULEA", "USEL", "UISETP", "VIADD", "IABS", "I2F", "F2I")):
        return "int"
    return "other"


def parse_sass(text: str) -> Dict[str, List[tuple]]:
    """{function: [(address, opcode, operands)]} from nvdisasm or cuobjdump -sass output; labels
    (``.L_x_5:``) are kept as (address, ":label", name) entries so branches can be resolved."""
    functions: Dict[str, List[tuple]] = {}
    current = None
    pending_labels: List[str] = []
    for line in text.splitlines():
        header = re.match(r"\s*(?:Function : |\.text\.)([\w$]+):?\s*$", line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending_labels.append(label.group(1))
            continue
        m = _INSN.search(line)
        if m and current is not None:
            address = int(m.group(1), 16)
            for name in pending_labels:
                current.append((address, ":label", name))
            pending_labels = []
            current.append((address, m.group(2), m.group(4)))
    return functions


def loop_ranges(insns: List[tuple]) -> List[tuple]:
    """Every loop as a (start, end) address range: a branch to an earlier address closes a loop."""
    labels = {name: address for address, op, name in insns if op == ":label"}
    ranges = []
    for address, op, operands in insns:
        if op not in ("BRA", "JMP"):
            continue
        target = _TARGET.search(operands or "")
        if not target:
            continue
        t = target.group(1)
        start = labels.get(t) if t.startswith(".L") else int(t, 16)
        if start is not None and start <= address:
            ranges.append((start, address))
    return sorted(set(ranges))


def loops(insns: List[tuple]) -> List[tuple]:
    """Outermost loops as (start, end) address ranges."""
    ranges = loop_ranges(insns)
    return [r for r in ranges if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in ranges)]


def row(source: str, kernel: str, dtype: str, spec: str, res: dict, insns: List[tuple], scores_per_iter: float,
        leanest: bool = False, inner_trips: int = 1) -> dict:
    """One CSV row. ``leanest``: per score over the outermost loop with the fewest instructions only (of
    those with ten or more: a one-instruction loop is the kernel's final trap), for kernels that run every
    tile through one of two copies of the same loop, an interior one and a masked one for edge tiles.
    ``inner_trips``: how many times a loop nested in an outermost one runs per iteration of it (a tile's
    products over chunks of the features: D/BD), its instructions counted that many times (an upper bound
    by the iterations a pipelined loop peels into its prologue, each counted once)."""
    real = [(a, op) for a, op, _ in insns if op != ":label"]
    outer = loops(insns)
    if leanest:
        size = {r: sum(r[0] <= a <= r[1] for a, _ in real) for r in outer}
        bodies = [r for r in outer if size[r] >= 10]
        outer = [min(bodies, key=size.get)] if bodies else outer
    inner = [r for r in loop_ranges(insns) if r not in outer and any(o[0] <= r[0] and r[1] <= o[1] for o in outer)]
    total = collections.Counter(classify(op) for _, op in real)
    in_loops = collections.Counter()
    for a, op in real:
        if any(s <= a <= e for s, e in outer):
            in_loops[classify(op)] += inner_trips if any(s <= a <= e for s, e in inner) else 1
    out = dict(source=source, kernel=kernel, dtype=dtype, spec=spec, instructions=len(real), loops=len(outer),
               scores_per_iter=f"{scores_per_iter:g}", inner_trips=inner_trips, **res)
    for c in CLASSES:
        out[f"{c}_total"] = total.get(c, 0)
        out[f"{c}_per_score"] = f"{in_loops.get(c, 0) / scores_per_iter:.3g}" if outer else ""
    return out


def _triton_row(job) -> dict:
    compiled = compile_job(job)
    res = resources(compiled)
    res.pop("spill_loads")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([toolkit_binary("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    (insns,) = parse_sass(sass).values()
    c = job.constexprs
    threads = 32 * c.get("num_warps", compiled.metadata.num_warps)
    tile = c["BM"] * c["BN"] if "BM" in c else c["BLOCK_B"] * c["BLOCK_K"]
    widths = job.module in LABEL_MODULES + ("similarity",)
    spec = ",".join(f"{k}={v}" for k, v in ({"D": job.D, **c} if widths else c).items())
    # The label kernels loop over chunks of BD features inside their tile loop unless a block is RESIDENT.
    trips = -(-job.D // c["BD"]) if job.module in LABEL_MODULES and not c.get("RESIDENT", False) else 1
    return row("triton", job.kernel, job.dtype, spec, res, insns, tile / threads, leanest=job.module in LABEL_MODULES,
               inner_trips=trips)


_CPP_TYPES = {"c10::Half": "float16", "c10::BFloat16": "bfloat16", "float": "float32", "double": "float64"}


def cuda_rows(lib_dir: Path) -> List[dict]:
    """The CUDA extension's kernels, from the shared library ``make check-cuda`` builds."""
    libs = glob.glob(str(lib_dir / "**" / "_C_cuda*.so"), recursive=True)
    if not libs:
        return []
    cuobjdump = toolkit_binary("cuobjdump")
    usage = subprocess.run([cuobjdump, "-res-usage", libs[0]], capture_output=True, text=True).stdout
    res = {}
    for name, regs, stack, shared in re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage):
        res[name] = dict(registers=int(regs), stack=int(stack), spill_stores=int(stack), shared=int(shared))
    sass = parse_sass(subprocess.run([cuobjdump, "-sass", libs[0]], capture_output=True, text=True).stdout)
    out = []
    for name, insns in sorted(sass.items()):
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
        short = re.sub(r"^void (?:metaug_fast::)?(?:\(anonymous namespace\)::)?", "", demangled).split("(")[0]
        kernel, _, targs = short.partition("<")
        targs = targs.rstrip(">")
        args = [a.strip() for a in targs.split(",")]
        # <FORM, input, accumulation>, <input, accumulation> or <FORM, T>: the first type names the dtype.
        dtype = _CPP_TYPES.get(next((a for a in args if not a.isdigit()), ""), "")
        spec = f"FORM={args[0]}" if len(args) > 1 and args[0].isdigit() else ""
        empty = dict(registers="", stack="", spill_stores="", shared="")
        out.append(row("cuda", kernel, dtype, spec, res.get(name, empty), insns, 1))
    return out


def chart(rows: List[dict], path: Path) -> None:
    """Instruction mix per score (stacked by class) and registers per thread, one bar per kernel: the weighted
    form and the form-independent kernels in bf16 and fp32, label kernels at D = 128 with their tiles (the
    CSV has every specialization, every width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["dtype"] in ("bfloat16", "float32") and r["mma_per_score"] != "" and
             ("FORM=2" in r["spec"] or "FORM" not in r["spec"]) and "HAS_PM=False" not in r["spec"] and
             ("D=" not in r["spec"] or "D=128," in r["spec"])]

    def name(r):
        spec = dict(kv.split("=", 1) for kv in r["spec"].split(",") if "=" in kv)
        tiles = (f" {spec['BM']}×{spec['BN']}" if "BM" in spec else
                 f" {spec['BLOCK_B']}×{spec['BLOCK_K']}, {spec['num_warps']} warps" if "BLOCK_B" in spec else "")
        return f"{r['source']} {r['kernel'].strip('_')} {r['dtype']}{tiles}" + (
            " two-way" if spec.get("TWO_WAY") == "True" else "")

    labels = [name(r) for r in shown]
    y = list(range(len(shown)))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 0.3 * len(shown) + 1.5), sharey=True,
                                  gridspec_kw=dict(width_ratios=[3, 1]))
    left = [0.0] * len(shown)
    for c, color in zip(CLASSES, plt.get_cmap("tab10").colors):
        values = [float(r[f"{c}_per_score"] or 0) for r in shown]
        ax.barh(y, values, left=left, color=color, label=c)
        left = [a + b for a, b in zip(left, values)]
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("SASS instructions per score in the kernel's loops (static, sm_90)")
    ax.legend(ncol=5, fontsize=8, loc="lower right")
    ax.set_title("Weighted form and form-independent kernels, bf16 and fp32, label kernels at D = 128 "
                 "(the rest: the CSV)")
    ax2.barh(y, [int(r["registers"] or 0) for r in shown], color="grey")
    for i, r in enumerate(shown):
        if r["spill_stores"] not in ("", 0, "0"):
            ax2.text(int(r["registers"] or 0) + 3, i, f"spills {r['spill_stores']} B", color="red", va="center",
                     fontsize=7)
    ax2.set_xlabel("registers per thread (red: spill stores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_static.csv")
    ap.add_argument("--cuda-lib", type=Path, default=ROOT / "build" / "check-cuda" / "lib")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(_triton_row, jobs()))
    cuda = cuda_rows(args.cuda_lib)
    if not cuda:
        print(f"no CUDA extension under {args.cuda_lib} (run make check-cuda first): Triton kernels only",
              file=sys.stderr)
    rows += cuda
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    chart(rows, args.out.with_suffix(".png"))
    spilling = [f"{r['source']} {r['kernel']} {r['dtype']}" for r in rows if r["spill_stores"] not in ("", 0)]
    print(f"{len(rows)} kernels ({len(cuda)} CUDA) -> {args.out} and {args.out.with_suffix('.png').name}; "
          f"spilling: {spilling or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
