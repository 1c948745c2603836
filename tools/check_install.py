"""``make check-install``: metaug_fast as a user installs it, not as the test suite sees it (an editable
checkout). About 6 minutes here, most of it compiling the C++ extension twice:

1. a wheel (with the C++ extension) and an sdist, built from a clean copy of the source tree, whose files
   are compared with the tree's (every module of the package; all of csrc/ in the sdist);
2. the wheel installed into a fresh virtual environment and smoke-tested from outside the tree
   (tools/install_smoke.py: every module imported, one op per backend, one drop-in per peer library,
   the command lines);
3. the sdist installed into another fresh environment, which compiles the C++ extension from the unpacked
   sdist, then the same smoke test;
4. an editable install without extensions under the oldest setuptools that pyproject.toml allows, and
   ``import metaug_fast.kernels`` from outside the tree.

The fresh environments see this interpreter's packages through a ``.pth`` line (the same pinned torch and
the peer libraries, without a second 5 GB install) after their own site-packages, so the metaug_fast they
import is the one installed into them, and their own pip and setuptools do the installing (a new venv of
Python 3.11 brings setuptools 65, older than the 77 that reads a PEP 639 license). The smoke test checks
where metaug_fast was imported from.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import List, Set

ROOT = Path(__file__).resolve().parents[1]
# What a clean clone does not have: never copied into the build's source tree.
_NOT_SOURCE = {".git", ".venv", ".venv-gpu-stack", "build", "dist", "runs", ".benchmarks", ".pytest_cache",
               "__pycache__"}
# pyproject.toml's [build-system] minimum, installed in step 4.
OLDEST_SETUPTOOLS = "64.0.0"
# What an sdist must hold besides the package and csrc/.
SDIST_EXTRA = {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"}


def copy_source(dest: Path) -> Path:
    """A copy of the source tree without build outputs, virtual environments or compiled extensions."""
    def ignore(folder, names):
        return {n for n in names if n in _NOT_SOURCE or n.endswith((".so", ".pyc", ".egg-info"))}

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def build(src: Path, dist: Path, what: str, extensions: bool) -> Path:
    """Builds ``what`` ("wheel" or "sdist") from ``src`` into ``dist`` with this interpreter's torch and
    setuptools (no isolation, as the README says); returns the file."""
    env = {**os.environ, "METAUG_NO_EXT": "0" if extensions else "1", "METAUG_BUILD_CUDA": "0",
           "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    before = set(dist.glob("*")) if dist.exists() else set()
    _run([sys.executable, "-m", "build", f"--{what}", "--no-isolation", "--outdir", str(dist), str(src)], env=env)
    made = sorted(set(dist.glob("*")) - before)
    assert len(made) == 1, made
    return made[0]


def source_modules() -> Set[str]:
    """The package's modules in the source tree, as paths inside the package (``metaug_fast/x.py``)."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "metaug_fast").rglob("*.py")}


def wheel_modules(wheel: Path) -> Set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if n.startswith("metaug_fast/") and n.endswith(".py")}


def sdist_files(sdist: Path) -> Set[str]:
    """The sdist's files, relative to its top folder."""
    with tarfile.open(sdist) as t:
        return {m.name.split("/", 1)[1] for m in t.getmembers() if m.isfile() and "/" in m.name}


def expected_sdist_files() -> Set[str]:
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    return csrc | source_modules() | SDIST_EXTRA


def linked_venv(path: Path) -> Path:
    """A fresh virtual environment that also sees this interpreter's site-packages, after its own; returns
    its python."""
    _run([sys.executable, "-m", "venv", "--clear", str(path)])
    python = path / "bin" / "python"
    (Path(site_packages(python)) / "zz_parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def site_packages(python: Path) -> str:
    return _output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])


def smoke(python: Path, backends: List[str]) -> None:
    """tools/install_smoke.py with ``python``, from an empty folder outside the tree."""
    with tempfile.TemporaryDirectory() as cwd:
        _run([str(python), str(ROOT / "tools" / "install_smoke.py"), site_packages(python), ",".join(backends)],
             cwd=cwd, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})


def _run(cmd: List[str], **kw) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def _output(cmd: List[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "check-install",
                    help="work folder (emptied first)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    src, dist = copy_source(args.work / "src"), args.work / "dist"

    _step("1. the wheel and the sdist hold the whole package")
    wheel = build(src, dist, "wheel", extensions=True)
    sdist = build(src, dist, "sdist", extensions=False)
    missing = source_modules() - wheel_modules(wheel)
    assert not missing, f"the wheel lacks {sorted(missing)}"
    missing = expected_sdist_files() - sdist_files(sdist)
    assert not missing, f"the sdist lacks {sorted(missing)}"
    with zipfile.ZipFile(wheel) as z:
        assert any(n.startswith("metaug_fast/_C.") and n.endswith(".so") for n in z.namelist()), "no _C in the wheel"
    print(f"{wheel.name}: {len(wheel_modules(wheel))} modules and _C; {sdist.name}: {len(sdist_files(sdist))} files")

    _step("2. the wheel in a fresh environment")
    python = linked_venv(args.work / "venv-wheel")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    smoke(python, ["reference", "cpp"])

    _step("3. the sdist in a fresh environment (compiles the C++ extension from it)")
    python = linked_venv(args.work / "venv-sdist")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(sdist)],
         env={**os.environ, "METAUG_BUILD_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")})
    smoke(python, ["reference", "cpp"])

    _step(f"4. an editable install with setuptools {OLDEST_SETUPTOOLS}, the oldest pyproject.toml allows")
    python = linked_venv(args.work / "venv-oldest")
    _run([str(python), "-m", "pip", "install", "-q", f"setuptools=={OLDEST_SETUPTOOLS}"])
    used = _output([str(python), "-c", "import setuptools; print(setuptools.__version__)"])
    assert used == OLDEST_SETUPTOOLS, f"setuptools {used} would build, not {OLDEST_SETUPTOOLS}"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(src)],
         env={**os.environ, "METAUG_NO_EXT": "1"})
    with tempfile.TemporaryDirectory() as cwd:
        where = _output([str(python), "-c", "import metaug_fast.kernels; print(metaug_fast.kernels.__file__)"],
                        cwd=cwd)
        assert where.startswith(str(src)), where
        print(f"import metaug_fast.kernels: {where}")
    print(f"\ncheck-install passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
