"""The benchmark script runs at a tiny size and writes a CSV with the shared schema."""
import csv

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
    assert [r["backend"] for r in rows] == ["cpp", "reference", "cpp"] and list(rows[0]) == FIELDS
    assert rows[2]["mode"] == "label,bank,sharded,world=2" and all(float(r["time_ms"]) > 0 for r in rows)


def test_triton_compile_check_covers_every_kernel():
    import importlib

    from bench.check_triton_compile import _jobs

    checked = {(module, name) for module, name, _, _ in _jobs()}
    for module in ("oucl_score", "oucl_label", "similarity"):
        mod = importlib.import_module(f"metaug_fast.kernels.{module}")
        kernels = {name for name in vars(mod) if name.startswith("_") and name.endswith("_kernel")}
        assert kernels and {(module, k) for k in kernels} <= checked, kernels
