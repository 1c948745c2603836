"""Kernel timings on a GPU, the measurements ``bench/gpu_check.sh`` collects; every timing row is preceded by
a check of the same kernel against the reference, and a row whose check failed says so.

    python -m bench.gpu_kernels --out gpu_kernels.csv [--quick] [--summary summary.csv] [--profile prof.txt]
    python -m bench.gpu_kernels --ceilings-only --out ceilings.csv
    python -m bench.gpu_kernels --ceilings-from ceilings.csv --out gpu_kernels.csv   # reuse them
    python -m bench.gpu_kernels --dry-run --out x.csv   # this CPU: every row at tiny sizes, Triton interpreted

- ceilings, measured in the same run: bf16, tf32 and fp32 GEMM rates (8192³) and HBM copy bandwidth;
- label mode, self mode, D = 128, bf16, N = 16k and 64k (16k with ``--quick``): forward, forward+backward,
  with the work the kernels really do as a fraction of the bf16 GEMM rate (self mode: forward 2N²D, the
  TWO_WAY backward 4N²D, so 6N²D); controls: the similarity GEMM alone and the exp-free hinge form; the HVP
  at N = 16k and 64k (16k with ``--quick``); beside each timed forward, forward+backward and HVP, the static
  model's prediction for this GPU (bench/perf_model.py) and the limit it names;
- the memory bank: B = 1024 queries against M = 1M constant rows, forward+backward;
- a sweep of label tile configurations (kernels.label.override) at N = 16k;
- score mode B = 4096, K⁺ = 6, K⁻ = 6144 bf16 (the paper's shape) on every GPU backend;
- the autotuner's choices, registers/spills/shared memory of every compiled kernel, and a torch.profiler
  table of one forward+backward and one HVP.

The checks: the loss and gradients (and for the HVP its product) at a size with interior tiles (N = 2048
self mode, a 256 × 4096 bank, B = 512 score rows) against the fp64 reference, within twice the reference's
own error in the input dtype plus one ulp (docs/accuracy.md#accuracy), fp32 for the HVP within 1e-3; and
every timed output finite at its timed size. Each result is written as soon as it is measured (``--out``
and, when given, gpu_check's ``--summary``).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

# Nothing of metaug_fast is imported here at module level: --dry-run sets TRITON_INTERPRET in main(), and
# every Triton kernel must be defined after that (a kernel defined before it is compiled, not interpreted).

FIELDS = ("group", "name", "value", "unit")
D = 128


@dataclass(frozen=True)
class Sizes:
    """What each row runs at: the GPU's sizes, or tiny ones for the dry run on the CPU."""

    gemm: int
    copy: int
    label: Tuple[int, ...]
    hvp: Tuple[int, ...]
    check: int
    bank: Tuple[int, int]
    bank_check: Tuple[int, int]
    score: Tuple[int, int, int]
    score_check: Tuple[int, int, int]
    tiles: int
    profile: int
    reps: int


GPU = Sizes(gemm=8192, copy=2**29, label=(16384, 65536), hvp=(16384, 65536), check=2048, bank=(1024, 1_000_000),
            bank_check=(256, 4096), score=(4096, 6, 6144), score_check=(512, 6, 1024), tiles=16384, profile=8192,
            reps=3)
DRY = Sizes(gemm=64, copy=2**12, label=(48,), hvp=(40,), check=40, bank=(16, 96), bank_check=(8, 40),
            score=(16, 3, 80), score_check=(8, 3, 40), tiles=40, profile=32, reps=1)


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


class Bench:
    """The device, the sizes and the sink of one run."""

    def __init__(self, sink: Sink, dry_run: bool):
        self.sink, self.dry = sink, dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.sizes = DRY if dry_run else GPU

    def sync(self):
        if not self.dry:
            torch.cuda.synchronize()

    def timed(self, fn, reps=None, warmup=2) -> float:
        """Median seconds of ``fn()`` over ``reps`` runs (CUDA events; the wall clock in the dry run)."""
        reps = reps or self.sizes.reps
        for _ in range(1 if self.dry else warmup):
            fn()
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            if self.dry:
                fn()
                times.append(time.perf_counter() - t0)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def check(self, name: str, got, exact, low_ref=None, tol: Optional[float] = None) -> bool:
        """Records whether each output of ``got`` is within its bound of ``exact`` (lists of tensors), and the
        largest error against its bound: ``tol`` for every output, or, given the reference's own outputs in
        the low dtype, the documented low-precision bound of each (:mod:`metaug_fast._selfcheck`)."""
        from metaug_fast._selfcheck import low_precision_bounds, rel_err

        errs = [rel_err(g, w) for g, w in zip(got, exact)]
        bounds = [tol] * len(errs) if tol is not None else low_precision_bounds(low_ref, exact, got[0].dtype)
        worst = max(range(len(errs)), key=lambda i: errs[i] / bounds[i])
        ok = _finite(*got) and all(e <= bound for e, bound in zip(errs, bounds))
        self.sink("check", f"{name} vs fp64 reference", f"{errs[worst]:.3g} (bound {bounds[worst]:.3g})",
                  "rel. error", status="ok" if ok else "failed")
        return ok


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _status(checked: bool, finite: bool = True) -> str:
    if not checked:
        return "unchecked: its check failed"
    return "ok" if finite else "failed: not finite"


