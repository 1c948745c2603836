"""`make train`'s demo runs end to end and prints measured numbers (one epoch here)."""
import re

from metaug_fast.cli import demo


def test_demo_runs_and_reports_probe_accuracy(capsys):
    assert demo.main(["--epochs", "1", "--batch", "512"]) == 0
    out = capsys.readouterr().out
    accs = re.findall(r"encoder\s+([\d.]+) %", out)
    assert len(accs) == 2 and all(0 < float(a) <= 100 for a in accs)
