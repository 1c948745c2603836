"""The GPU check: one call on a lent GPU machine returns every number the project needs from a GPU.

    bash bench/gpu_check.sh OUTDIR            # at most 9 minutes
    bash bench/gpu_check.sh OUTDIR --quick    # at most 3 minutes, for a second try
    python -m bench.gpu_check OUTDIR --dry-run   # this CPU: the orchestration without a GPU (make test runs it)

Sized to the machine it runs on (15 minutes of device time in all, 10 per command, 8 files back, the last
12,000 characters of output shown). Steps run in order, each under its own deadline cut from one budget, and
a failing step does not stop the others:

1. versions and device properties;
2. the package installed without extensions (Triton is usable at once), the C++/CUDA extensions built in
   the background;
3. the ceilings our figures are compared with, measured in the same run: bf16/tf32/fp32 GEMM rates and
   HBM copy bandwidth;
4. the GPU contract suite and GPU tests, Triton first (pytest-xdist when installed, per-test time limits
   when pytest-timeout is, never stopping at the first failure), each into a junit XML; the CUDA entries
   once the background build is done; then the Triton operators under ``torch.library.opcheck`` and
   ``torch.compile(fullgraph=True)`` (full mode only);
5. the kernel timings of ``bench.gpu_kernels`` (forward, backward, HVP at N = 16k and 64k, controls, the
   1024 × 1M bank, a sweep of label tile configurations, autotuning choices, registers and spills, a
   torch.profiler table).

Every result is appended to ``summary.csv`` and ``log.txt`` as soon as it exists; at the end the work
folder is packed into ``results.tar.gz`` and ``summary.txt`` (at most 100 lines) is printed last. OUTDIR
then holds exactly those four files.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("step", "name", "value", "unit", "status")
OUTPUTS = ("summary.csv", "log.txt", "results.tar.gz", "summary.txt")
MAX_SUMMARY_LINES = 100
BUDGET_S = {"full": 540, "quick": 180}


class Check:
    """The run's budget, its append-as-you-go outputs and its work folder."""

    def __init__(self, out: Path, mode: str, dry_run: bool):
        self.out, self.mode, self.dry_run = out, mode, dry_run
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.budget = BUDGET_S[mode]
        self.rows: List[dict] = []
        with open(out / "summary.csv", "w", newline="") as f:
            csv.writer(f).writerow(FIELDS)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")

    def record(self, step: str, name: str, value="", unit: str = "", status: str = "ok") -> None:
        row = dict(step=step, name=name, value=value, unit=unit, status=status)
        self.rows.append(row)
        with open(self.out / "summary.csv", "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        self.log(f"{step}: {name} = {value} {unit} [{status}]")

    def run(self, step: str, cmd: List[str], limit: float, log_name: str, env: Optional[dict] = None) -> int:
        """Runs ``cmd`` under min(limit, what is left of the budget less a reserve for packing), its output
        into work/``log_name``; returns its exit code (124 on a time-out)."""
        limit = min(limit, self.left() - 15)
        if limit < 5:
            self.record(step, "skipped", status="no time left")
            return 124
        with open(self.work / log_name, "w") as log:
            try:
                return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit,
                                      env={**os.environ, **(env or {})}).returncode
            except subprocess.TimeoutExpired:
                self.record(step, "timed out", f"{limit:.0f}", "s", status="timeout")
                return 124


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def step_environment(c: Check) -> bool:
    """Versions and device properties; False when there is no GPU to check."""
    import platform

    c.record("env", "python", platform.python_version())
    try:
        import torch

        c.record("env", "torch", torch.__version__)
        c.record("env", "cuda", str(torch.version.cuda))
        import triton

        c.record("env", "triton", triton.__version__)
    except ImportError as exc:
        c.record("env", "import", str(exc), status="failed")
        return False
    if not torch.cuda.is_available():
        c.record("env", "gpu", "none", status="skipped: no GPU" if c.dry_run else "failed")
        return False
    p = torch.cuda.get_device_properties(0)
    c.record("env", "gpu", p.name)
    c.record("env", "capability", f"{p.major}.{p.minor}")
    c.record("env", "sms", p.multi_processor_count)
    c.record("env", "memory", f"{p.total_memory / 2**30:.1f}", "GiB")
    return True


