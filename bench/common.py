"""Timing, peak-memory and CSV helpers shared by the benchmark scripts."""
from __future__ import annotations

import csv
import ctypes
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

FIELDS = ["op", "mode", "backend", "dtype", "size", "pass", "time_ms", "peak_mem_mb", "device", "torch", "triton",
          "threads", "commit", "command"]
_COMMAND = [""]


# CSVs in bench/results that are not benchmark tables, with what draws them instead.
OTHER_CSVS = {"train_digits_compare.csv": "metaug_fast.cli.compare",
              "train_digits_compare_differences.csv": "metaug_fast.cli.compare", "gpu_static.csv": "tools.gpu_static",
              "perf_model.csv": "bench.perf_model",
              "train_digits_ablation_augment.csv": "metaug_fast.cli.compare --ablation augment",
              "train_digits_ablation_augment_differences.csv": "metaug_fast.cli.compare --ablation augment",
              "train_digits_ablation_batch-size.csv": "metaug_fast.cli.compare --ablation batch-size",
              "train_digits_ablation_batch-size_differences.csv": "metaug_fast.cli.compare --ablation batch-size"}


def benchmark_csvs(results: Path) -> List[Path]:
    """The benchmark tables (schema FIELDS) in ``results``, sorted by name."""
    return sorted(p for p in results.glob("*.csv") if p.name not in OTHER_CSVS)


def backends_on(device: str, names: List[str]) -> List[str]:
    """Those of ``names``, in their order, that this process can run on tensors of ``device``, as the backend
    registry says (each backend's availability and device rule; metaug_fast is imported here, not at the
    top: the GPU check's dry run sets TRITON_INTERPRET first)."""
    from metaug_fast import _backend

    where = torch.device(device)
    return [name for name in names if name in _backend.REGISTRY and _backend.REGISTRY[name].available()
            and _backend.REGISTRY[name].runs_on(where)]


def set_command(module: str, argv) -> None:
    """Records the command line that produced the rows (written in every row, for traceability)."""
    _COMMAND[0] = " ".join(["python -m", module] + list(argv if argv is not None else sys.argv[1:]))


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def median_ms(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(fn: Callable[[], None], timed: bool = False):
    """Peak resident memory above the level before ``fn`` ran, in MiB (Linux: VmHWM after a reset); with
    ``timed``, (MiB, milliseconds ``fn`` took), the clean-up before it not counted.

    Large tensors are mmap'd by the allocator and returned on free, so the high-water mark sees every
    buffer that was alive at the same time, including autograd's saved tensors and temporaries.
    """
    gc.collect()
    # What is alive at the first call (torch's modules, mostly) is moved out of the collector's sight once:
    # a full collection over it costs about 0.3 s, and later calls then scan only newer objects.
    if not gc.get_freeze_count():
        gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    fn()
    ms = 1e3 * (time.perf_counter() - t0)
    mb = (_status_kb("VmHWM") - base) / 1024.0
    return (mb, ms) if timed else mb


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def row(**values) -> Dict[str, object]:
    base = dict(device=device_name(), torch=torch.__version__, triton=triton_version(), threads=torch.get_num_threads(),
                commit=git_commit(), command=_COMMAND[0] or " ".join(sys.argv))
    base.update(values)
    return {k: base.get(k, "") for k in FIELDS}


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    """Writes ``rows`` (schema :data:`FIELDS`) to ``path`` and says so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows)", flush=True)


def spawn_ranks(worker: Callable, world: int, *args) -> List[tuple]:
    """Runs ``worker(rank, world, init_file, *args, queue)`` in ``world`` spawned processes (a gloo group
    initialized from ``init_file``) and returns what each put on ``queue``, one item per rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(worker, args=(world, os.path.join(d, "init"), *args, queue), nprocs=world, join=True,
                           start_method="spawn")
    return [queue.get() for _ in range(world)]
