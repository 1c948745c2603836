"""The GPU check: one call on a lent GPU machine returns every number the project needs from a GPU.

    bash bench/gpu_check.sh OUTDIR            # at most 9 minutes
    bash bench/gpu_check.sh OUTDIR --quick    # at most 3 minutes, for a second try: no build, no CUDA
    python -m bench.gpu_check OUTDIR --dry-run   # this CPU: every step's real command, nothing on a GPU

Sized to the machine it runs on (15 minutes of device time in all, 10 per command, 8 files back, the last
12,000 characters of output shown). Steps run in order, each under a time limit cut from one budget, and a
failing step does not stop the others; verdicts come before timings, and a small curated selection before
the full grid:

1. versions (Python, torch, Triton, setuptools, pip, wheel), the device, and where metaug_fast is imported
   from;
2. the package installed without extensions (seconds; when that fails, the summary says why and every step
   still runs from the source tree, which is first on each step's PYTHONPATH); in full mode the C++ and
   CUDA extensions then build in the background, in their own process group, into build/gpu-check-ext,
   copied into the package only when done (a test run must never import a half-written library);
3. the Triton smoke selection (:data:`SMOKE`: every kernel family once, the bf16 interior tiles included);
4. the ceilings our figures are compared with, measured in the same run: bf16/tf32/fp32 GEMM rates and
   HBM copy bandwidth;
5. the kernel timings of ``bench.gpu_kernels``, each preceded by a check of the same kernel against the
   reference (a failed check marks its row);
6. (full mode) the CUDA entries of the contract suite once the build is done, the Triton operators under
   ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``, then the whole Triton grid with the
   time that is left.

Every pytest run writes a junit file whatever happens: conftest.py starts no test after the deadline the
step gives it (:data:`DEADLINE_ENV`), which leaves room for the slowest test (pytest-timeout's per-test
limit) inside the step's limit; a run killed all the same is counted from its -v progress lines. The Triton
steps set ``METAUG_NO_EXT=1`` (they need no C++ extension, which may still be building) and
``METAUG_TRITON_ONE_CONFIG=1`` (one autotuning configuration: the steps check values, not speed).

Every result is appended to ``summary.csv`` and ``log.txt`` as soon as it exists; at the end, even after an
error, the work folder is packed into ``results.tar.gz`` and ``summary.txt`` (at most 100 lines) is printed
last. OUTDIR then holds exactly those four files. The dry run (``make test`` runs it in a fresh copy of the
tree without extensions, tests/test_gpu_check.py) runs each step's real command in its real environment:
pip with ``--dry-run``, pytest with ``--collect-only`` (each test step reports how many tests it collected),
``bench.gpu_kernels --dry-run`` (every timing row at tiny sizes on this CPU, the Triton kernels in the
interpreter); only the compilation of the extensions is left out. Interpreting on a CPU is no measure of
a GPU's time, so a dry run's clock runs DRY_RUN_SLOWDOWN times slower: every limit and the budget keep their
proportions (the plan is exercised as planned) on a machine that may be busy with other tests.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional

from tools.cuda_home import cuda_home

ROOT = Path(__file__).resolve().parents[1]
# Read by tests/conftest.py: no test starts after this time (seconds since the epoch), and the skip says so.
DEADLINE_ENV = "METAUG_TEST_DEADLINE"
DEADLINE_REASON = "not started before the GPU check's deadline for this step"

FIELDS = ("step", "name", "value", "unit", "status")
OUTPUTS = ("summary.csv", "log.txt", "results.tar.gz", "summary.txt")
MAX_SUMMARY_LINES = 100
BUDGET_S = {"full": 540, "quick": 180}
# Each step's time limit, chosen so that every step gets its whole limit even when each before it uses all
# of its own (PLAN, checked by tests/test_gpu_check.py); the last step, the whole Triton grid, gets what is
# left. A test step starts no test later than PER_TEST_S + PYTEST_OVERHEAD_S before its limit.
RESERVE_S = 15  # packing the results at the end
DRY_RUN_SLOWDOWN = 4  # the quick dry run's kernels step took 27 s of its 40 alone on a 2-core CPU, over 40 under load
PER_TEST_S = 40  # pytest-timeout's limit for one test
PYTEST_OVERHEAD_S = 20  # pytest's start (xdist workers, collection) and end
INSTALL_S = {"full": 45, "quick": 20}
SMOKE_S = {"full": 130, "quick": 85}
CEILINGS_S = {"full": 30, "quick": 20}
KERNELS_S = {"full": 140, "quick": 40}
CUDA_TESTS_S = 90
OPS_TESTS_S = 75
PLAN = {"full": [("install", INSTALL_S["full"]), ("triton_smoke", SMOKE_S["full"]), ("ceilings", CEILINGS_S["full"]),
                 ("cuda", CUDA_TESTS_S), ("kernels", KERNELS_S["full"]), ("triton_ops", OPS_TESTS_S)],
        "quick": [("install", INSTALL_S["quick"]), ("triton_smoke", SMOKE_S["quick"]),
                  ("ceilings", CEILINGS_S["quick"]), ("kernels", KERNELS_S["quick"])]}
BUILD_ROOM_S = CUDA_TESTS_S + KERNELS_S["full"] + OPS_TESTS_S + RESERVE_S  # kept for the steps after the build
EXT_DIR = ROOT / "build" / "gpu-check-ext"
# The Triton steps' environment: compiled kernels, no C++ extension needed, one autotuning configuration.
TRITON_ENV = {"TRITON_INTERPRET": "0", "METAUG_NO_EXT": "1", "METAUG_TRITON_ONE_CONFIG": "1"}
_C = "tests/test_contract.py::"
# Every Triton kernel family once, on the GPU: score mode's forward, backward and HVP (fp64, masked and not;
# bf16 at β = 256), margins, label mode's (fp64 across tiles, bf16 at β = 1, a large shape, a rank's offset),
# InfoNCE's sparse positives, CLIP's cross mode, the similarity; then the fast path itself: bf16 and fp16
# over interior tiles (N = 2048 self mode, a 600 × 3000 reference set) for every form and InfoNCE.
SMOKE = [
    _C + "test_score_fp64_values_gradients_hvp[triton-cuda-True-shape2-weighted]",
    _C + "test_score_fp64_values_gradients_hvp[triton-cuda-False-shape2-info_nce]",
    _C + "test_score_low_precision[triton-cuda-weighted-256.0-torch.bfloat16]",
    _C + "test_margin_injection_loss[triton-cuda-True]",
    _C + "test_label_fp64_values_gradients_hvp[triton-cuda-shape2-cosine-squared]",
    _C + "test_label_fp64_values_gradients_hvp[triton-cuda-shape2-cosine-margins]",
    _C + "test_label_low_precision[triton-cuda-squared-1.0-torch.bfloat16]",
    _C + "test_label_large_shapes[triton-cuda-shape1-squared]",
    _C + "test_label_self_offset_and_constant_reference[triton-cuda-info_nce]",
    _C + "test_info_nce_sparse_positives[triton-cuda-shape1]",
    _C + "test_symmetric_info_nce_large_shapes[triton-cuda-shape1]",
    _C + "test_pairwise_similarity[triton-cuda-cosine-torch.float32]",
    *(_C + f"test_label_low_precision_interior_tiles[triton-cuda-{op}-torch.{dtype}]"
      for op in ("hinge", "squared", "weighted", "circle", "info_nce") for dtype in ("bfloat16", "float16")),
    "tests/test_precision_flags.py::test_label_mode_with_tf32_flags_matches_ieee[weighted-cuda-triton]",
]


class Check:
    """The run's budget, its append-as-you-go outputs and its work folder."""

    def __init__(self, out: Path, mode: str, dry_run: bool):
        self.out, self.mode, self.dry_run = out, mode, dry_run
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.budget = BUDGET_S[mode]
        self.slowdown = DRY_RUN_SLOWDOWN if dry_run else 1  # wall seconds per planned second
        self.rows: List[dict] = []
        with open(out / "summary.csv", "w", newline="") as f:
            csv.writer(f).writerow(FIELDS)

    def left(self) -> float:
        """Planned seconds left of the budget."""
        return self.budget - (time.monotonic() - self.t0) / self.slowdown

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
        """Runs ``cmd`` under min(limit, what is left of the budget less a reserve for packing), in planned
        seconds, its output into work/``log_name``; returns its exit code (124 on a time-out)."""
        limit = min(limit, self.left() - RESERVE_S)
        if limit < 5:
            self.record(step, "skipped", status="no time left")
            return 124
        with open(self.work / log_name, "w") as log:
            # A process group of its own: on a time-out pytest's xdist workers or nvcc go with it.
            process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=source_env(env),
                                       start_new_session=True)
            try:
                return process.wait(timeout=limit * self.slowdown)
            except subprocess.TimeoutExpired:
                stop(process)
                self.record(step, "timed out", f"{limit * self.slowdown:.0f}", "s", status="timeout")
                return 124


