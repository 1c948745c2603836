"""Peak memory per rank of distributed OUCL, all_gather against ring, for 1, 2 and 4 processes (gloo, CPU), and
how much of a slow link the overlapped ring hides.

    python -m bench.bench_distributed            # global N = 16384, D = 128, fp32
    python -m bench.bench_distributed --n 2048   # smaller

The global batch is fixed and split evenly, so ranks hold N/W rows. Each rank reports the peak resident
memory its forward+backward adds (Linux VmHWM) and its fastest of three timed runs (after a barrier); the
largest over ranks is written to bench/results/distributed_cpu.csv. On this 2-core machine 4 processes share
2 cores: times there measure oversubscription, memory does not.

The overlap study times the ring's forward+backward on ``--overlap-worlds`` processes blocking and
overlapped, with no added delay and with each hop made to take at least ``delay`` (a hop completes no
sooner than ``delay`` after it was posted: a stand-in for a slower interconnect whose transfer runs in the
background). The delay is the measured compute per chunk (the blocking ring's time over its 2·W scoring
steps) unless ``--delay-ms`` gives it. It reports each mode's time with the delay over its time without,
and the fraction of the added transfer time the overlap hides.
"""
from __future__ import annotations

import argparse
import functools
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .common import peak_extra_mb, row, set_command, spawn_ranks, write_csv

D = 128


def _slow_hops(delay_s: float) -> None:
    """Makes every ring hop of this process complete no sooner than ``delay_s`` after it was posted."""
    from metaug_fast.distributed import ring

    post, wait = ring._Hop.__init__, ring._Hop.wait

    def posted(self, *args, **kwargs):
        self.due = time.perf_counter() + delay_s
        post(self, *args, **kwargs)

    def waited(self):
        time.sleep(max(0.0, self.due - time.perf_counter()))
        return wait(self)

    ring._Hop.__init__, ring._Hop.wait = posted, waited


def _worker(rank, world, init_file, n, mode, delay_s, queue):
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    from metaug_fast.distributed import oucl_embeddings_all_gather, oucl_embeddings_ring, shutdown

    if delay_s:
        _slow_hops(delay_s)
    if mode.startswith("ring"):
        fn = functools.partial(oucl_embeddings_ring, overlap=mode == "ring")
    else:
        fn = oucl_embeddings_all_gather
    b = n // world
    gen = torch.Generator().manual_seed(rank)
    emb = torch.randn(b, D, generator=gen).requires_grad_()
    labels = torch.arange(rank * b, (rank + 1) * b) % (n // 2)  # two views of n/2 samples across ranks

    def run():
        emb.grad = None
        fn(emb, labels).backward()

    run()  # warm-up
    mem = peak_extra_mb(run)
    times = []
    for _ in range(3):  # timed apart from the memory measurement, whose collections take 0.1-0.2 s
        dist.barrier()
        t0 = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - t0))
    queue.put((rank, mem, min(times)))
    shutdown()


def measure(n: int, world: int, mode: str, delay_s: float = 0.0):
    """(peak extra MiB, milliseconds) of the slowest rank; ``mode``: all_gather, ring (overlapped) or
    ring_blocking."""
    results = spawn_ranks(_worker, world, n, mode, delay_s)
    return max(r[1] for r in results), max(r[2] for r in results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4], help="processes of the memory table")
    ap.add_argument("--overlap-worlds", type=int, nargs="*", default=[2],
                    help="processes of the overlap study (none: skip it)")
    ap.add_argument("--delay-ms", type=float, default=None,
                    help="the overlap study's per-hop delay (default: the measured compute per chunk)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/distributed_cpu.csv"))
    args = ap.parse_args(argv)
    set_command("bench.bench_distributed", argv)
    rows = []
    print(f"distributed label-mode OUCL, global N={args.n}, D={D}, fp32, forward+backward, peak extra MiB per rank")
    print(f"{'world':>5} {'mode':>11} {'rows/rank':>10} {'peak MiB':>10} {'time ms':>10}")
    for world in args.worlds:
        for mode in ("all_gather", "ring"):
            mem, ms = measure(args.n, world, mode)
            rows.append(_row(args.n, f"label,{mode},world={world}", mem, ms))
            print(f"{world:>5} {mode:>11} {args.n // world:>10} {mem:>10.1f} {ms:>10.1f}")
    for world in args.overlap_worlds:
        rows += overlap_study(args.n, world, args.delay_ms)
    write_csv(rows, args.out)
    return 0


def _row(n, mode, mem, ms):
    return row(op="oucl_weighted", mode=mode, backend="cpp", dtype="float32", size=f"N={n},D={D}",
               time_ms=round(ms, 1), peak_mem_mb=round(mem, 1), **{"pass": "forward+backward"})


def overlap_study(n: int, world: int, delay_ms=None) -> list:
    """The ring blocking and overlapped on ``world`` processes, without and with a per-hop delay."""
    times = {}
    for mode in ("ring_blocking", "ring"):
        times[mode, 0.0] = measure(n, world, mode)
    if delay_ms is None:
        delay_ms = times["ring_blocking", 0.0][1] / (2 * world)
    for mode in ("ring_blocking", "ring"):
        times[mode, delay_ms] = measure(n, world, mode, delay_ms / 1e3)
    print(f"\nring on {world} processes, N={n}: each hop delayed to {delay_ms:.0f} ms (the compute per chunk "
          f"unless --delay-ms), forward+backward ms")
    print(f"{'mode':>13} {'no delay':>10} {'delayed':>10} {'ratio':>7}")
    rows = []
    for mode in ("ring_blocking", "ring"):
        base, slow = times[mode, 0.0][1], times[mode, delay_ms][1]
        print(f"{mode:>13} {base:>10.1f} {slow:>10.1f} {slow / base:>6.2f}x")
        for delay in (0.0, delay_ms):
            mem, ms = times[mode, delay]
            rows.append(_row(n, f"label,{mode},world={world},hop_delay_ms={delay:.0f}", mem, ms))
    added = times["ring_blocking", delay_ms][1] - times["ring_blocking", 0.0][1]
    hidden = 1 - (times["ring", delay_ms][1] - times["ring", 0.0][1]) / added if added > 0 else float("nan")
    print(f"transfer time the overlap hides: {100 * hidden:.0f} %")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
