"""What `ruff check` (run by `make test` before pytest) cannot ask: every ``noqa`` in the tree names the rule it
silences and says on its line why the rule does not apply there."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOQA = re.compile(r"#\s*noqa\b(?P<rest>.*)$")
REASONED = re.compile(r":\s*[A-Z]+[0-9]+(,\s*[A-Z]+[0-9]+)*\s+\S")  # ": E402  (why)"


def test_every_noqa_names_its_rule_and_says_why():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    bare = [f"{name}:{number}: {line.strip()}" for name in files
            for number, line in enumerate((ROOT / name).read_text().splitlines(), 1)
            if (m := NOQA.search(line)) and not REASONED.match(m.group("rest"))]
    assert files and not bare, "\n".join(bare)


def test_the_pattern_tells_a_reason_from_none():
    reasoned, bare = "x = 1  # noqa: F401  (the import registers it)", ["x = 1  # noqa", "x = 1  # noqa: E402"]
    assert REASONED.match(NOQA.search(reasoned).group("rest"))
    assert not any(REASONED.match(NOQA.search(line).group("rest")) for line in bare)
