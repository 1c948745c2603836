"""Peak memory per rank of distributed OUCL, all_gather against ring, for 1, 2 and 4 processes (gloo, CPU).

    python -m bench.bench_distributed            # global N = 16384, D = 128, fp32
    python -m bench.bench_distributed --n 2048   # smaller

The global batch is fixed and split evenly, so ranks hold N/W rows. Each rank reports the peak resident
memory its forward+backward adds (Linux VmHWM), the largest over ranks is written to
bench/results/distributed_cpu.csv. On this 2-core machine 4 processes share 2 cores: times there measure
oversubscription, memory does not.
"""
from __future__ import annotations

import argparse
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .common import peak_extra_mb, row, set_command, spawn_ranks, write_csv

D = 128


def _worker(rank, world, init_file, n, mode, queue):
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    from metaug_fast.distributed import oucl_embeddings_all_gather, oucl_embeddings_ring, shutdown

    fn = oucl_embeddings_ring if mode == "ring" else oucl_embeddings_all_gather
    b = n // world
    gen = torch.Generator().manual_seed(rank)
    emb = torch.randn(b, D, generator=gen).requires_grad_()
    labels = torch.arange(rank * b, (rank + 1) * b) % (n // 2)  # two views of n/2 samples across ranks

    def run():
        emb.grad = None
        fn(emb, labels).backward()

    run()  # warm-up
    t0 = time.perf_counter()
    mem = peak_extra_mb(run)
    queue.put((rank, mem, 1e3 * (time.perf_counter() - t0)))
    shutdown()


def measure(n: int, world: int, mode: str):
    results = spawn_ranks(_worker, world, n, mode)
    return max(r[1] for r in results), max(r[2] for r in results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", type=Path, default=Path("bench/results/distributed_cpu.csv"))
    args = ap.parse_args(argv)
    set_command("bench.bench_distributed", argv)
    rows = []
    print(f"distributed label-mode OUCL, global N={args.n}, D={D}, fp32, forward+backward, peak extra MiB per rank")
    print(f"{'world':>5} {'mode':>11} {'rows/rank':>10} {'peak MiB':>10} {'time ms':>10}")
    for world in args.worlds:
        for mode in ("all_gather", "ring"):
            mem, ms = measure(args.n, world, mode)
            rows.append(row(op="oucl_weighted", mode=f"label,{mode},world={world}", backend="cpp", dtype="float32",
                            size=f"N={args.n},D={D}", time_ms=round(ms, 1), peak_mem_mb=round(mem, 1),
                            **{"pass": "forward+backward"}))
            print(f"{world:>5} {mode:>11} {args.n // world:>10} {mem:>10.1f} {ms:>10.1f}")
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
