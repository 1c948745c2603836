"""The GPU check (bench/gpu_check.py), tested end to end without a GPU: its dry run executes every step's
real command in the step's real environment, in a fresh copy of the tree whose extensions are not built,
with pytest collecting only and the timing step running every row at tiny sizes on this CPU. Also: its time
plan fits the GPU machine's limits by construction, its pytest runs end by themselves at their deadline
with a junit file, its build is killed with its children, and its outputs survive an error."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from filelock import FileLock

from bench import gpu_check
from tools import check_install

ROOT = Path(__file__).resolve().parents[1]
TEST_STEPS = {"full": ("triton_smoke", "cuda", "triton_ops", "triton"), "quick": ("triton_smoke",)}
TIMING_GROUPS = {"ceilings", "label", "check", "score", "bank", "tiles", "profile", "kernels"}


def _run(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _rows(out: Path):
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=["full", "quick"])
def dry_run(request, tmp_path_factory):
    """A dry run (about a minute) in a copy of the tree as a clean clone has it: no compiled extension,
    nothing installed from it. Once per test session: the first pytest-xdist worker that needs it runs it
    in the directory the workers share, the other reads its results."""
    mode = request.param
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"gpu_check_dry_{mode}"
    with FileLock(f"{shared}.lock"):
        if not (shared / "run.json").exists():
            src = check_install.copy_source(shared / "src")
            assert not list((src / "metaug_fast").glob("*.so"))
            out = shared / "out"
            out.mkdir()
            (out / "summary.txt").write_text("an old run\n")  # replaced, not appended to
            run = _run(out, "--dry-run", *(["--quick"] if mode == "quick" else []), cwd=src)
            (shared / "run.json").write_text(json.dumps(dict(returncode=run.returncode, stdout=run.stdout,
                                                            stderr=run.stderr)))
    run = json.loads((shared / "run.json").read_text())
    return mode, shared / "src", shared / "out", subprocess.CompletedProcess([], **run)


def test_dry_run_leaves_four_files_and_a_short_summary(dry_run):
    mode, _, out, run = dry_run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUTPUTS) and all(p.is_file() for p in out.iterdir())
    summary = (out / "summary.txt").read_text().splitlines()
    assert 1 < len(summary) <= gpu_check.MAX_SUMMARY_LINES
    assert summary[0].startswith(f"GPU check ({mode}, dry run)")
    assert run.stdout.rstrip().endswith(summary[-1])  # printed last
    rows = _rows(out)
    assert tuple(rows[0]) == gpu_check.FIELDS
    assert {"python", "torch", "triton", "setuptools", "pip", "wheel", "gpu"} <= {r["name"] for r in rows}
    assert [r["status"] for r in rows if r["name"] == "gpu"] == ["skipped: no GPU"]
    with tarfile.open(out / "results.tar.gz") as tar:
        assert all(name == "results" or name.startswith("results/") for name in tar.getnames())


def test_dry_run_runs_every_step_from_the_fresh_tree(dry_run):
    mode, src, out, run = dry_run
    rows = _rows(out)
    problems = [r for r in rows if r["status"] not in ("ok", "skipped: no GPU", "skipped: dry run", "skipped: --quick")]
    assert not problems, problems
    where = {r["name"]: r["value"] for r in rows if r["step"] == "build"}
    assert where["package (no extensions)"] == "0"
    assert where["metaug_fast.kernels imported from"].startswith(str(src))
    # Not even through the editable install of the tree the suite runs from (metaug_fast._extension.load).
    assert where["C++ extension"].startswith("unavailable"), where["C++ extension"]
    assert not list((src / "metaug_fast").glob("*.so")), "the dry run must build nothing"
    collected = {r["name"]: r["value"] for r in rows if r["step"] == "tests"}
    assert set(collected) == set(TEST_STEPS[mode])
    counts = {name: int(re.match(r"(\d+) collected", value).group(1)) for name, value in collected.items()}
    assert counts["triton_smoke"] == len(gpu_check.SMOKE)
    if mode == "full":
        assert counts["triton"] > 100 and counts["cuda"] > 0 and counts["triton_ops"] > 0
    groups = {r["step"] for r in rows}
    assert TIMING_GROUPS - ({"tiles", "bank"} if mode == "quick" else set()) <= groups


def test_every_timing_row_follows_a_passed_check(dry_run):
    _, _, out, _ = dry_run
    rows = _rows(out)
    checks = [r for r in rows if r["step"] == "check"]
    assert checks and all(r["status"] == "ok" for r in checks)
    for i, r in enumerate(rows):
        if r["step"] in ("label", "score", "bank", "tiles") and "GEMM only" not in r["name"]:  # not a control
            assert any(c["step"] == "check" for c in rows[:i]), r
    rate = [r for r in rows if "(6N²D)" in r["name"]]
    assert rate, "the label rate counts the self-mode work, 6·N²·D"


def test_the_plan_fits_the_gpu_machine_by_construction():
    # 15 minutes of device time in all, 10 a command: the full check must leave room for --quick after it,
    # and every planned step gets its whole limit even when each step before it uses all of its own.
    assert gpu_check.BUDGET_S["full"] <= 540 and gpu_check.BUDGET_S["quick"] <= 180
    assert gpu_check.BUDGET_S["full"] + gpu_check.BUDGET_S["quick"] <= 15 * 60 - 120
    for mode, plan in gpu_check.PLAN.items():
        assert sum(limit for _, limit in plan) <= gpu_check.BUDGET_S[mode] - gpu_check.RESERVE_S, mode
        for step, limit in plan:
            if step in ("triton_smoke", "cuda", "triton_ops"):  # a test step starts tests for 15 s or more
                assert limit - gpu_check.PER_TEST_S - gpu_check.PYTEST_OVERHEAD_S >= 15, (mode, step)


def test_a_dry_run_keeps_the_plan_on_a_slower_clock(tmp_path):
    # Interpreting on a busy CPU is no measure of the GPU: the dry run's limits and budget scale together.
    real, dry = gpu_check.Check(tmp_path / "real", "quick", False), gpu_check.Check(tmp_path / "dry", "quick", True)
    for c in (real, dry):
        c.t0 -= 40
    slowdown = gpu_check.DRY_RUN_SLOWDOWN
    assert slowdown > 1
    assert real.left() == pytest.approx(gpu_check.BUDGET_S["quick"] - 40, abs=1)
    assert dry.left() == pytest.approx(gpu_check.BUDGET_S["quick"] - 40 / slowdown, abs=1)
    sleep = [sys.executable, "-c", "import time; time.sleep(6)"]
    assert real.run("step", sleep, 5, "real.log") == 124  # a 5 s limit is 5 s on the GPU machine
    assert dry.run("step", sleep, 5, "dry.log") == 0  # and 5 x slowdown s in a dry run
    assert [r["value"] for r in real.rows] == ["5"] and not dry.rows


def test_a_pytest_run_past_its_deadline_ends_with_a_junit_file(tmp_path):
    junit = tmp_path / "junit.xml"
    # Two xdist workers, as the check runs them: each reads the deadline from its environment.
    cmd = gpu_check.pytest_command(junit, ["tests/test_gpu_check.py::test_log_counts_read_the_progress_lines"],
                                   collect_only=False, marker="not gpu", workers=2)
    env = gpu_check.source_env({gpu_check.DEADLINE_ENV: str(time.time() - 1)})
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    counts = gpu_check._junit_counts(junit)
    assert counts["tests"] == counts["skipped"] == counts["deadline"] == 1, counts


def test_log_counts_read_the_progress_lines(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("[gw0] [ 25%] PASSED tests/test_contract.py::a[x]\n"
                   "[gw1] [ 50%] FAILED tests/test_contract.py::b\n"
                   "tests/test_contract.py::c PASSED\n"
                   "[gw0] [ 75%] SKIPPED tests/test_contract.py::d\n"
                   "tests/test_contract.py::e ERROR [ 90%]\n"
                   "FAILED tests/test_contract.py::b - AssertionError\n")
    assert gpu_check._log_counts(log) == dict(tests=5, failures=1, errors=1, skipped=1, deadline=0)
    assert gpu_check._junit_counts(tmp_path / "absent.xml") is None


def test_stop_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child"
    process = subprocess.Popen(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], start_new_session=True)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    gpu_check.stop(process)
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the build's child outlived stop()")


def test_a_failed_install_says_why_and_the_tree_still_runs(tmp_path, monkeypatch):
    # As on a GPU machine whose setuptools cannot read the project: the install step fails, the summary
    # gives the cause, and the steps after it import the package from the source tree.
    src = check_install.copy_source(tmp_path / "src")
    (src / "setup.py").write_text('raise SystemExit("this setuptools cannot build metaug_fast")\n')
    monkeypatch.setattr(gpu_check, "ROOT", src)
    c = gpu_check.Check(tmp_path / "out", "quick", dry_run=True)
    gpu_check.step_install(c)
    rows = {r["name"]: r for r in c.rows}
    assert rows["package (no extensions)"]["status"] == "failed"
    assert "cannot build metaug_fast" in rows["install error"]["value"]
    assert rows["metaug_fast.kernels imported from"]["status"] == "ok"
    assert rows["metaug_fast.kernels imported from"]["value"].startswith(str(src))


def test_outputs_survive_an_error(tmp_path, monkeypatch):
    def broken(c):
        c.record("build", "package (no extensions)", 0)
        raise RuntimeError("a step broke")

    monkeypatch.setattr(gpu_check, "run_steps", broken)
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(gpu_check.OUTPUTS)
    assert "RuntimeError: a step broke" in (tmp_path / "summary.txt").read_text()


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


def test_kernel_timings_import_no_kernel_before_the_dry_run_says_how():
    # --dry-run sets TRITON_INTERPRET in main(); a kernel defined at import, before that, would be compiled,
    # not interpreted, and every interpreted kernel calling it fails ("Cannot call @triton.jit'd outside of
    # the scope of a kernel").
    run = subprocess.run([sys.executable, "-c", "import sys, bench.gpu_kernels; "
                          "print(sorted(m for m in sys.modules if m.startswith('metaug_fast')))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr[-2000:]


def test_kernel_timings_need_a_gpu_or_a_dry_run():
    run = subprocess.run([sys.executable, "-m", "bench.gpu_kernels", "--out", "x.csv"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "needs a CUDA device" in run.stderr


def test_wrapper_passes_its_arguments(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--dry-run" in run.stdout and "--quick" in run.stdout


def test_the_makefile_and_the_check_find_cuda_by_one_rule():
    from tools.cuda_home import cuda_home

    assert "tools/cuda_home.py" in (ROOT / "Makefile").read_text()
    make = subprocess.run(["make", "-s", "-n", "-o", ".venv/.install-stamp", "check-cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert f"CUDA_HOME={cuda_home()} " in make.stdout, make.stdout[-1000:]
    assert gpu_check.build_env()["CUDA_HOME"] == os.environ.get("CUDA_HOME", cuda_home())


def test_kernel_timings_reuse_the_ceilings_of_the_run(tmp_path):
    # The check measures the GEMM ceilings once; the kernel step reads them back instead of measuring again.
    from bench.gpu_kernels import Sink, read_ceilings

    sink = Sink(tmp_path / "ceilings.csv")
    sink("ceilings", "GEMM bf16 8192^3", 812.5, "TFLOP/s")
    sink("ceilings", "HBM copy 2 GiB", 4100.0, "GB/s")
    assert read_ceilings(tmp_path / "ceilings.csv") == {"bf16": 812.5}
