"""The benchmark suite: every op × backend × pass over a sweep of sizes, with the baselines in the same run.

    python -m bench.sweep                                   # the CPU suite (make bench, about 4 minutes)
    python -m bench.sweep --device cuda --dtypes bfloat16 float16 float32 --out OUT/sweep_gpu.csv
    python -m bench.sweep --ops oucl_label --sizes 512 2048 --repeats 5

Ops: score-mode OUCL (weighted), InfoNCE and margin statistics on ``pos [B, 6]``, ``neg [B, 1536]`` (size =
B); label-mode OUCL (circle form on cosine similarity, so that pytorch-metric-learning's CircleLoss computes
the same loss), InfoNCE and margin statistics on two views of N/2 samples, D = 128 (size = N); and
pairwise_similarity of two N×128 sets. Passes: forward, forward+backward, and the Hessian-vector product
(a double backward, as the MetAug meta step needs) where the implementation supports it (margin
statistics are piecewise linear: their Hessian is zero, so no HVP is timed for them).

Backends: ``reference`` (reference.py), the fused backends available on the device (cpp on CPU; triton
and cuda on a GPU), and baselines: ``compile(reference)`` (torch.compile of reference.py, dynamic shapes,
compilation excluded from the time), ``naive_pairs`` (score-mode OUCL with the B×K⁺×K⁻ pair tensor
written out, as the formula reads), ``cross_entropy`` (score-mode InfoNCE as F.cross_entropy over
[B·K⁺, 1 + K⁻] logits), ``pml.CircleLoss`` and ``pml.NTXentLoss`` (pytorch-metric-learning), and on a GPU
``open_clip.ClipLoss`` and ``inf_cl`` when those packages are installed (bench/gpu_check.sh installs them
from a wheel folder; they compute the CLIP loss of N image/text pairs, a different but comparable N×N
contrastive loss, and are timed at the label-mode InfoNCE sizes).

Time: median over ``--repeats`` runs after a warm-up; a run longer than a second is measured once.
Memory: the peak the pass adds above what was allocated before it (CPU: resident high-water mark, Linux
VmHWM; GPU: torch.cuda.max_memory_allocated). Out of memory is recorded as OOM (CPU runs are limited to
``--mem-gib`` of address space, so that an allocation fails instead of the kernel's OOM killer firing), and
larger sizes of that backend are then recorded as OOM without running.
"""
from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

import metaug_fast
import metaug_fast.functional as F
from metaug_fast import reference as R

from .common import backends_on, median_ms, peak_extra_mb, row, set_command, write_csv

KP, KN, D = 6, 1536, 128
BANK_BATCH = 256
BETA_CIRCLE, TAU = 80.0, 0.1


@dataclass
class Op:
    """make(size, dtype, device) -> differentiable input tensors; impls: backend name -> loss function of them."""
    mode: str
    make: Callable
    impls: Dict[str, Callable]
    sizes: Dict[str, Tuple[int, ...]]
    hvp: bool = True


def _scores(size, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return (torch.rand(size, KP, generator=gen, device=device, dtype=torch.float32).to(dtype),
            torch.rand(size, KN, generator=gen, device=device, dtype=torch.float32).to(dtype))


def _embeddings(size, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(size, D, generator=gen, device=device, dtype=torch.float32).to(dtype),)


def _two_sets(size, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(size, D, generator=gen, device=device, dtype=torch.float32).to(dtype) for _ in range(2))


def _views(n, device):
    return torch.arange(n, device=device) % max(n // 2, 1)


def _naive_pairs(p, n, beta=16.0):
    """(1/β)·log(1 + Σ_k Σ_j exp(β(n_j - p_k))) with every pair materialized: [B, K⁺, K⁻]."""
    pairs = beta * (n.float()[:, None, :] - p.float()[:, :, None])
    lse = torch.logsumexp(pairs.flatten(1), 1)
    return (torch.logaddexp(lse, torch.zeros_like(lse)) / beta).mean()


def _cross_entropy(p, n, tau=TAU):
    """InfoNCE as cross-entropy: one row of logits [p_k, n_1..n_K⁻]/τ per positive, target 0."""
    logits = torch.cat([p.float().reshape(-1, 1), n.float().repeat_interleave(p.shape[1], 0)], 1) / tau
    per_pos = torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=p.device),
                                                reduction="none")
    return per_pos.view(p.shape).mean()


