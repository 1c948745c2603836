"""The package as it is installed, not as the checkout is: the wheel and the sdist hold every module and
source (built here without extensions, in seconds; `make check-install` builds them with the extension and
smoke-tests them in fresh environments), the version has one source, and an extension built against
another torch is refused with one clear warning while the reference keeps working."""
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import metaug_fast
from tools import check_install

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    work = tmp_path_factory.mktemp("dists")
    src = check_install.copy_source(work / "src")
    dist = work / "dist"
    return (check_install.build(src, dist, "wheel", extensions=False),
            check_install.build(src, dist, "sdist", extensions=False))


def test_the_wheel_holds_every_module_of_the_tree(dists):
    wheel, _ = dists
    modules = check_install.wheel_modules(wheel)
    assert modules == check_install.source_modules()
    assert {"metaug_fast/losses/pml.py", "metaug_fast/kernels/label.py"} <= modules


def test_the_sdist_holds_every_source_whatever_was_built(dists):
    # Built with METAUG_NO_EXT=1, as on a machine without a compiler: the C++ and CUDA sources are there all
    # the same, so a GPU user who installs this sdist can build the CUDA extension.
    _, sdist = dists
    files = check_install.sdist_files(sdist)
    missing = check_install.expected_sdist_files() - files
    assert not missing, sorted(missing)
    assert {"csrc/cuda/label.cu", "csrc/cpu/label_rows.inc", "csrc/build_info.h"} <= files
    assert not any(f.endswith((".so", ".pyc")) for f in files)


def test_the_version_has_one_source():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on; the package supports 3.10

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "metaug_fast.__version__"}
    assert importlib.metadata.version("metaug_fast") == metaug_fast.__version__


def test_the_extension_records_the_torch_it_was_built_against():
    import torch

    from metaug_fast import _extension

    if "cpp" not in metaug_fast.available_backends():
        pytest.skip("C++ extension not built (METAUG_NO_EXT=1)")
    assert _extension.built_with(importlib.util.find_spec("metaug_fast._C").origin) == torch.__version__


_MISMATCH_CHILD = """
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import metaug_fast
import torch
import metaug_fast.functional as F
from metaug_fast import BackendUnavailableError
z, y = torch.randn(12, 8, dtype=torch.float64), torch.arange(6).repeat(2)
try:
    F.oucl_embeddings(z, y, backend="cpp")
    explicit = "ran"
except BackendUnavailableError as exc:
    explicit = str(exc)
auto = F.oucl_embeddings(z, y)
print(json.dumps(dict(
    file=metaug_fast.__file__, backends=metaug_fast.available_backends(), loaded="metaug_fast._C" in sys.modules,
    warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    reason=metaug_fast._backend.REGISTRY["cpp"].unavailable(), explicit=explicit,
    auto_equal=bool(torch.allclose(auto, F.oucl_embeddings(z, y, backend="reference"), rtol=0, atol=0)))))
"""


def test_an_extension_built_against_another_torch_is_refused_and_the_reference_runs(tmp_path):
    # A copy of the package whose _C says it was built against torch 0.0.1: it must not be loaded (a
    # mismatched ABI can crash instead of failing to import), the user is told once what to rebuild, the
    # C++ backend's reason says the same, and backend="auto" runs the reference.
    spec = importlib.util.find_spec("metaug_fast._C")
    if spec is None:
        pytest.skip("C++ extension not built (METAUG_NO_EXT=1)")
    from metaug_fast import _extension

    shutil.copytree(ROOT / "metaug_fast", tmp_path / "metaug_fast", ignore=shutil.ignore_patterns("__pycache__"))
    lib = tmp_path / "metaug_fast" / Path(spec.origin).name
    data = lib.read_bytes()
    built = _extension.built_with(spec.origin)
    record = _extension.MARKER + built.encode() + b";"
    assert data.count(record) == 1
    lib.write_bytes(data.replace(record, _extension.MARKER + b"0.0.1;"))

    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", _MISMATCH_CHILD], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(tmp_path))
    assert out["backends"] == ["reference"] and not out["loaded"]
    assert len(out["warnings"]) == 1, out["warnings"]
    for text in (out["warnings"][0], out["reason"], out["explicit"]):
        assert "built against torch 0.0.1" in text and "--no-build-isolation" in text, text
    assert "reference" in out["warnings"][0]
    assert out["auto_equal"]
