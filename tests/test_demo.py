"""The command lines: the demo runs end to end and prints measured numbers (one epoch here); the CLIs are
installed; their help shows every option with its default; their errors are two lines that name the program
as it was invoked."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metaug_fast.cli import compare, demo, train


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


@pytest.mark.parametrize("cli", [train, compare, demo], ids=lambda m: m.__name__)
def test_help_gives_every_option_a_text_and_its_default(cli, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    options = re.findall(r"^  (--[\w-]+)", out, re.M)
    assert len(options) >= 4 and out.count("(default:") == len(options), out
    if cli is train:
        assert all(a.help for a in train.build_parser()._actions), "an option of the trainer has no help text"


@pytest.mark.parametrize("invocation, prog", [
    ([sys.executable, "-m", "metaug_fast.cli.train"], "python -m metaug_fast.cli.train"),
    ([str(Path(sys.executable).parent / "metaug-train")], "metaug-train"),
])
def test_errors_are_short_and_name_the_program_as_invoked(invocation, prog):
    run = subprocess.run(invocation + ["--epochs", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"{prog}: error: argument --epochs: must be >= 1, got 0",
                                       f"(all options: {prog} --help)"]
