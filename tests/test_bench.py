"""The benchmark script runs at a tiny size and writes a CSV with the shared schema."""
import csv

from bench import bench_oucl_score
from bench.common import FIELDS


def test_bench_oucl_score_writes_csv(tmp_path, capsys):
    out = tmp_path / "b.csv"
    assert bench_oucl_score.main(["--B", "16", "--kp", "2", "--kn", "33", "--repeats", "1", "--forms",
                                  "weighted,hinge", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert rows and list(rows[0]) == FIELDS
    assert {r["op"] for r in rows} == {"oucl_weighted", "oucl_hinge"}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    assert "speed-up" in capsys.readouterr().out or len({r["backend"] for r in rows}) == 1