def source_env(extra: Optional[dict] = None) -> dict:
    """The environment of every step: the source tree first on the path, so that each step runs even when
    the install step failed (an old setuptools, say), and the extensions built in place are found."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _version_of(dist: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def step_environment(c: Check) -> bool:
    """Versions and device properties; False when there is no GPU to check."""
    import platform

    c.record("env", "python", platform.python_version())
    for tool in ("setuptools", "pip", "wheel"):  # what the install step builds with (no downloads there)
        c.record("env", tool, _version_of(tool) or "not installed")
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


def step_install(c: Check) -> None:
    """The package installed without extensions, as a user would (seconds)."""
    cmd = [sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps", "-q"]
    code = c.run("build", cmd + (["--dry-run"] if c.dry_run else []), INSTALL_S[c.mode], "install.log",
                 env={"METAUG_NO_EXT": "1"})
    c.record("build", "package (no extensions)", code, status="ok" if code == 0 else "failed")
    if code:  # every later step runs from the source tree all the same (PYTHONPATH): say why it failed
        c.record("build", "install error", _last_error(c.work / "install.log"), status="failed")
    probe = ("import metaug_fast.kernels as k, metaug_fast.backends.cpp as c; print(k.__file__); "
             "print('unavailable: ' + str(c.ERROR) if c.ERROR else 'loaded')")
    where = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=source_env(TRITON_ENV), capture_output=True,
                           text=True, timeout=120)
    lines = where.stdout.strip().splitlines() if where.returncode == 0 else [where.stderr[-200:], ""]
    c.record("build", "metaug_fast.kernels imported from", lines[0], status="ok" if where.returncode == 0 else "failed")
    c.record("build", "C++ extension", lines[-1][:200])
    c.record("build", "CUDA_HOME", build_env().get("CUDA_HOME", "none (no nvcc)"))


def build_env() -> dict:
    env = source_env({"METAUG_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
                      "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))})
    found = cuda_home()
    if "CUDA_HOME" not in env and found:
        env["CUDA_HOME"] = found
    return env


def start_build(c: Check) -> subprocess.Popen:
    """The C++ and CUDA extensions, built in the background in a process group of their own (so that
    ninja's and nvcc's children go with it), into EXT_DIR."""
    shutil.rmtree(EXT_DIR, ignore_errors=True)
    log = open(c.work / "build_ext.log", "w")
    return subprocess.Popen([sys.executable, "setup.py", "build_ext", "--build-lib", str(EXT_DIR / "lib"),
                             "--build-temp", str(EXT_DIR / "tmp")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=build_env(), start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """Kills the process and every process of its group."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def finish_build(c: Check, build: subprocess.Popen) -> bool:
    """Waits for the build while time is left for the steps after it, then puts the libraries in the
    package; True when they are there."""
    try:
        code = build.wait(timeout=max(c.left() - BUILD_ROOM_S, 1) * c.slowdown)
    except subprocess.TimeoutExpired:
        stop(build)
        code = "timeout"
    libs = sorted((EXT_DIR / "lib" / "metaug_fast").glob("_C*.so")) if code == 0 else []
    for lib in libs:
        shutil.copy2(lib, ROOT / "metaug_fast" / lib.name)
    ok = code == 0 and len(libs) == 2
    c.record("build", "extensions (C++, CUDA)", f"{code}: {', '.join(p.name for p in libs) or 'none'}",
             status="ok" if ok else "failed")
    return ok


