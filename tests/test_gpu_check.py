"""The GPU check's orchestration, dry-run on this CPU (bench/gpu_check.py): its arguments, the budget that
fits the GPU machine's limits, the outputs it leaves (at most 8 files, none deeper than the output folder's
first level), the summary's format and length. What it measures needs a GPU."""
import csv
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("quick", [False, True])
def test_dry_run_leaves_four_files_and_a_short_summary(tmp_path, quick):
    (tmp_path / "summary.txt").write_text("an old run\n")  # replaced, not appended to
    run = _run(tmp_path, "--dry-run", *(["--quick"] if quick else []))
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(gpu_check.OUTPUTS) and len(files) <= 8
    assert all(p.is_file() for p in tmp_path.iterdir())
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert 1 < len(summary) <= gpu_check.MAX_SUMMARY_LINES
    assert summary[0].startswith(f"GPU check ({'quick' if quick else 'full'}, dry run)")
    assert run.stdout.rstrip().endswith(summary[-1])  # printed last
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == gpu_check.FIELDS
    assert {"python", "torch", "triton", "gpu"} <= {r["name"] for r in rows}
    assert [r["status"] for r in rows if r["name"] == "gpu"] == ["skipped: no GPU"]
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        assert all(name == "results" or name.startswith("results/") for name in tar.getnames())
    assert "no GPU" in (tmp_path / "log.txt").read_text()


def test_budget_fits_the_machine():
    # 15 minutes of device time in all, 10 a command: the full check must leave room for --quick after it.
    assert gpu_check.BUDGET_S["full"] <= 540 and gpu_check.BUDGET_S["quick"] <= 180
    assert gpu_check.BUDGET_S["full"] + gpu_check.BUDGET_S["quick"] <= 15 * 60 - 120


def test_without_a_gpu_and_without_dry_run_it_says_so(tmp_path):
    run = _run(tmp_path)
    assert run.returncode == 1 and "no CUDA device" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(gpu_check.OUTPUTS)


def test_long_summaries_keep_every_problem_within_100_lines(tmp_path):
    c = gpu_check.Check(tmp_path, "full", dry_run=True)
    for i in range(300):
        c.record("kernels", f"measure {i}", i, "ms", status="failed" if i % 50 == 7 else "ok")
    lines = gpu_check.finish(c)
    assert len(lines) <= gpu_check.MAX_SUMMARY_LINES
    assert sum("[failed]" in line for line in lines) == 6 and lines[-1] == "6 not ok"
    assert any("more rows in summary.csv" in line for line in lines)


def test_kernel_timings_need_a_gpu():
    run = subprocess.run([sys.executable, "-m", "bench.gpu_kernels", "--out", "x.csv"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "needs a CUDA device" in run.stderr


def test_wrapper_passes_its_arguments(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--dry-run", "--quick"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "GPU check (quick, dry run)" in run.stdout


def test_kernel_timings_reuse_the_ceilings_of_the_run(tmp_path):
    # The check measures the GEMM ceilings once; the kernel step reads them back instead of measuring again.
    from bench.gpu_kernels import Sink, read_ceilings

    sink = Sink(tmp_path / "ceilings.csv")
    sink("ceilings", "GEMM bf16 8192^3", 812.5, "TFLOP/s")
    sink("ceilings", "HBM copy 2 GiB", 4100.0, "GB/s")
    assert read_ceilings(tmp_path / "ceilings.csv") == {"bf16": 812.5}