def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _pml(kind):
    """pytorch-metric-learning's loss on two views (None when the package is missing)."""
    try:
        from pytorch_metric_learning import losses
    except ImportError:
        return None
    loss = losses.CircleLoss(m=0.25, gamma=BETA_CIRCLE) if kind == "circle" else losses.NTXentLoss(temperature=TAU)
    scale = 1.0 / BETA_CIRCLE if kind == "circle" else 1.0  # OUCL circle = CircleLoss / β
    return lambda e: loss(e.float(), _views(len(e), e.device)) * scale


def _clip_baselines():
    """CLIP losses of N/2 image-text pairs from open_clip and inf-cl, where installed (GPU runs)."""
    out = {}
    try:
        from open_clip.loss import ClipLoss

        clip = ClipLoss()
        out["open_clip.ClipLoss"] = lambda e: clip(*_clip_halves(e), 1.0 / TAU)
    except ImportError:
        pass
    try:
        from inf_cl import cal_inf_loss

        out["inf_cl"] = lambda e: cal_inf_loss(*_clip_halves(e), scale=1.0 / TAU).mean()
    except ImportError:
        pass
    return out


def _clip_halves(e):
    half = len(e) // 2
    z = torch.nn.functional.normalize(e.float(), dim=1)
    return z[:half], z[half:2 * half]


def _ops(device: str) -> Dict[str, Op]:
    gpu = device == "cuda"
    score_sizes = {"cpu": (512, 2048, 8192), "cuda": (4096, 16384, 65536)}
    label_sizes = {"cpu": (512, 2048, 4096), "cuda": (4096, 16384, 65536)}
    label = dict(form="circle", similarity="cosine", beta=BETA_CIRCLE)

    def by_backend(fn):
        return {b: (lambda *xs, b=b: fn(*xs, backend=b)) for b in metaug_fast._backend.REGISTRY}

    ops = {
        "oucl_score": Op("score", _scores, {**by_backend(lambda p, n, backend: F.oucl(p, n, backend=backend)),
                                           "compile(reference)": _compiled(lambda p, n: R.oucl(p, n)),
                                           "naive_pairs": _naive_pairs}, score_sizes),
        "info_nce_score": Op("score", _scores,
                             {**by_backend(lambda p, n, backend: F.info_nce(p, n, temperature=TAU, backend=backend)),
                              "cross_entropy": _cross_entropy}, score_sizes),
        "margins_score": Op("score", _scores,
                            by_backend(lambda p, n, backend: sum(s.clamp(-10, 10).sum() for s in
                                                                 F.margin_statistics(p, n, backend=backend))),
                            score_sizes, hvp=False),
        "oucl_label": Op("label", _embeddings, {
            **by_backend(lambda e, backend: F.oucl_embeddings(e, _views(len(e), e.device), backend=backend, **label)),
            "compile(reference)": _compiled(lambda e: R.oucl_embeddings(e, _views(len(e), e.device), **label)),
            "pml.CircleLoss": _pml("circle")}, label_sizes),
        "info_nce_label": Op("label", _embeddings, {
            **by_backend(lambda e, backend: F.info_nce_embeddings(e, _views(len(e), e.device), temperature=TAU,
                                                                  similarity="cosine", backend=backend)),
            "pml.NTXentLoss": _pml("ntxent"), **(_clip_baselines() if gpu else {})}, label_sizes),
        "margins_label": Op("label", _embeddings, by_backend(
            lambda e, backend: sum(s.clamp(-10, 10).sum() for s in
                                   F.margin_statistics_embeddings(e, _views(len(e), e.device), backend=backend))),
            label_sizes, hvp=False),
        "pairwise_similarity": Op("label", _two_sets, by_backend(
            lambda a, b, backend: F.pairwise_similarity(a, b, backend=backend).float().mean()), label_sizes),
    }
    for op in ops.values():
        op.impls = {k: v for k, v in op.impls.items() if v is not None}
    return ops


def _official_outputs(p, n):
    """The official criterion's six inputs [B, 1 + K, 1] (positive first) from pos [B, 6], neg [B, 6K]."""
    k = n.shape[1] // 6
    return [torch.cat([p[:, j:j + 1], n[:, j * k:(j + 1) * k]], 1)[..., None] for j in range(6)]