def step_build(c: Check) -> Optional[subprocess.Popen]:
    """Installs the package without extensions (seconds), then builds the C++ and CUDA extensions in the
    background; returns that build's process."""
    code = c.run("build", [sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps",
                           "-q"], 120, "install.log", env={"METAUG_NO_EXT": "1"})
    c.record("build", "package (no extensions)", code, status="ok" if code == 0 else "failed")
    env = dict(os.environ, METAUG_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    if "CUDA_HOME" not in env and shutil.which("nvcc"):
        env["CUDA_HOME"] = str(Path(os.path.realpath(shutil.which("nvcc"))).parents[1])
    log = open(c.work / "build_ext.log", "w")
    return subprocess.Popen([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def step_ceilings(c: Check) -> None:
    code = c.run("ceilings", [sys.executable, "-m", "bench.gpu_kernels", "--ceilings-only", "--summary",
                              str(c.out / "summary.csv"), "--out", str(c.work / "ceilings.csv")], 60, "ceilings.log")
    if code:
        c.record("ceilings", "exit", code, status="failed")


def _junit_counts(path: Path) -> dict:
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    if not path.exists():
        return counts
    root = ET.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    return counts


def step_tests(c: Check, name: str, selection: List[str], limit: float) -> None:
    junit = c.work / f"junit_{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rf",
           f"--junitxml={junit}", *selection]
    if _module_available("xdist"):
        cmd += ["-n", "4"]
    if _module_available("pytest_timeout"):
        cmd += ["--timeout", "90"]
    code = c.run("tests", cmd, limit, f"tests_{name}.log", env={"TRITON_INTERPRET": "0"})
    counts = _junit_counts(junit)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "ok" if code == 0 else "failed" if code != 124 else "timeout"
    c.record("tests", name, f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
                            f"{counts['skipped']} skipped", status=status)


def step_kernels(c: Check) -> None:
    cmd = [sys.executable, "-m", "bench.gpu_kernels", "--summary", str(c.out / "summary.csv"), "--out",
           str(c.work / "gpu_kernels.csv"), "--profile", str(c.work / "profile.txt")]
    if c.mode == "quick":
        cmd.append("--quick")
    if (c.work / "ceilings.csv").exists():  # measured once, at the start of this run
        cmd += ["--ceilings-from", str(c.work / "ceilings.csv")]
    code = c.run("kernels", cmd, c.left() - 20, "gpu_kernels.log", env={"TRITON_INTERPRET": "0"})
    if code:
        c.record("kernels", "exit", code, status="failed" if code != 124 else "timeout")


def finish(c: Check) -> List[str]:
    """Packs the work folder, writes summary.txt (at most 100 lines) and leaves only the four outputs."""
    with tarfile.open(c.out / "results.tar.gz", "w:gz") as tar:
        tar.add(c.work, arcname="results")
    shutil.rmtree(c.work)
    rows = []
    with open(c.out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    lines = [f"GPU check ({c.mode}{', dry run' if c.dry_run else ''}): {len(rows)} results in "
             f"{time.monotonic() - c.t0:.0f} s of a {c.budget} s budget; files: {', '.join(OUTPUTS)}"]
    failed = [r for r in rows if r["status"] not in ("ok",)]
    body = [f"{r['step']:<9} {r['name'][:48]:<48} {r['value']} {r['unit']}".rstrip() +
            ("" if r["status"] == "ok" else f"  [{r['status']}]") for r in rows]
    room = MAX_SUMMARY_LINES - len(lines) - 2
    if len(body) > room:  # keep every problem, then as many results as fit
        problems = [b for b, r in zip(body, rows) if r["status"] != "ok"]
        body = problems + [b for b, r in zip(body, rows) if r["status"] == "ok"][:max(room - len(problems), 0)]
        body = body[:room] + [f"... {len(rows) - room} more rows in summary.csv"]
    lines += body + [f"{len(failed)} not ok"]
    (c.out / "summary.txt").write_text("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (its previous outputs are replaced)")
    ap.add_argument("--quick", action="store_true", help="at most 3 minutes: a second try")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run the orchestration only")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (args.out / name).unlink(missing_ok=True)
    c = Check(args.out, "quick" if args.quick else "full", args.dry_run)
    has_gpu = step_environment(c)
    if has_gpu:
        build = step_build(c)
        step_ceilings(c)
        step_tests(c, "triton", ["tests/test_contract.py", "tests/test_triton_gpu.py", "-k", "triton"],
                   60 if args.quick else 200)
        if args.quick:  # the Triton kernels only: no waiting for the extensions
            step_kernels(c)
            build.kill()
            c.record("build", "extensions (C++, CUDA)", status="skipped in --quick")
        else:
            try:
                code = build.wait(timeout=max(c.left() - 150, 1))
            except subprocess.TimeoutExpired:
                build.kill()
                code = "timeout"
            c.record("build", "extensions (C++, CUDA)", code, status="ok" if code == 0 else "failed")
            if code == 0:
                step_tests(c, "cuda", ["tests/test_contract.py", "tests/test_cuda.py", "-k", "cuda and not triton"], 90)
            # The Triton operators under opcheck and torch.compile: after the contract suites, so that a slow
            # compile cannot cost their results.
            step_tests(c, "triton_ops", ["tests/test_triton_ops.py"], 75)
            step_kernels(c)
    elif not args.dry_run:
        c.log("no CUDA device: nothing to check (use --dry-run on a CPU)")
    lines = finish(c)
    print("\n".join(lines))
    return 0 if has_gpu or args.dry_run else 1


if __name__ == "__main__":
    raise SystemExit(main())
