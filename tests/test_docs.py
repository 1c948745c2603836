"""The documentation: every citation resolves, nothing cites a document outside the repository, every public
name has its shapes and an example that runs, and the site builds strictly."""
import doctest
import fnmatch
import importlib
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = ("*.py", "*.h", "*.cuh", "*.cu", "*.cpp", "*.inc", "*.md", "*.sh", "*.yml", "*.toml", "Makefile")


def _sources():
    """The project's own files: not its build outputs, nor hidden folders (.git, and every virtual environment
    the Makefile makes: .venv, .venv-gpu-stack), which are not even walked."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("build", "site"))
        yield from (Path(folder) / f for f in sorted(files) if any(fnmatch.fnmatch(f, p) for p in PATTERNS))


SOURCES = list(_sources())
CITATION = re.compile(r"docs/([\w/.-]+\.md)#([\w-]+)")
MD_LINK = re.compile(r"\]\(([^)\s]+\.md)(?:#([\w-]+))?\)")


def _anchors(page: Path) -> set:
    return set(re.findall(r"\{#([\w-]+)\}", page.read_text()))


def test_every_cited_anchor_exists():
    cited = 0
    for path in SOURCES:
        for page, anchor in CITATION.findall(path.read_text(errors="ignore")):
            target = ROOT / "docs" / page
            assert target.is_file(), f"{path.relative_to(ROOT)} cites docs/{page}, which does not exist"
            assert anchor in _anchors(target), f"{path.relative_to(ROOT)} cites docs/{page}#{anchor}: no such anchor"
            cited += 1
    assert cited >= 20  # the code's citations are found (the pattern matches)


def test_links_between_pages_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target, anchor in MD_LINK.findall(page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.is_file(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor:
                assert anchor in _anchors(path), f"{page.relative_to(ROOT)} links to {target}#{anchor}: no such anchor"


def test_nothing_cites_a_document_outside_the_repository():
    outside = re.compile(r"\.\./shared|SPEC\.md|DESIGN\.md")
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if p.name != "test_docs.py"
                 and outside.search(p.read_text(errors="ignore"))]
    assert offenders == []


# Every public name: (module, attribute, takes tensors). The reference pages render these modules.
PUBLIC = [
    ("metaug_fast", "OUCLLoss", True), ("metaug_fast", "available_backends", False),
    *[("metaug_fast.functional", n, True) for n in importlib.import_module("metaug_fast.functional").__all__],
    ("metaug_fast.losses.pml", "CircleLoss", True), ("metaug_fast.losses.pml", "NTXentLoss", True),
    ("metaug_fast.losses.open_clip", "ClipLoss", True), ("metaug_fast.losses.lightly", "NTXentLoss", True),
    ("metaug_fast.losses.official", "CircleLoss", True), ("metaug_fast.large_batch", "cached_backward", True),
    ("metaug_fast.metaug", "MetAugConfig", False), ("metaug_fast.metaug", "MetAugStep", True),
    ("metaug_fast.metaug", "MemoryBank", True), ("metaug_fast.metaug", "ShardedMemoryBank", True),
    ("metaug_fast.metaug", "MetaFeatureAugmenter", True), ("metaug_fast.metaug.trainer", "TrainConfig", False),
    ("metaug_fast.metaug.trainer", "Trainer", False),
    *[("metaug_fast.distributed", n, n not in ("shutdown",))
      for n in importlib.import_module("metaug_fast.distributed").__all__],
]


def _one_rank_group(tmp_path):
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                                timeout=timedelta(seconds=60))


@pytest.mark.parametrize("module, name, tensors", PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_public_name_has_shapes_and_a_running_example(module, name, tensors, tmp_path, monkeypatch):
    obj = getattr(importlib.import_module(module), name)
    doc = obj.__doc__ or ""
    assert "Example" in doc and ">>>" in doc, f"{module}.{name} has no example"
    if tensors:
        assert re.search(r"\[[A-Za-z]", doc), f"{module}.{name} does not give its tensors' shapes"
    if "cpp" not in __import__("metaug_fast").available_backends() and "ring" in name:
        pytest.skip("the ring needs the C++ extension")
    monkeypatch.chdir(tmp_path)
    distributed = module.startswith("metaug_fast.distributed") or name == "ShardedMemoryBank"
    if distributed:
        _one_rank_group(tmp_path)
    try:
        torch.manual_seed(0)
        finder = doctest.DocTestFinder(recurse=False)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        for test in finder.find(obj, name, globs={}):
            result = runner.run(test, out=lambda s: sys.stdout.write(s))
            assert result.failed == 0, f"the example of {module}.{name} fails (output above)"
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_the_site_builds_strictly(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=280,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "functional" / "index.html").is_file()