def _last_error(log: Path) -> str:
    """The install log's most telling line, short enough for the summary: inside pip's report of the build
    backend's output ("╰─> [N lines of output]" … "[end of output]") the last line that names an error, or
    its last line; else the log's last line that names one."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    starts = [i for i, ln in enumerate(lines) if ln.startswith("╰─> [") and "lines of output" in ln]
    if starts:
        block = lines[starts[-1] + 1:]
        block = block[:next((i for i, ln in enumerate(block) if ln == "[end of output]"), len(block))] or ["?"]
        telling = [ln for ln in block if "error" in ln.lower()] or block
    else:
        telling = [ln for ln in lines if "error" in ln.lower()] or lines or ["no output"]
    return telling[-1][:200]


def step_ceilings(c: Check) -> None:
    cmd = [sys.executable, "-m", "bench.gpu_kernels", "--ceilings-only", "--summary", str(c.out / "summary.csv"),
           "--out", str(c.work / "ceilings.csv")]
    code = c.run("ceilings", cmd + (["--dry-run"] if c.dry_run else []), CEILINGS_S[c.mode], "ceilings.log")
    if code:
        c.record("ceilings", "exit", code, status="failed")


def _junit_counts(path: Path) -> Optional[dict]:
    """(tests, failures, errors, skipped) of a junit file, and how many of the skips were the deadline's;
    None when there is no readable file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = dict(tests=0, failures=0, errors=0, skipped=0, deadline=0)
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    counts["deadline"] = sum(DEADLINE_REASON in (skip.get("message") or "") for skip in root.iter("skipped"))
    return counts