def _official_as_written(*outs, gamma=16.0):
    """The official MetAug criterion (NCE/NCECriterion.py, CircleLoss.forward, γ = 16, δ and Γ off) as its
    code computes it: (s + 1)/2, the six positives and negatives concatenated, torch's softplus of the two
    log-sum-exps, the mean over rows, then /γ·16."""
    scores = [(o.squeeze(2) + 1) / 2 for o in outs]
    p, n = torch.cat([s[:, :1] for s in scores], 1), torch.cat([s[:, 1:] for s in scores], 1)
    rows = torch.nn.functional.softplus(torch.logsumexp(gamma * n, 1) + torch.logsumexp(-gamma * p, 1))
    return rows.sum() / p.shape[0] / gamma * 16


def _drop_ins(device: str) -> Dict[str, Op]:
    """Each class of metaug_fast.losses against the library it replaces, same configuration, same inputs
    (the peers that are not installed are left out)."""
    from metaug_fast.losses import lightly as our_lightly
    from metaug_fast.losses import official as our_official
    from metaug_fast.losses import open_clip as our_open_clip
    from metaug_fast.losses import pml as our_pml

    sizes = {"cpu": (512, 2048, 4096), "cuda": (4096, 16384, 65536)}
    ops = {}

    def pair(name, make, peer, ours, op_sizes=sizes):
        if peer is not None:
            ops[name] = Op("drop-in", make, {"peer": peer, "metaug_fast": ours}, op_sizes, hvp=False)

    def labelled(loss):
        return lambda e: loss(e, _views(len(e), e.device))

    try:
        from pytorch_metric_learning import losses as pml

        pair("pml.CircleLoss", _embeddings, labelled(pml.CircleLoss(m=0.25, gamma=BETA_CIRCLE)),
             labelled(our_pml.CircleLoss(m=0.25, gamma=BETA_CIRCLE)))
        pair("pml.NTXentLoss", _embeddings, labelled(pml.NTXentLoss(TAU)), labelled(our_pml.NTXentLoss(TAU)))
    except ImportError:
        pass
    try:
        from open_clip.loss import ClipLoss

        def clip(loss):
            return lambda a, b: loss(torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1),
                                     1.0 / TAU)
        pair("open_clip.ClipLoss", _two_sets, clip(ClipLoss()), clip(our_open_clip.ClipLoss()))
    except ImportError:
        pass
    try:
        import lightly.loss as peer_lightly

        pair("lightly.NTXentLoss", _two_sets, peer_lightly.NTXentLoss(0.5), our_lightly.NTXentLoss(0.5))

        def banked(module):
            """MoCo-style: a batch of BANK_BATCH rows against a bank of ``size`` rows (one module per size)."""
            cache = {}

            def loss(a, b, bank):
                key = (bank.shape[0], a.dtype, a.device)
                if key not in cache:
                    torch.manual_seed(0)
                    cache[key] = module.NTXentLoss(0.1, memory_bank_size=(bank.shape[0], D)).to(a.device, a.dtype)
                return cache[key](a, b)
            return loss

        def bank_inputs(size, dtype, device):
            # The third tensor only carries the bank's size (the modules hold their banks).
            return (*_two_sets(BANK_BATCH, dtype, device), torch.empty(size, 0, device=device, dtype=dtype))
        pair("lightly.NTXentLoss_bank", bank_inputs, banked(peer_lightly), banked(our_lightly),
             {"cpu": (4096, 16384, 65536), "cuda": (65536, 262144, 1048576)})
    except ImportError:
        pass
    pair("official.CircleLoss", _scores, lambda p, n: _official_as_written(*_official_outputs(p, n)),
         lambda p, n, loss=our_official.CircleLoss(): loss(*_official_outputs(p, n)), {"cpu": (512, 2048, 8192),
                                                                                     "cuda": (4096, 16384, 65536)})
    return ops


SUITES = {"kernels": _ops, "drop_ins": _drop_ins}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "memory" in str(exc).lower()


def _passes(fn: Callable, inputs: Tuple[torch.Tensor, ...], hvp: bool) -> Dict[str, Callable]:
    vecs = [torch.randn_like(x) for x in inputs]

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        for x in inputs:
            x.grad = None
        fn(*inputs).backward()

    def hessian_vector():
        grads = torch.autograd.grad(fn(*inputs), inputs, create_graph=True)
        torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vecs)), inputs, allow_unused=True)

    passes = {"forward": forward, "forward+backward": forward_backward}
    if hvp:
        passes["hvp"] = hessian_vector
    return passes


