"""`make train`'s demo runs end to end and prints measured numbers (one epoch here); the CLIs are installed."""
import re

from metaug_fast.cli import demo


def test_demo_runs_and_reports_probe_accuracy(capsys):
    assert demo.main(["--epochs", "1", "--batch", "512"]) == 0
    out = capsys.readouterr().out
    accs = re.findall(r"encoder\s+([\d.]+) %", out)
    assert len(accs) == 2 and all(0 < float(a) <= 100 for a in accs)


def test_the_command_lines_are_installed_as_scripts():
    from importlib.metadata import entry_points

    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("metaug-")}
    assert {name: e.value for name, e in scripts.items()} == {
        "metaug-train": "metaug_fast.cli.train:main", "metaug-compare": "metaug_fast.cli.compare:main",
        "metaug-demo": "metaug_fast.cli.demo:main"}
    assert all(callable(e.load()) for e in scripts.values())
