"""The command lines' shared parser: defaults shown in ``--help``, the program named as the user invoked it,
and errors in two lines (what is wrong, where the help is) instead of the whole usage first."""
from __future__ import annotations

import argparse
import os
import sys


def program(module: str) -> str:
    """``metaug-train`` when run as the console script, ``python -m metaug_fast.cli.train`` otherwise
    (``python -m`` and ``torchrun -m`` both leave the module's file in ``sys.argv[0]``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name.startswith("metaug-"):
        return name
    return f"python -m {module}"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` for ``module``'s command line (see the module docstring)."""

    def __init__(self, module: str, **kwargs) -> None:
        super().__init__(prog=program(module), formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(all options: {self.prog} --help)\n")
