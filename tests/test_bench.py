"""The benchmark script runs at a tiny size and writes a CSV with the shared schema."""
import csv
from pathlib import Path

import pytest

from bench import bench_oucl_score
from bench.common import FIELDS

from conftest import requires_cpp


def test_bench_oucl_score_writes_csv(tmp_path, capsys):
    out = tmp_path / "b.csv"
    assert bench_oucl_score.main(["--B", "16", "--kp", "2", "--kn", "33", "--repeats", "1", "--forms",
                                  "weighted,hinge", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert rows and list(rows[0]) == FIELDS
    assert {r["op"] for r in rows} == {"oucl_weighted", "oucl_hinge"}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    assert "speed-up" in capsys.readouterr().out or len({r["backend"] for r in rows}) == 1


def test_bench_oucl_label_writes_every_row_and_the_hvp_floor(tmp_path, capsys):
    from bench import bench_oucl_label

    out = tmp_path / "l.csv"
    assert bench_oucl_label.main(["--quick", "--repeats", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert rows and list(rows[0]) == FIELDS
    assert all(r["time_ms"] == "OOM" or float(r["time_ms"]) > 0 for r in rows)
    at_256 = {(r["op"], r["pass"]) for r in rows if r["size"] == "N=256,D=128"}
    assert {("oucl_weighted", "forward+backward"), ("oucl_weighted", "hvp"), ("oucl_weighted", "grad create_graph"),
            ("gemm_floor", "HVP sweep's GEMMs")} <= at_256
    assert "the HVP is" in capsys.readouterr().out


def test_plot_draws_every_csv_including_oom(tmp_path):
    from bench import plot
    from bench.common import row, write_csv

    rows = [row(op="oucl", mode="label", backend=b, dtype="float32", size="N=8", time_ms=t, peak_mem_mb=m,
                **{"pass": "forward+backward"}) for b, t, m in (("reference", "OOM", "OOM"), ("cpp", 1.5, 2.0))]
    write_csv(rows, tmp_path / "x.csv")
    out = plot.plot_csv(tmp_path / "x.csv", tmp_path / "x.png")
    assert out.stat().st_size > 1000
    assert plot.main([str(tmp_path / "x.csv"), "--out-dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "x.png").exists()


@requires_cpp
@pytest.mark.timeout(300)
def test_bench_bank_writes_csv(tmp_path):
    from bench import bench_bank

    out = tmp_path / "bank.csv"
    assert bench_bank.main(["--b", "8", "--m", "300", "--chunk", "64", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["backend"] for r in rows] == ["cpp", "reference", "cpp", "torch.mm"] and list(rows[0]) == FIELDS
    assert rows[2]["mode"] == "label,bank,sharded,world=2" and all(float(r["time_ms"]) > 0 for r in rows)
    assert rows[3]["op"] == "gemm_floor" and rows[3]["pass"] == "one [B,D]x[D,M]"


def test_triton_compile_check_covers_every_kernel():
    import importlib
    import pkgutil

    import metaug_fast.kernels
    from tools.check_triton_compile import jobs

    checked = {(job.module, job.kernel) for job in jobs()}
    modules = [m.name for m in pkgutil.iter_modules(metaug_fast.kernels.__path__) if not m.name.startswith("_")]
    assert sorted(modules) == ["label", "label_hvp", "margins", "matmul", "score", "similarity"]
    for module in modules:
        mod = importlib.import_module(f"metaug_fast.kernels.{module}")
        kernels = {name for name in vars(mod) if name.startswith("_") and name.endswith("_kernel")}
        assert kernels and {(module, k) for k in kernels} <= checked, kernels
        for name in kernels:  # a score-mode kernel: every configuration it may autotune to is compiled
            tuner = getattr(mod, name)
            for dtype in ("float32", "bfloat16", "float64") if hasattr(tuner, "space") else ():
                compiled = {(j.constexprs["BLOCK_B"], j.constexprs["BLOCK_K"], j.constexprs["num_warps"])
                            for j in jobs() if j.kernel == name and j.dtype == dtype}
                want = tuner.space_fp64 if dtype == "float64" else tuner.space
                assert compiled == set(want), (name, dtype, compiled, want)


def test_perf_model_finds_every_kernel_it_models_in_the_static_csv():
    # Every kernel each label op launches, at the configuration it launches with, has its row in the committed
    # bench/results/gpu_static.csv: a kernel or tile change without `make gpu-static` fails here.
    from bench import perf_model

    rows = perf_model._rows(perf_model.STATIC)
    for dtype in ("bfloat16", "float16", "float32"):
        for kernels in perf_model.label_ops(dtype, 128).values():
            for kernel in kernels:
                row = perf_model.find(rows, kernel, 128)
                assert row["spill_stores"] in ("0", ""), (kernel, row["spill_stores"])


def test_perf_model_times_a_kernel_by_its_binding_unit():
    # A kernel whose loop issues 2 MUFU and 6 other instructions per score: MUFU (16 lanes per clock) binds
    # before issue (128 lanes), and the time is scores·2/(16·SMs·clock) plus a launch.
    from bench import perf_model

    dev = perf_model.DEVICES["H100"]
    row = {f"{c}_per_score": "0" for c in ("mma", "ffma", "fmul_fadd", "fp64", "mufu", "int", "load", "store",
                                           "local", "other")}
    row.update(mufu_per_score="2", ffma_per_score="6")
    kernel = perf_model.Kernel("_k", "float32", dict(BM=4096), 0, 1)  # a large block: L2 traffic negligible
    n = 65536
    p = perf_model.kernel_time(row, kernel, float(n) * n, 128, dev)
    assert p.limit == "mufu"
    assert p.seconds == pytest.approx(n * n * 2 / (16 * 132 * dev.clock_ghz * 1e9) + perf_model.LAUNCH_S)
    assert p.terms["issue"] == pytest.approx(p.terms["mufu"] * 8 * 16 / 128 / 2)
    # Twice the passes over the scores, twice every term.
    twice = perf_model.kernel_time(row, kernel._replace(passes=2), float(n) * n, 128, dev)
    assert twice.terms["mufu"] == pytest.approx(2 * p.terms["mufu"])


def test_perf_model_predicts_every_op_on_both_devices():
    from bench import perf_model

    rows = perf_model.table()
    assert {(r["device"], r["N"], r["op"]) for r in rows} == {
        (d, n, op) for d in perf_model.DEVICES for n in perf_model.SIZES
        for op in ("forward", "backward", "forward+backward", "HVP")}
    assert all(r["limit"] in perf_model.LIMITS and r["ms"] > 0 for r in rows)
    by = {(r["device"], r["N"], r["op"]): r["ms"] for r in rows}
    for d in perf_model.DEVICES:  # quadratic in N once launches are negligible
        assert by[(d, 1 << 20, "HVP")] / by[(d, 65536, "HVP")] == pytest.approx(256, rel=0.01)
    assert "| H200 | 1048576 |" in perf_model.markdown(rows)


def test_row_kernels_autotune_over_their_own_space(monkeypatch):
    # Each score-mode kernel tunes over its own spill-free space, fp64 over its own; the GPU check's switch
    # keeps the space's first.
    import torch

    from metaug_fast.kernels import _common, score

    tuner = score._score_fwd_kernel
    assert tuner.space != tuner.space_fp64
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = _common.row_configs(list(dict.fromkeys(tuner.space + tuner.space_fp64)))
    for dtype, want in ((torch.bfloat16, tuner.space), (torch.float32, tuner.space), (torch.float64, tuner.space_fp64)):
        args = {"pos_ptr": torch.empty(0, dtype=dtype), "B": 3}
        assert [_common._shape(c) for c in tuner.early_config_prune(configs, args)] == list(want)
        monkeypatch.setenv("METAUG_TRITON_ONE_CONFIG", "1")
        assert [_common._shape(c) for c in tuner.early_config_prune(configs, args)] == [want[0]]
        monkeypatch.delenv("METAUG_TRITON_ONE_CONFIG")


def test_sweep_writes_the_schema_plots_and_report(tmp_path):
    import resource
    import subprocess
    import sys

    from bench import plot, report, sweep

    out = tmp_path / "results" / "sweep_cpu.csv"
    limit = resource.getrlimit(resource.RLIMIT_AS)
    assert sweep.main(["--ops", "oucl_score", "oucl_label", "--sizes", "16", "32", "--repeats", "1",
                       "--out", str(out)]) == 0
    assert resource.getrlimit(resource.RLIMIT_AS) == limit  # the sweep's memory limit does not outlive it
    rows = list(csv.DictReader(open(out)))
    assert rows and list(rows[0]) == FIELDS and rows[0]["command"].startswith("python -m bench.sweep")
    backends = {r["backend"] for r in rows}
    assert {"reference", "compile(reference)", "naive_pairs", "pml.CircleLoss"} <= backends
    assert {r["pass"] for r in rows} == {"forward", "forward+backward", "hvp"}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    pngs = plot.plot_sweep(out, tmp_path / "results")
    assert sorted(p.name for p in pngs) == ["sweep_cpu_oucl_label.png", "sweep_cpu_oucl_score.png"]
    page = tmp_path / "benchmarks.md"
    page.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nrest\n")
    assert report.main(["--results", str(tmp_path / "results"), "--page", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and "rest" in text and "oucl_label (float32)" in text and "naive_pairs" in text
    # Out of memory is a row, not a crash: under an 8 GiB address space (3.4 of it are torch's libraries) the
    # inputs of B = 2^18 rows fit (1.6 GB) and the naive pair tensor (9.7 GB) does not.
    oom = tmp_path / "oom.csv"
    run = subprocess.run([sys.executable, "-m", "bench.sweep", "--ops", "oucl_score", "--sizes", "262144",
                          "--backends", "naive_pairs", "--repeats", "1", "--mem-gib", "8", "--out", str(oom)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert {r["time_ms"] for r in csv.DictReader(open(oom))} == {"OOM"}


def test_micro_benchmarks_run():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "pytest", "bench/micro", "-q", "--benchmark-disable", "-p",
                          "no:cacheprovider"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]


def test_report_and_plots_read_every_committed_result():
    # Every CSV in bench/results is either a benchmark table or named in OTHER_CSVS, so `make bench`'s
    # report and plot steps never stop on one (gpu_static.csv once did).
    from bench import plot, report
    from bench.common import OTHER_CSVS, benchmark_csvs

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    tables = benchmark_csvs(results)
    assert tables and {p.name for p in results.glob("*.csv")} == {p.name for p in tables} | set(OTHER_CSVS)
    for p in tables:
        plot._read(p)
    assert "oucl_label_cpu" in report.build(results)


def test_ring_model_overlaps_each_hop_with_the_step_it_runs_beside():
    from bench import ring_model

    # Per chunk 1 s forward and 2 s backward on W = 4 (16 and 32 s for all N² scores), hops of whatever the
    # link makes of the chunk's bytes.
    n, w, D = 4096, 4, 128
    chunk = n / w * (D * ring_model.ROW_BYTES + ring_model.LABEL_BYTES)
    grad = n / w * D * ring_model.ROW_BYTES
    fast = ring_model.ring_step(n, w, 16.0, 32.0, 1e12, 0.0, D)  # a link that costs nothing
    assert fast.blocking_ms == pytest.approx(fast.compute_only_ms, rel=1e-6) == pytest.approx(12e3, rel=1e-6)
    assert fast.overlapped_ms == pytest.approx(12e3, rel=1e-6)
    # A link on which the forward hop takes exactly the forward step: blocking adds every hop, the overlapped
    # ring only the backward's excess over its step and the home hop.
    gbs = chunk / 1e9  # 1 s per forward hop
    s = ring_model.ring_step(n, w, 16.0, 32.0, gbs, 0.0, D)
    t_b, t_home = (chunk + grad) / chunk, grad / chunk
    assert s.blocking_ms == pytest.approx(1e3 * (12 + 3 * (1 + t_b) + t_home))
    assert s.overlapped_ms == pytest.approx(1e3 * (3 * (1 + max(2, t_b)) + 3 + t_home))
    assert 0 < s.hidden < 1
    rows = ring_model.table()
    assert {(r["N"], r["world"]) for r in rows} == {(n, link.world) for n in ring_model.SIZES
                                                    for link in ring_model.LINKS}
    assert all(r["compute_only_ms"] <= r["overlapped_ms"] <= r["blocking_ms"] for r in rows)
