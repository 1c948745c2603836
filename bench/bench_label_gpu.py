"""Label-mode OUCL on a GPU: the Triton backend (and the CUDA extension, and reference.py where it fits)
side by side, D = 128, forward+backward, from N = 8192 up to N = 1,048,576 (two views of N/2 samples).

    python -m bench.bench_label_gpu --out OUTDIR/label_gpu.csv
    python -m bench.bench_label_gpu --sizes 8192 65536 --dtype float32

Also measured in the same run: a plain bf16 GEMM (8192³) for the achievable tensor-core rate, against
which the fused pass's rate is reported (a self-mode forward+backward does three N×N×D products, 6·N²·D:
the forward's scores, then one TWO_WAY backward kernel that recomputes them and multiplies G + Gᵀ by the
rows), and the
Hessian-vector product against forward+backward at N = 8192. Out-of-memory is recorded as OOM.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import metaug_fast.functional as F

from .common import backends_on, median_ms, row, set_command, write_csv

D = 128


def _cuda_ms(fn, repeats):
    torch.cuda.synchronize()
    return median_ms(lambda: (fn(), torch.cuda.synchronize()), repeats)


def _peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(fn, repeats):
    try:
        fn()  # warm-up (compilation, autotuning)
        return _cuda_ms(fn, repeats), _peak_mb(fn)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", "OOM"


def gemm_tflops(dtype) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = _measure(lambda: a @ a, 10)[0]
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 65536, 262144, 1048576])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/label_gpu.csv"))
    args = ap.parse_args(argv)
    set_command("bench.bench_label_gpu", argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    peak = gemm_tflops(dtype)
    name = torch.cuda.get_device_name()
    print(f"label-mode OUCL (weighted), D={D}, {args.dtype}, forward+backward, {name}; "
          f"plain {args.dtype} GEMM 8192³: {peak:.0f} TFLOP/s")
    print(f"{'N':>9} {'backend':>10} {'ms':>10} {'peak MiB':>10} {'TFLOP/s':>9} {'of GEMM':>8}")
    rows = [row(op="gemm_8192", mode="plain", backend="torch.mm", dtype=args.dtype, size="8192^3",
                time_ms=round(2 * 8192**3 / (peak * 1e12) * 1e3, 3), peak_mem_mb="", **{"pass": "forward"})]
    backends = backends_on("cuda", ["triton", "cuda", "reference"])
    for n in args.sizes:
        emb = torch.randn(n, D, device="cuda", dtype=dtype, requires_grad=True)
        labels = torch.arange(n, device="cuda") % (n // 2)
        for backend in backends:
            if backend != "triton" and n > 262144:
                continue  # minutes per call where they run at all; the sweep's top end is Triton's
            repeats = 1 if n >= 262144 else args.repeats

            def run():
                emb.grad = None
                F.oucl_embeddings(emb, labels, backend=backend).backward()

            ms, mem = _measure(run, repeats)
            flops = 3 * 2 * n * n * D  # self mode: the work the kernels do (module docstring)
            rate = "" if ms == "OOM" else flops / (ms * 1e-3) / 1e12
            rows.append(row(op="oucl_weighted", mode="label", backend=backend, dtype=args.dtype, size=f"N={n},D={D}",
                            time_ms=ms if ms == "OOM" else round(ms, 3), peak_mem_mb=mem if mem == "OOM" else round(
                                mem, 1),
                            **{"pass": "forward+backward"}))
            print(f"{n:>9} {backend:>10} " + (f"{'OOM':>10} {'OOM':>10}" if ms == "OOM" else
                  f"{ms:>10.2f} {mem:>10.1f} {rate:>9.0f} {rate / peak:>8.2f}"), flush=True)
        del emb
        torch.cuda.empty_cache()
    # Double backward (the meta step) against forward+backward on Triton, N = 8192.
    emb = torch.randn(8192, D, device="cuda", dtype=dtype, requires_grad=True)
    labels = torch.arange(8192, device="cuda") % 4096
    vec = torch.randn_like(emb)

    def fwd_bwd():
        emb.grad = None
        F.oucl_embeddings(emb, labels, backend="triton").backward()

    def hvp():
        (g,) = torch.autograd.grad(F.oucl_embeddings(emb, labels, backend="triton"), emb, create_graph=True)
        torch.autograd.grad((g * vec).sum(), emb)

    for pass_name, fn in (("forward+backward", fwd_bwd), ("hvp", hvp)):
        ms, mem = _measure(fn, args.repeats)
        rows.append(row(op="oucl_weighted", mode="label", backend="triton", dtype=args.dtype, size=f"N=8192,D={D}",
                        time_ms=ms if ms == "OOM" else round(ms, 3), peak_mem_mb=mem if mem == "OOM" else round(mem, 1),
                        **{"pass": pass_name}))
        print(f"N=8192 triton {pass_name}: {ms} ms, {mem} MiB")
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