def _measure(fn: Callable, device: str, repeats: int, inputs: Tuple[torch.Tensor, ...]) -> Tuple[float, float]:
    """(median ms, peak extra MiB) of ``fn``; a warm-up run first (compilation, autotuning, allocator). The
    inputs' gradients are dropped before the memory run, so that the gradients a pass creates count."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    slow = time.perf_counter() - t0 > 1.0
    for x in inputs:
        x.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        sync()
        once = 1e3 * (time.perf_counter() - t0)
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        mem, once = peak_extra_mb(fn, timed=True)
    ms = once if slow else median_ms(lambda: (fn(), sync()), repeats, warmup=0)
    return ms, mem


def run(ops: Dict[str, Op], device: str, dtypes: List[str], repeats: int, sizes: Optional[List[int]] = None,
        backends: Optional[List[str]] = None) -> List[dict]:
    rows = []
    for op_name, op in ops.items():
        runnable = set(backends_on(device, list(op.impls)))
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            impls = {b: f for b, f in op.impls.items()
                     if (b in runnable or b not in metaug_fast._backend.REGISTRY)
                     and (backends is None or b in backends)}
            out_of_memory = set()
            print(f"\n{op_name} ({op.mode} mode), {dtype_name}, {device}")
            print(f"{'size':>7} {'backend':<20} {'pass':<17} {'ms':>10} {'peak MiB':>10}")
            for size in sizes or op.sizes[device]:
                for backend, fn in impls.items():
                    try:
                        inputs = tuple(x.requires_grad_() for x in op.make(size, dtype, device))
                    except (RuntimeError, MemoryError) as exc:  # the inputs alone do not fit
                        if not _is_oom(exc):
                            raise
                        inputs = ()
                        out_of_memory.update((backend, p) for p in ("forward", "forward+backward", "hvp"))
                    for pass_name, pass_fn in _passes(fn, inputs, op.hvp).items():
                        if backend == "compile(reference)" and pass_name == "hvp":
                            continue  # torch.compile does not support double backward
                        if (backend, pass_name) in out_of_memory:
                            ms = mem = "OOM"
                        else:
                            try:
                                ms, mem = _measure(pass_fn, device, repeats, inputs)
                            except (RuntimeError, MemoryError) as exc:
                                if not _is_oom(exc):
                                    raise
                                out_of_memory.add((backend, pass_name))
                                ms = mem = "OOM"
                                if device == "cuda":
                                    torch.cuda.empty_cache()
                        rows.append(row(op=op_name, mode=op.mode, backend=backend, dtype=dtype_name, size=size,
                                        time_ms=ms if ms == "OOM" else round(ms, 3),
                                        peak_mem_mb=mem if mem == "OOM" else round(mem, 1), **{"pass": pass_name}))
                        shown = "OOM" if ms == "OOM" else f"{ms:10.2f} {mem:10.1f}"
                        print(f"{size:>7} {backend:<20} {pass_name:<17} {shown}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--suite", default="kernels", choices=tuple(SUITES),
                    help="kernels: every op x backend (default); drop_ins: each metaug_fast.losses class against "
                         "its peer")
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: float32 (CPU), bfloat16 float16 float32 (GPU)")
    ap.add_argument("--ops", nargs="+", default=None, help="default: all")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="default: each op's sweep for the device")
    ap.add_argument("--backends", nargs="+", default=None, help="default: all that apply")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mem-gib", type=float, default=20.0,
                    help="CPU address-space limit (OOM instead of the OOM killer)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/sweep_<cpu|gpu>.csv")
    args = ap.parse_args(argv)
    set_command("bench.sweep", argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    ops = SUITES[args.suite](args.device)
    unknown = set(args.ops or []) - set(ops)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {sorted(ops)}")
    if args.ops:
        ops = {k: v for k, v in ops.items() if k in args.ops}
    dtypes = args.dtypes or (["float32"] if args.device == "cpu" else ["bfloat16", "float16", "float32"])
    stem = "sweep" if args.suite == "kernels" else args.suite
    out = args.out or Path(f"bench/results/{stem}_{'gpu' if args.device == 'cuda' else 'cpu'}.csv")
    saved = resource.getrlimit(resource.RLIMIT_AS)
    if args.device == "cpu":
        resource.setrlimit(resource.RLIMIT_AS, (int(args.mem_gib * 2**30), saved[1]))
    try:
        rows = run(ops, args.device, dtypes, args.repeats, args.sizes, args.backends)
    finally:  # the limit is for the sweep only, not for whoever called main() in this process
        resource.setrlimit(resource.RLIMIT_AS, saved)
    write_csv(rows, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
