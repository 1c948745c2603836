"""Kernel timings on a GPU, the measurements ``bench/gpu_check.sh`` collects (it needs a CUDA device).

    python -m bench.gpu_kernels --out gpu_kernels.csv [--quick] [--summary summary.csv] [--profile prof.txt]
    python -m bench.gpu_kernels --ceilings-only --out ceilings.csv
    python -m bench.gpu_kernels --ceilings-from ceilings.csv --out gpu_kernels.csv   # reuse them

- ceilings, measured in the same run: bf16, tf32 and fp32 GEMM rates (8192³) and HBM copy bandwidth;
- label mode, self mode, D = 128, bf16, N = 16k and 64k (16k with ``--quick``): forward, forward+backward,
  with the work the kernels really do as a fraction of the bf16 GEMM rate (forward 2N²D, backward 6N²D);
  controls: the similarity GEMM alone and the exp-free hinge form; the HVP at N = 16k;
- the memory bank: B = 1024 queries against M = 1M constant rows, forward+backward;
- a sweep of label tile configurations (kernels.label.override) at N = 16k;
- score mode B = 4096, K⁺ = 6, K⁻ = 6144 bf16 (the paper's shape) on every GPU backend;
- the autotuner's choices, registers/spills/shared memory of every compiled kernel, and a torch.profiler
  table of one forward+backward and one HVP.
Each result is written as soon as it is measured (``--out`` and, when given, gpu_check's ``--summary``).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

FIELDS = ("group", "name", "value", "unit")


class Sink:
    def __init__(self, out: Path, summary: Path = None):
        self.out, self.summary = out, summary
        with open(out, "w", newline="") as f:
            csv.writer(f).writerow(FIELDS)

    def __call__(self, group, name, value, unit="", status="ok"):
        value = f"{value:.4g}" if isinstance(value, float) else value
        with open(self.out, "a", newline="") as f:
            csv.writer(f).writerow((group, name, value, unit))
        if self.summary:
            with open(self.summary, "a", newline="") as f:
                csv.writer(f).writerow((group, name, value, unit, status))
        print(f"{group}: {name} = {value} {unit} [{status}]", flush=True)


def timed(fn, reps=5, warmup=2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs (CUDA events), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings(sink) -> dict:
    n = 8192
    rates = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
        rates[name] = 2 * n**3 / timed(lambda: a @ b) / 1e12  # noqa: B023
        sink("ceilings", f"GEMM {name} {n}^3", rates[name], "TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.empty(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    y = torch.empty_like(x)
    sink("ceilings", "HBM copy 2 GiB", 2 * x.numel() * 4 / timed(lambda: y.copy_(x)) / 1e9, "GB/s")
    return rates


def read_ceilings(path: Path) -> dict:
    """The GEMM rates a ``--ceilings-only`` run of this process's GPU wrote, by precision."""
    with open(path) as f:
        return {row["name"].split()[1]: float(row["value"]) for row in csv.DictReader(f)
                if row["name"].startswith("GEMM ")}