_STATUS = "(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
# A -v progress line, with xdist ("[gw0] [ 25%] PASSED path::test") or without ("path::test PASSED [ 25%]");
# not the -rf summary's "FAILED path::test - message".
_PROGRESS = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] {_STATUS} |^\S+::.* {_STATUS}(?:\s+\[\s*\d+%\])?$")


def _log_counts(path: Path) -> dict:
    """The same counts from pytest's -v progress lines, for a run that left no junit file (killed)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    found = [m.group(1) or m.group(2) for m in map(_PROGRESS.match, text.splitlines()) if m]
    return dict(tests=len(found), failures=found.count("FAILED"), errors=found.count("ERROR"),
                skipped=found.count("SKIPPED") + found.count("XFAIL"), deadline=0)


def _collected(path: Path) -> int:
    found = re.findall(r"(\d+)(?:/\d+)? tests? collected", path.read_text(errors="replace")) if path.exists() else []
    return int(found[-1]) if found else 0


def pytest_command(junit: Path, selection: List[str], collect_only: bool, marker: str = "gpu",
                   workers: int = 4) -> List[str]:
    cmd = [sys.executable, "-m", "pytest", "-m", marker, "-p", "no:cacheprovider", "-rf", f"--junitxml={junit}",
           *selection]
    if collect_only:
        return cmd + ["-q", "--collect-only"]
    cmd.append("-v")  # one line per test: the fallback when no junit file is written
    if _module_available("xdist"):
        cmd += ["-n", str(workers)]
    if _module_available("pytest_timeout"):
        cmd += ["--timeout", str(PER_TEST_S)]
    return cmd


def step_tests(c: Check, name: str, selection: List[str], limit: float, env: dict) -> None:
    """One pytest run of GPU tests. It carries a deadline (conftest.py) past which it starts no test, set so
    that the run ends by itself, junit file written, inside ``limit``: the slowest test that starts just
    before it (the per-test limit) and pytest's start and end fit in what is left."""
    junit, log = c.work / f"junit_{name}.xml", f"tests_{name}.log"
    limit = min(limit, c.left() - RESERVE_S)
    window = limit - PER_TEST_S - PYTEST_OVERHEAD_S
    if window < 10:
        c.record("tests", name, f"a {limit:.0f} s limit: too little for one test", status="skipped: no time left")
        return
    env = {**env, DEADLINE_ENV: f"{time.time() + (PYTEST_OVERHEAD_S / 2 + window) * c.slowdown:.0f}"}
    code = c.run("tests", pytest_command(junit, selection, c.dry_run), limit, log, env=env)
    if c.dry_run:
        n = _collected(c.work / log)
        c.record("tests", name, f"{n} collected; tests start within {window:.0f} s of a {limit:.0f} s limit",
                 status="ok" if code == 0 and n else "failed")
        return
    counts = _junit_counts(junit)
    source = "junit"
    if counts is None:
        counts, source = _log_counts(c.work / log), "progress log (no junit file)"
    bad = counts["failures"] + counts["errors"]
    passed = counts["tests"] - bad - counts["skipped"]
    status = "ok" if code == 0 else "timeout" if code == 124 else "failed"
    c.record("tests", name, f"{passed} passed, {bad} failed, {counts['skipped']} skipped "
                            f"({counts['deadline']} at the deadline), from the {source}", status=status)


