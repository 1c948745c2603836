"""Label-mode OUCL and InfoNCE on the CPU: the fused C++ backend against reference.py, pytorch-metric-learning
and open_clip, side by side in one run.

    python -m bench.bench_oucl_label            # the headline sizes (about 3 minutes on 2 cores)
    python -m bench.bench_oucl_label --quick    # small sizes, for a smoke run

Rows written to bench/results/oucl_label_cpu.csv:
- two views of 4096 (N = 8192), D = 128, fp32, forward+backward: reference, torch.compile(reference) and cpp
  (time, peak extra memory), and the GEMM floor: one [N,D]×[D,N] product (``gemm_floor``), so the fused
  path is also given in one-GEMM times; then the two views of 4096 scored against each other (a reference
  set that needs a gradient) with their own GEMM floor;
- InfoNCE on the same inputs: NT-Xent over N = 8192, and CLIP's loss both ways between the two views
  (``symmetric_info_nce``) against open_clip's ``ClipLoss``;
- N = 4096: pytorch-metric-learning CircleLoss vs cpp circle/cosine (the same loss up to the factor β);
- N = 65536: cpp, and reference in a subprocess limited to 20 GiB (recorded as OOM when it cannot);
- N = 2048: the Hessian-vector product against forward+backward on cpp, and its floor: the gradient with
  ``create_graph`` (forward and first backward) plus the second sweep's GEMMs alone (``gemm_floor``), as
  whole-matrix products with the multiply-adds of its symmetric tiles;
- N = 16384: the Hessian-vector product on cpp, whose peak memory stays below one B×M matrix.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch

import metaug_fast.functional as F
from metaug_fast import reference

from .common import median_ms, peak_extra_mb, row, set_command, write_csv

D = 128


def _inputs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, D, generator=gen).requires_grad_()
    labels = torch.arange(n // 2).repeat(2)  # two views of n/2 samples
    return emb, labels


def _measure(fn, repeats: int):
    """(median ms, peak extra MiB) of ``fn``, or ("OOM", "OOM") when it runs out of memory. With
    ``repeats == 1`` (the largest sizes) one unwarmed run gives both numbers."""
    try:
        if repeats == 1:
            t0 = time.perf_counter()
            mem = peak_extra_mb(fn)
            return 1e3 * (time.perf_counter() - t0), mem
        fn()  # warm-up
        mem = peak_extra_mb(fn)
        return median_ms(fn, repeats, warmup=0), mem
    except (RuntimeError, MemoryError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        return "OOM", "OOM"


def _side_by_side(fns, rounds: int):
    """[(median ms, peak extra MiB)] of each of ``fns``: one warm-up and one memory run each, then ``rounds``
    rounds in which each is timed once, in turn."""
    for fn in fns:
        fn()
    mems = [peak_extra_mb(fn) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
    return [(statistics.median(ts), mem) for ts, mem in zip(times, mems)]


def _fwd_bwd(backend: str, emb, labels, **kw):
    def run():
        emb.grad = None
        F.oucl_embeddings(emb, labels, backend=backend, **kw).backward()
    return run


def _hvp_gemms(z, v):
    """The GEMMs of the label HVP's second sweep in self mode (oucl_label_self_bwd_bwd) as whole-matrix
    products with the same multiply-adds: over the tiles on and above the diagonal it takes S = Z·Zᵀ and
    U = [v Z]·[Z v]ᵀ in each of its two rounds (one whole S and U), and H_G·v, H_W·Z and their transposes
    (two [N,N]×[N,D] products). Five GEMM-equivalents, at the rate of whole matrices: a bound from below."""
    vz, zv = torch.cat([v, z], 1), torch.cat([z, v], 1)

    def run():
        S, U = z @ z.T, vz @ zv.T
        (S @ v).addmm_(U, z)
    return run


def _reference_limited(n: int, limit_gib: float, queue) -> None:
    limit = int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    emb, labels = _inputs(n)
    queue.put(_measure(_fwd_bwd("reference", emb, labels), 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/oucl_label_cpu.csv"))
    args = ap.parse_args(argv)
    set_command("bench.bench_oucl_label", argv)
    n_main, n_pml, n_big, n_hvp, n_hvp_big = (512, 256, 2048, 256, 512) if args.quick else (8192, 4096, 65536, 2048,
                                                                                            16384)
    rows, lines = [], []

    def record(op, backend, n, name, result, note=""):
        ms, mem = result
        rows.append(row(op=op, mode="label", backend=backend, dtype="float32", size=f"N={n},D={D}",
                        time_ms=ms if ms == "OOM" else round(ms, 2), peak_mem_mb=mem if mem == "OOM" else round(mem, 1),
                        **{"pass": name}))
        lines.append(f"{op:<22}{backend:<16}{n:>7}  {name:<17}"
                     + (f"{ms:>11.1f} ms {mem:>10.1f} MiB" if ms != "OOM" else f"{'OOM':>14} {'OOM':>14}") + note)
        return result

    # 1. reference vs cpp, weighted (default) form, N = 8192.
    emb, labels = _inputs(n_main)
    ref = record("oucl_weighted", "reference", n_main, "forward+backward",
                 _measure(_fwd_bwd("reference", emb, labels), args.repeats))
    compiled = torch.compile(reference.oucl_embeddings)

    def compiled_run():
        emb.grad = None
        compiled(emb, labels).backward()

    comp = record("oucl_weighted", "compile(reference)", n_main, "forward+backward", _measure(compiled_run,
                                                                                              args.repeats))
    cpp = record("oucl_weighted", "cpp", n_main, "forward+backward", _measure(_fwd_bwd("cpp", emb, labels),
                                                                              args.repeats))
    z = emb.detach()
    floor = record("gemm_floor", "torch.mm", n_main, "one [N,D]x[D,N]", _measure(lambda: torch.mm(z, z.T),
                                                                                 args.repeats))
    ratios = [f"N={n_main}: cpp {ref[0] / cpp[0]:.1f}x faster, {ref[1] / max(cpp[1], 0.1):.0f}x less peak memory "
              "than reference",
              f"N={n_main}: cpp {comp[0] / cpp[0]:.2f}x faster than torch.compile(reference); "
              f"cpp = {cpp[0] / floor[0]:.1f} "
              f"one-GEMM times (reference {ref[0] / floor[0]:.1f}, compile {comp[0] / floor[0]:.1f})"]

    # 1b. Two views scored against each other (a reference set that needs a gradient), N/2 each.
    half = n_main // 2
    view_a, view_b = emb.detach()[:half].clone().requires_grad_(), emb.detach()[half:].clone().requires_grad_()
    view_labels = torch.arange(half)

    def two_views():
        view_a.grad = view_b.grad = None
        F.oucl_embeddings(view_a, view_labels, view_b, view_labels, backend="cpp").backward()

    tv = record("oucl_weighted_two_views", "cpp", half, "forward+backward", _measure(two_views, args.repeats))
    za, zb = view_a.detach(), view_b.detach()
    tv_floor = record("gemm_floor", "torch.mm", half, "one [N,D]x[D,N]", _measure(lambda: torch.mm(za, zb.T),
                                                                                  args.repeats))
    ratios.append(f"two views of {half}: cpp = {tv[0] / tv_floor[0]:.1f} one-GEMM times")

    # 1c. InfoNCE: NT-Xent on the two views (one positive per anchor: its terms by dot products, no second
    # sweep), and CLIP's loss both ways between them (cross mode: one sweep for both directions) against
    # open_clip's ClipLoss, which holds the N/2 × N/2 logits.
    def nt_xent():
        emb.grad = None
        F.info_nce_embeddings(emb, labels, temperature=0.1, backend="cpp").backward()

    nce = record("info_nce", "cpp", n_main, "forward+backward", _measure(nt_xent, args.repeats))
    ratios.append(f"N={n_main}: NT-Xent on cpp = {nce[0] / floor[0]:.1f} one-GEMM times")

    def clip(fn):
        def run():
            view_a.grad = view_b.grad = None
            fn().backward()
        return run

    ours = record("symmetric_info_nce", "cpp", half, "forward+backward", _measure(clip(
        lambda: F.symmetric_info_nce(view_a, view_b, temperature=0.01, similarity="dot", backend="cpp")), args.repeats))
    from open_clip.loss import ClipLoss

    peer = record("symmetric_info_nce", "open_clip.ClipLoss", half, "forward+backward",
                  _measure(clip(lambda: ClipLoss()(view_a, view_b, 100.0)), args.repeats))
    ratios.append(f"CLIP, {half} pairs: cpp = {ours[0] / tv_floor[0]:.1f} one-GEMM times, {peer[0] / ours[0]:.1f}x "
                  f"faster and {peer[1] / max(ours[1], 0.1):.0f}x less peak memory than open_clip's ClipLoss "
                  f"({peer[0] / tv_floor[0]:.1f} one-GEMM times)")

    # 2. pytorch-metric-learning CircleLoss vs cpp circle/cosine, N = 4096.
    from pytorch_metric_learning.losses import CircleLoss

    emb, labels = _inputs(n_pml)
    pml_loss = CircleLoss(m=0.25, gamma=80.0)

    def pml():
        emb.grad = None
        pml_loss(emb, labels).backward()

    p = record("circle_cosine", "pml.CircleLoss", n_pml, "forward+backward", _measure(pml, args.repeats))
    c = record("circle_cosine", "cpp", n_pml, "forward+backward",
               _measure(_fwd_bwd("cpp", emb, labels, form="circle", similarity="cosine", beta=80.0), args.repeats))
    ratios.append(f"N={n_pml}: cpp {p[0] / c[0]:.1f}x faster, {p[1] / max(c[1], 0.1):.0f}x less peak memory than "
                  "PML CircleLoss")

    # 3. N = 65536: cpp completes; reference is tried in a memory-limited subprocess.
    emb, labels = _inputs(n_big)
    big = record("oucl_weighted", "cpp", n_big, "forward+backward", _measure(_fwd_bwd("cpp", emb, labels), 1))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_reference_limited, args=(n_big, 20.0, queue))
    proc.start()
    proc.join()
    ref_big = queue.get() if not queue.empty() else ("OOM", "OOM")
    record("oucl_weighted", "reference", n_big, "forward+backward", ref_big, "  (subprocess limited to 20 GiB)")
    ratios.append(f"N={n_big}: cpp {big[0] / 1e3:.1f} s, {big[1]:.0f} MiB peak; reference: "
                  + ("OOM" if ref_big[0] == "OOM" else f"{ref_big[0] / 1e3:.1f} s"))

    # 4. Hessian-vector product vs forward+backward on cpp, N = 2048.
    emb, labels = _inputs(n_hvp)
    vec = torch.randn_like(emb)

    def grad_with_graph():
        return torch.autograd.grad(F.oucl_embeddings(emb, labels, backend="cpp"), emb, create_graph=True)[0]

    def hvp():
        torch.autograd.grad((grad_with_graph() * vec).sum(), emb)

    # Four runs whose ratios are the point: timed in turn, round after round, so that this machine's drift
    # falls on all of them alike.
    fb, hv, cg, sweep = _side_by_side([_fwd_bwd("cpp", emb, labels), hvp, grad_with_graph,
                                       _hvp_gemms(emb.detach(), vec)], 3 * args.repeats)
    record("oucl_weighted", "cpp", n_hvp, "forward+backward", fb)
    record("oucl_weighted", "cpp", n_hvp, "hvp", hv)
    record("oucl_weighted", "cpp", n_hvp, "grad create_graph", cg)
    record("gemm_floor", "torch.mm", n_hvp, "HVP sweep's GEMMs", sweep)
    ratios.append(f"N={n_hvp}: HVP costs {hv[0] / fb[0]:.1f}x forward+backward on cpp; its floor (the gradient "
                  f"with create_graph plus the second sweep's GEMMs alone) is {(cg[0] + sweep[0]) / fb[0]:.1f}x, "
                  f"the HVP is {hv[0] / (cg[0] + sweep[0]):.2f}x its floor")

    # 5. The HVP at a size where B×M matters: the second derivative runs over tiles, never B×M.
    emb, labels = _inputs(n_hvp_big)
    vec = torch.randn_like(emb)
    big_hv = record("oucl_weighted", "cpp", n_hvp_big, "hvp", _measure(hvp, 1))
    bxm_mb = n_hvp_big**2 * 4 / 2**20
    ratios.append(f"N={n_hvp_big}: HVP on cpp {big_hv[0] / 1e3:.1f} s, {big_hv[1]:.0f} MiB peak "
                  f"({bxm_mb / max(big_hv[1], 0.1):.1f}x less than one fp32 B×M matrix, {bxm_mb:.0f} MiB)")

    write_csv(rows, args.out)
    print(f"label-mode OUCL, D={D}, fp32, {torch.get_num_threads()} threads")
    print(f"{'op':<22}{'backend':<16}{'N':>7}  {'pass':<17}{'time':>14} {'peak extra':>14}")
    print("\n".join(lines))
    print("\n".join(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
