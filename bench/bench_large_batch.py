"""Large batches with and without gradient caching (metaug_fast.large_batch), side by side in one run.

    python -m bench.bench_large_batch                 # about 10 minutes on a 2-core CPU
    python -m bench.bench_large_batch --models small_cnn --sizes 256 4096

One SimCLR training step (two views, label-mode InfoNCE on the fused backend, backward into the encoder) of
two encoders on generated inputs, so that no data set limits the batch: the digits CNN (8×8 grayscale) and
torchvision's ResNet-18 (32×32 RGB, the small-input stem). ``plain`` runs the encoder on the whole batch
with its graph; ``cached(C)`` is :func:`metaug_fast.large_batch.cached_backward` with chunks of C samples;
``loss only`` is the loss's forward and backward on given embeddings, the O(B·D) floor under both (the
embeddings, their gradients and the fused loss's own O(B·D) buffers).
Per step: time (once per size, after a warm-up run of each code path) and the peak resident memory the step adds
(VmHWM; a process address-space limit of ``--mem-gib`` turns what does not fit into an OOM row). Rows go to
bench/results/large_batch_cpu.csv; ``python -m bench.plot`` draws time and memory against the batch size.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

import metaug_fast.functional as F
from metaug_fast import large_batch
from metaug_fast.metaug.models import MultiViewModel

from .common import peak_extra_mb, row, set_command, write_csv

MODELS = {"small_cnn": dict(channels=1, image=8, sizes=(256, 512, 1024, 4096, 16384)),
          "resnet18": dict(channels=3, image=32, sizes=(128, 256, 512, 1024))}


def _loss(z1, z2):
    return F.info_nce_embeddings(torch.cat([z1, z2]), torch.arange(len(z1), device=z1.device).repeat(2),
                                 temperature=0.1)


def _step(model, views, chunk):
    model.zero_grad(set_to_none=True)
    if chunk is None:
        _loss(*model(*views)).backward()
    else:
        large_batch.cached_backward(model, views, _loss, chunk_size=chunk)


def _loss_only(B, device="cpu"):
    """The loss's own forward and backward on given [B, 128] embeddings of both views: the O(B·D) floor."""
    gen = torch.Generator().manual_seed(B)
    z1, z2 = (torch.randn(B, 128, generator=gen).requires_grad_() for _ in range(2))
    return lambda: torch.autograd.grad(_loss(z1, z2), (z1, z2))


def run(models, sizes, chunk, mem_gib):
    rows = []
    for name in models:
        spec = MODELS[name]
        torch.manual_seed(0)
        model = MultiViewModel(name, (spec["channels"],) * 2, 128, image_size=spec["image"]).train()
        out_of_memory, warmed = set(), set()
        print(f"\n{name}: SimCLR step, fp32")
        print(f"{'batch':>7} {'mode':<12} {'seconds':>9} {'peak MiB':>10}")
        for B in sizes or spec["sizes"]:
            gen = torch.Generator().manual_seed(B)
            shape = (B, spec["channels"], spec["image"], spec["image"])
            views = (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
            for mode, c in (("plain", None), (f"cached({chunk})", chunk), ("loss only", None)):
                fn = _loss_only(B) if mode == "loss only" else lambda: _step(model, views, c)
                if mode in out_of_memory:
                    ms = mem = "OOM"
                else:
                    try:
                        path = (mode, c is not None and B > c)  # one chunk takes the plain path
                        if path not in warmed:
                            fn()  # warm-up of each code path: allocator, thread pools, first-call costs
                            warmed.add(path)
                        mem, ms = peak_extra_mb(fn, timed=True)
                        ms, mem = round(ms, 1), round(mem, 1)
                    except (RuntimeError, MemoryError) as exc:
                        if not isinstance(exc, MemoryError) and "memory" not in str(exc).lower():
                            raise
                        out_of_memory.add(mode)
                        ms = mem = "OOM"
                rows.append(row(op=name, mode="simclr step", backend=mode, dtype="float32", size=B, time_ms=ms,
                                peak_mem_mb=mem, **{"pass": "forward+backward"}))
                shown = "OOM" if ms == "OOM" else f"{ms / 1e3:9.2f} {mem:10.1f}"
                print(f"{B:>7} {mode:<12} {shown}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="default: each model's sweep")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--mem-gib", type=float, default=16.0, help="address-space limit (OOM instead of the OOM killer)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/large_batch_cpu.csv"))
    args = ap.parse_args(argv)
    set_command("bench.bench_large_batch", argv)
    saved = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (int(args.mem_gib * 2**30), saved[1]))
    t0 = time.perf_counter()
    try:
        rows = run(args.models, args.sizes, args.chunk_size, args.mem_gib)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, saved)
    write_csv(rows, args.out)
    print(f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