def step_kernels(c: Check) -> None:
    cmd = [sys.executable, "-m", "bench.gpu_kernels", "--summary", str(c.out / "summary.csv"), "--out",
           str(c.work / "gpu_kernels.csv"), "--profile", str(c.work / "profile.txt")]
    if c.mode == "quick":
        cmd.append("--quick")
    if c.dry_run:
        cmd.append("--dry-run")
    if (c.work / "ceilings.csv").exists():  # measured once, at the start of this run
        cmd += ["--ceilings-from", str(c.work / "ceilings.csv")]
    code = c.run("kernels", cmd, KERNELS_S[c.mode], "gpu_kernels.log", env=TRITON_ENV)
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
             f"{time.monotonic() - c.t0:.0f} s of a {c.budget * c.slowdown} s budget"
             f"{f' ({c.slowdown}x the planned {c.budget} s)' if c.dry_run else ''}; files: {', '.join(OUTPUTS)}"]
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


def run_steps(c: Check) -> None:
    full = c.mode == "full"
    step_install(c)
    build = None
    if full and not c.dry_run:
        build = start_build(c)
    else:
        c.record("build", "extensions (C++, CUDA)", status="skipped: " + ("--quick" if not full else "dry run"))
    try:
        step_tests(c, "triton_smoke", SMOKE, SMOKE_S[c.mode], TRITON_ENV)
        step_ceilings(c)
        if full:
            if c.dry_run or finish_build(c, build):
                # The dry run builds nothing: its collection of the CUDA step declares the extension absent.
                env = {"TRITON_INTERPRET": "0", **({"METAUG_NO_EXT": "1"} if c.dry_run else {})}
                step_tests(c, "cuda", ["tests/test_contract.py", "tests/test_cuda.py", "tests/test_precision_flags.py",
                                       "-k", "cuda and not triton"], CUDA_TESTS_S, env)
        step_kernels(c)
        if full:
            step_tests(c, "triton_ops", ["tests/test_triton_ops.py"], OPS_TESTS_S, TRITON_ENV)
            deselect = [arg for node in SMOKE for arg in ("--deselect", node)]
            step_tests(c, "triton", ["tests/test_contract.py", "tests/test_triton_gpu.py",
                                     "tests/test_precision_flags.py",
                                     "-k", "triton", *deselect], c.budget, TRITON_ENV)
    finally:
        if build is not None and build.poll() is None:
            stop(build)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (its previous outputs are replaced)")
    ap.add_argument("--quick", action="store_true", help="at most 3 minutes: a second try")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: every step's real command, pytest collecting only, timings at tiny sizes on the CPU")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (args.out / name).unlink(missing_ok=True)
    c = Check(args.out, "quick" if args.quick else "full", args.dry_run)
    has_gpu, error = False, None
    try:
        has_gpu = step_environment(c)
        if has_gpu or args.dry_run:
            run_steps(c)
        else:
            c.log("no CUDA device: nothing to check (use --dry-run on a CPU)")
    except Exception as exc:  # noqa: BLE001 (recorded, and the results gathered so far still come back)
        error = exc
        c.record("check", "error", f"{type(exc).__name__}: {exc}"[:300], status="failed")
    finally:
        lines = finish(c)
        print("\n".join(lines))
    return 0 if error is None and (has_gpu or args.dry_run) else 1


if __name__ == "__main__":
    raise SystemExit(main())
