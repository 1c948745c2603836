"""Label-mode OUCL of a batch against a memory bank of 1M × 128 entries on the CPU: the fused C++ op and
reference.py in chunks in one process, and the bank sharded over 2 processes (gloo), side by side.

    python -m bench.bench_bank                  # B = 1024 queries, M = 1,048,576 bank rows, D = 128, fp32
    python -m bench.bench_bank --m 65536        # smaller

Instance discrimination as in MetAug's bank: each query's positive is its own bank row (labels are row
numbers), every other row is a negative. The bank (M × D fp32, 512 MiB at 1M) is allocated before
measuring, so "peak extra" is what scoring adds on top of it: the score matrix B × M alone would be
4 GiB in fp32, which is why the single-process reference is only run chunked. Results go to
bench/results/bank_cpu.csv; the sharded row gives the largest time and peak over ranks (each holds M/2
rows and uses one thread, so both rows use the machine's 2 cores). The ``gemm_floor`` row is one
[B,D]×[D,M] product (it writes the B×M matrix the fused op never holds), measured in the same run, so the
fused op can be read in one-GEMM times.
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


def _queries(b: int, m: int):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(b, D, generator=gen).requires_grad_()
    labels = torch.randperm(m, generator=gen)[:b]
    return emb, labels


def _timed(fn):
    t0 = time.perf_counter()
    mem = peak_extra_mb(fn)
    return 1e3 * (time.perf_counter() - t0), mem


def _single(backend: str, b: int, m: int, chunk: int):
    from metaug_fast.metaug import MemoryBank

    bank = MemoryBank(m, D, views=1, generator=torch.Generator().manual_seed(1))
    emb, labels = _queries(b, m)
    bank_labels = torch.arange(m)

    def run():
        emb.grad = None
        bank.score_all(0, emb, labels, bank_labels, backend=backend, chunk_size=chunk).backward()

    return _timed(run)


def _sharded_worker(rank, world, init_file, b, m, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1200))
    from metaug_fast.distributed import shutdown
    from metaug_fast.metaug import ShardedMemoryBank

    bank = ShardedMemoryBank(m, D, views=1, seed=1)
    emb, labels = _queries(b, m)
    mine = slice(rank * b // world, (rank + 1) * b // world)  # the batch is split over ranks too
    emb = emb.detach()[mine].clone().requires_grad_()
    labels, bank_labels = labels[mine], torch.arange(m)

    def run():
        emb.grad = None
        bank.score_all(0, emb, labels, bank_labels).backward()

    dist.barrier()
    queue.put((rank, *_timed(run)))
    shutdown()


def _gemm_floor(b: int, m: int):
    emb, _ = _queries(b, m)
    bank = torch.randn(m, D)
    z = emb.detach()
    torch.mm(z, bank.T)  # warm-up
    return _timed(lambda: torch.mm(z, bank.T))


def _sharded(b: int, m: int, world: int):
    results = spawn_ranks(_sharded_worker, world, b, m)
    return max(r[1] for r in results), max(r[2] for r in results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=int, default=1024, help="queries (the batch)")
    ap.add_argument("--m", type=int, default=1 << 20, help="bank rows")
    ap.add_argument("--chunk", type=int, default=16384, help="bank rows per chunk of the reference path")
    ap.add_argument("--world", type=int, default=2, help="processes of the sharded run")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/bank_cpu.csv"))
    args = ap.parse_args(argv)
    set_command("bench.bench_bank", argv)
    size = f"B={args.b},M={args.m},D={D}"
    runs = [("cpp", "label,bank", lambda: _single("cpp", args.b, args.m, args.chunk))]
    if not args.skip_reference:
        runs.append(("reference", f"label,bank,chunk={args.chunk}",
                     lambda: _single("reference", args.b, args.m, args.chunk)))
    runs.append(("cpp", f"label,bank,sharded,world={args.world}", lambda: _sharded(args.b, args.m, args.world)))
    runs.append(("torch.mm", "gemm_floor", lambda: _gemm_floor(args.b, args.m)))
    print(f"label-mode OUCL against a bank, {size}, fp32, forward+backward (bank memory not counted)")
    print(f"{'backend':<10} {'mode':<34} {'time s':>8} {'peak extra MiB':>15}")
    rows = []
    for backend, mode, fn in runs:
        ms, mem = fn()
        floor = mode == "gemm_floor"
        rows.append(row(op="gemm_floor" if floor else "oucl_weighted", mode="label,bank" if floor else mode,
                        backend=backend, dtype="float32", size=size, time_ms=round(ms, 3), peak_mem_mb=round(mem, 1),
                        **{"pass": "one [B,D]x[D,M]" if floor else "forward+backward"}))
        print(f"{backend:<10} {mode:<34} {ms / 1e3:>8.2f} {mem:>15.1f}", flush=True)
    print(f"(one B×M fp32 score matrix would be {args.b * args.m * 4 / 2**20:.0f} MiB)")
    print(f"cpp = {rows[0]['time_ms'] / max(rows[-1]['time_ms'], 0.1):.2f} one-GEMM times")
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