def label(sink, n: int, bf16_rate: float, hvp: bool) -> None:
    import metaug_fast.functional as F

    d = 128
    emb = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.arange(n // 2, device="cuda").repeat(2)
    gemm = timed(lambda: emb.detach() @ emb.detach().T, reps=3)
    sink("label", f"N={n} similarity GEMM only", gemm * 1e3, "ms")
    for form in ("weighted", "hinge"):
        loss = lambda: F.oucl_embeddings(emb, labels, form=form, backend="triton")  # noqa: E731,B023
        fwd = timed(loss, reps=3)
        fwd_bwd = timed(lambda: loss().backward(), reps=3)  # noqa: B023
        sink("label", f"N={n} {form} forward", fwd * 1e3, "ms")
        sink("label", f"N={n} {form} forward+backward", fwd_bwd * 1e3, "ms")
        if form == "weighted":
            work = 8 * n * n * d  # forward 2N²D; backward: recompute 2N²D + two products 4N²D
            sink("label", f"N={n} fwd+bwd rate / bf16 GEMM rate", work / fwd_bwd / 1e12 / bf16_rate)
            sink("label", f"N={n} fwd+bwd / similarity GEMM", fwd_bwd / gemm, "x")
    if hvp:
        vec = torch.randn_like(emb)

        def step():
            (g,) = torch.autograd.grad(F.oucl_embeddings(emb, labels, backend="triton"), emb, create_graph=True)
            torch.autograd.grad((g * vec).sum(), emb)

        sink("label", f"N={n} HVP", timed(step, reps=1, warmup=1) * 1e3, "ms")


def bank(sink) -> None:
    import metaug_fast.functional as F

    z = torch.randn(1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.nn.functional.normalize(torch.randn(1_000_000, 128, device="cuda"), dim=1).bfloat16()
    labels, ref_labels = torch.randint(0, 1000, (1024,), device="cuda"), torch.randint(0, 1000, (1_000_000,), device="cuda")
    t = timed(lambda: F.oucl_embeddings(z, labels, ref, ref_labels, backend="triton").backward(), reps=3)
    sink("bank", "B=1024 M=1M fwd+bwd (constant bank)", t * 1e3, "ms")


def tile_sweep(sink, n: int) -> None:
    import metaug_fast.functional as F
    from metaug_fast.kernels import label as K

    emb = torch.randn(n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.arange(n // 2, device="cuda").repeat(2)
    for fields in K.CANDIDATES:
        name = f"N={n} " + " ".join(f"{k}={v}" for k, v in fields.items()) + " fwd+bwd"
        try:
            with K.override(**fields):
                sink("tiles", name, timed(lambda: F.oucl_embeddings(emb, labels, backend="triton").backward(),
                                          reps=3) * 1e3, "ms")
        except Exception as exc:  # noqa: BLE001 (a configuration that cannot run is a result too)
            sink("tiles", name, type(exc).__name__, status="failed")


def score(sink) -> None:
    import metaug_fast
    import metaug_fast.functional as F

    pos = torch.rand(4096, 6, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    neg = torch.rand(4096, 6144, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for backend in ("reference", "triton", "cuda"):
        if backend not in metaug_fast.available_backends():
            continue
        loss = lambda: F.oucl(pos, neg, form="circle", backend=backend)  # noqa: E731,B023
        sink("score", f"B=4096 K=6/6144 circle {backend} forward", timed(loss) * 1e3, "ms")
        sink("score", f"B=4096 K=6/6144 circle {backend} fwd+bwd", timed(lambda: loss().backward()) * 1e3, "ms")  # noqa: B023


def compiled_kernels(sink) -> None:
    """Autotuning choices and the resources of every kernel compiled in this process."""
    import triton

    from metaug_fast.kernels import label, margins, score, similarity

    for module in (score, margins, label, similarity):
        for name, kernel in vars(module).items():
            if isinstance(kernel, triton.runtime.Autotuner):
                for key, config in kernel.cache.items():
                    sink("autotune", f"{name} {key}", str(config).replace(",", ";"))
                kernel = kernel.fn
            if not isinstance(kernel, triton.runtime.JITFunction):
                continue
            for cache in getattr(kernel, "device_caches", {}).values():
                for compiled in cache[0].values():
                    spec = f"{name} warps={compiled.metadata.num_warps}"
                    sink("resources", spec, f"regs={compiled.n_regs} spills={compiled.n_spills} "
                                            f"shared={compiled.metadata.shared}")


def profile(path: Path, n: int) -> None:
    import metaug_fast.functional as F

    emb = torch.randn(n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.arange(n // 2, device="cuda").repeat(2)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    tables = []
    for what in ("forward+backward", "HVP"):
        with torch.profiler.profile(activities=activities) as prof:
            loss = F.oucl_embeddings(emb, labels, backend="triton")
            if what == "HVP":
                (g,) = torch.autograd.grad(loss, emb, create_graph=True)
                g.sum().backward()
            else:
                loss.backward()
            torch.cuda.synchronize()
        tables.append(f"== {what}, N = {n}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    path.write_text("\n\n".join(tables))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summary", type=Path, help="gpu_check's summary.csv, appended to")
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ceilings-only", action="store_true")
    ap.add_argument("--ceilings-from", type=Path, help="a --ceilings-only CSV of the same run, not measured again")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    sink = Sink(args.out, args.summary)
    rates = read_ceilings(args.ceilings_from) if args.ceilings_from else ceilings(sink)
    if args.ceilings_only:
        return 0
    t0 = time.monotonic()
    steps = [lambda: label(sink, 16384, rates["bf16"], hvp=True), lambda: score(sink)]
    if not args.quick:
        steps += [lambda: label(sink, 65536, rates["bf16"], hvp=False), lambda: bank(sink),
                  lambda: tile_sweep(sink, 16384)]
    steps.append(lambda: compiled_kernels(sink))
    if args.profile:
        steps.append(lambda: profile(args.profile, 8192))
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 (one failing measurement must not lose the others)
            sink("error", getattr(step, "__name__", "step"), f"{type(exc).__name__}: {exc}"[:200], status="failed")
        torch.cuda.empty_cache()
    sink("kernels", "wall time", time.monotonic() - t0, "s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