def _views(b: Bench, n: int, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n // 2, D, generator=gen, dtype=torch.float64)
    emb = torch.cat([z, z + 0.1 * torch.randn(n // 2, D, generator=gen, dtype=torch.float64)])
    labels = torch.arange(n // 2).repeat(2)
    return emb.to(device=b.device, dtype=dtype), labels.to(b.device)


def _loss_and_grads(fn: Callable, *inputs):
    from metaug_fast._selfcheck import outputs

    return outputs(fn, inputs, 1)


def ceilings(b: Bench) -> dict:
    n = b.sizes.gemm
    rates = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x, y = torch.randn(n, n, device=b.device, dtype=dtype), torch.randn(n, n, device=b.device, dtype=dtype)
        rates[name] = 2 * n**3 / b.timed(lambda: x @ y) / 1e12
        b.sink("ceilings", f"GEMM {name} {n}^3", rates[name], "TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.empty(b.sizes.copy, device=b.device, dtype=torch.float32)
    y = torch.empty_like(x)
    copy = b.timed(lambda: y.copy_(x))
    b.sink("ceilings", f"HBM copy {x.numel() * 4 / 2**30:.3g} GiB", 2 * x.numel() * 4 / copy / 1e9, "GB/s")
    return rates


def read_ceilings(path: Path) -> dict:
    """The GEMM rates a ``--ceilings-only`` run of this process's GPU wrote, by precision."""
    with open(path) as f:
        return {row["name"].split()[1]: float(row["value"]) for row in csv.DictReader(f)
                if row["name"].startswith("GEMM ")}


def check_label(b: Bench, form: str, dtype=torch.bfloat16) -> bool:
    """Self mode at N = sizes.check: loss and gradient against the fp64 reference."""
    import metaug_fast.functional as F

    emb, labels = _views(b, b.sizes.check, dtype)

    def fn(backend):
        return lambda e: F.oucl_embeddings(e, labels, form=form, backend=backend)

    exact = _loss_and_grads(fn("reference"), emb.double())
    return b.check(f"N={b.sizes.check} {form} {str(dtype)[6:]} loss+grad", _loss_and_grads(fn("triton"), emb),
                   exact, _loss_and_grads(fn("reference"), emb))


def label(b: Bench, n: int, bf16_rate: float) -> None:
    import metaug_fast.functional as F

    emb, labels = _views(b, n, torch.bfloat16)
    emb.requires_grad_()
    gemm = b.timed(lambda: emb.detach() @ emb.detach().T)
    b.sink("label", f"N={n} similarity GEMM only", gemm * 1e3, "ms")
    for form in ("weighted", "hinge"):
        checked = check_label(b, form)
        loss = lambda: F.oucl_embeddings(emb, labels, form=form, backend="triton")
        fwd = b.timed(loss)
        emb.grad = None
        value = loss()
        value.backward()
        status = _status(checked, _finite(value, emb.grad))
        fwd_bwd = b.timed(lambda: loss().backward())
        b.sink("label", f"N={n} {form} forward", fwd * 1e3, "ms", status=status)
        b.sink("label", f"N={n} {form} forward+backward", fwd_bwd * 1e3, "ms", status=status)
        if form == "weighted":
            predicted(b, n, "forward")
            predicted(b, n, "forward+backward")
            work = 6 * n * n * D  # self mode: forward 2N²D; TWO_WAY backward: recompute 2N²D + one product 2N²D
            b.sink("label", f"N={n} fwd+bwd rate (6N²D) / bf16 GEMM rate", work / fwd_bwd / 1e12 / bf16_rate,
                   status=status)
            b.sink("label", f"N={n} fwd+bwd / similarity GEMM", fwd_bwd / gemm, "x", status=status)


def _hvp(fn: Callable, x, v):
    """(gradient, Hessian-vector product along ``v``): the timed step, with its direction made beforehand."""
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


def predicted(b: Bench, n: int, op: str) -> None:
    """The static model's time of the weighted form's ``op`` in bf16 self mode at N = n on this GPU (the dry
    run: the H100's), beside the measured row."""
    from bench.perf_model import device_key, predict

    key = "H100" if b.dry else device_key(torch.cuda.get_device_name())
    if key is None:
        b.sink("label", f"N={n} weighted {op} predicted", f"no model of {torch.cuda.get_device_name()}")
        return
    p = predict(n, D, "bfloat16", key)[op]
    b.sink("label", f"N={n} weighted {op} predicted ({key} model, {p.limit}-bound)", p.seconds * 1e3, "ms")


def hvp(b: Bench, n: int) -> None:
    """The label HVP, checked in fp32 against fp64 at the check size, timed in bf16 at N = n."""
    import metaug_fast.functional as F
    from metaug_fast._selfcheck import HVP_TOL, outputs

    emb, labels = _views(b, b.sizes.check, torch.float32, seed=1)
    fn = lambda backend: lambda e: F.oucl_embeddings(e, labels, backend=backend)
    checked = b.check(f"N={b.sizes.check} weighted fp32 loss+grad+HVP", outputs(fn("triton"), (emb,), 2),
                      outputs(fn("reference"), (emb.double(),), 2), tol=HVP_TOL[torch.float32])
    emb, labels = _views(b, n, torch.bfloat16)
    v = torch.randn_like(emb)
    step = lambda: _hvp(lambda e: F.oucl_embeddings(e, labels, backend="triton"), emb, v)
    t = b.timed(step, reps=1)
    b.sink("label", f"N={n} HVP", t * 1e3, "ms", status=_status(checked, _finite(*step())))
    predicted(b, n, "HVP")


def bank(b: Bench) -> None:
    import metaug_fast.functional as F

    def data(rows, m):
        gen = torch.Generator().manual_seed(2)
        z = torch.randn(rows, D, generator=gen)
        ref = torch.nn.functional.normalize(torch.randn(m, D, generator=gen), dim=1)
        return (z.to(b.device, torch.bfloat16), torch.randint(0, 1000, (rows,), generator=gen).to(b.device),
                ref.to(b.device, torch.bfloat16), torch.randint(0, 1000, (m,), generator=gen).to(b.device))

    z, labels, ref, ref_labels = data(*b.sizes.bank_check)
    fn = lambda backend, r: lambda q: F.oucl_embeddings(q, labels, r, ref_labels, backend=backend)
    checked = b.check(f"B={len(z)} M={len(ref)} loss+grad", _loss_and_grads(fn("triton", ref), z),
                      _loss_and_grads(fn("reference", ref.double()), z.double()),
                      _loss_and_grads(fn("reference", ref), z))
    z, labels, ref, ref_labels = data(*b.sizes.bank)
    z.requires_grad_()
    run = lambda: F.oucl_embeddings(z, labels, ref, ref_labels, backend="triton").backward()
    t = b.timed(run)
    b.sink("bank", f"B={len(z)} M={len(ref)} fwd+bwd (constant bank)", t * 1e3, "ms",
           status=_status(checked, _finite(z.grad)))


def tile_sweep(b: Bench) -> None:
    import metaug_fast.functional as F
    from metaug_fast.kernels import label as K

    n = b.sizes.tiles
    emb, labels = _views(b, n, torch.bfloat16)
    emb.requires_grad_()
    for fields in K.CANDIDATES:
        name = f"N={n} " + " ".join(f"{k}={v}" for k, v in fields.items()) + " fwd+bwd"
        try:
            with K.override(**fields):
                checked = check_label(b, "weighted")
                t = b.timed(lambda: F.oucl_embeddings(emb, labels, backend="triton").backward())
                b.sink("tiles", name, t * 1e3, "ms", status=_status(checked, _finite(emb.grad)))
        except Exception as exc:  # noqa: BLE001 (a configuration that cannot run is a result too)
            b.sink("tiles", name, type(exc).__name__, status="failed")


def score(b: Bench) -> None:
    import metaug_fast.functional as F

    from .common import backends_on

    def data(rows, kp, kn):
        gen = torch.Generator().manual_seed(3)
        return (torch.rand(rows, kp, generator=gen).to(b.device, torch.bfloat16),
                torch.rand(rows, kn, generator=gen).to(b.device, torch.bfloat16))

    rows, kp, kn = b.sizes.score
    for backend in backends_on(b.device, ["reference", "triton", "cuda"]):
        pos_c, neg_c = data(*b.sizes.score_check)
        fn = lambda be: lambda p, n: F.oucl(p, n, form="circle", backend=be)
        checked = b.check(f"B={len(pos_c)} circle {backend} loss+grads",
                          _loss_and_grads(fn(backend), pos_c, neg_c),
                          _loss_and_grads(fn("reference"), pos_c.double(), neg_c.double()),
                          _loss_and_grads(fn("reference"), pos_c, neg_c))
        pos, neg = (x.requires_grad_() for x in data(rows, kp, kn))
        loss = lambda: F.oucl(pos, neg, form="circle", backend=backend)
        value = loss()
        value.backward()
        status = _status(checked, _finite(value, pos.grad, neg.grad))
        b.sink("score", f"B={rows} K={kp}/{kn} circle {backend} forward", b.timed(loss) * 1e3, "ms", status=status)
        b.sink("score", f"B={rows} K={kp}/{kn} circle {backend} fwd+bwd",
               b.timed(lambda: loss().backward()) * 1e3, "ms", status=status)


def compiled_kernels(b: Bench) -> None:
    """Autotuning choices and the resources of every kernel compiled in this process."""
    import triton

    from metaug_fast.kernels import label, margins, score, similarity

    for module in (score, margins, label, similarity):
        for name, kernel in vars(module).items():
            if isinstance(kernel, triton.runtime.Autotuner):
                for key, config in kernel.cache.items():
                    b.sink("autotune", f"{name} {key}", str(config).replace(",", ";"))
                kernel = kernel.fn
            if not isinstance(kernel, triton.runtime.JITFunction):
                continue
            for cache in getattr(kernel, "device_caches", {}).values():
                for compiled in cache[0].values():
                    spec = f"{name} warps={compiled.metadata.num_warps}"
                    b.sink("resources", spec, f"regs={compiled.n_regs} spills={compiled.n_spills} "
                                              f"shared={compiled.metadata.shared}")


def profile(b: Bench, path: Path) -> None:
    import metaug_fast.functional as F

    n = b.sizes.profile
    emb, labels = _views(b, n, torch.bfloat16)
    emb.requires_grad_()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if not b.dry:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    tables = []
    for what in ("forward+backward", "HVP"):
        with torch.profiler.profile(activities=activities) as prof:
            loss = F.oucl_embeddings(emb, labels, backend="triton")
            if what == "HVP":
                (g,) = torch.autograd.grad(loss, emb, create_graph=True)
                g.sum().backward()
            else:
                loss.backward()
            b.sync()
        sort = "cpu_time_total" if b.dry else "cuda_time_total"
        tables.append(f"== {what}, N = {n}\n" + prof.key_averages().table(sort_by=sort, row_limit=20))
    path.write_text("\n\n".join(tables))
    b.sink("profile", f"N={n} forward+backward and HVP", path.name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summary", type=Path, help="gpu_check's summary.csv, appended to")
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ceilings-only", action="store_true")
    ap.add_argument("--ceilings-from", type=Path, help="a --ceilings-only CSV of the same run, not measured again")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: every row at tiny sizes on CPU tensors, the Triton kernels in the interpreter")
    args = ap.parse_args(argv)
    if args.dry_run:  # before metaug_fast defines any Triton kernel
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA device (or --dry-run)")
    b = Bench(Sink(args.out, args.summary), args.dry_run)
    rates = read_ceilings(args.ceilings_from) if args.ceilings_from else ceilings(b)
    if args.ceilings_only:
        return 0
    t0 = time.monotonic()
    steps = [lambda: label(b, b.sizes.label[0], rates["bf16"]), lambda: hvp(b, b.sizes.hvp[0]), lambda: score(b)]
    if not args.quick:
        steps += [lambda n=n: label(b, n, rates["bf16"]) for n in b.sizes.label[1:]]
        steps += [lambda n=n: hvp(b, n) for n in b.sizes.hvp[1:]]
        steps += [lambda: bank(b), lambda: tile_sweep(b)]
    steps.append(lambda: compiled_kernels(b))
    if args.profile:
        steps.append(lambda: profile(b, args.profile))
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 (one failing measurement must not lose the others)
            b.sink("error", "step", f"{type(exc).__name__}: {exc}"[:200], status="failed")
        if not b.dry:
            torch.cuda.empty_cache()
    b.sink("kernels", "wall time", time.monotonic() - t0, "s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
