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


# ------------------------------------------------------------------------------ the guides' code and commands
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
BLOCKS = [(page.relative_to(ROOT).as_posix(), n, lang, body) for page in PAGES
          for n, (lang, body) in enumerate(BLOCK.findall(page.read_text()), 1)]
PYTHON = [b for b in BLOCKS if b[2] == "python"]
TRAIN = re.compile(r"(?:python -m|torchrun .*?-m) metaug_fast\.cli\.train\b(?P<args>[^#\n]*)(?P<comment>#.*)?")


@pytest.mark.parametrize("page, n, lang, body", PYTHON, ids=[f"{p}#{n}" for p, n, _, _ in PYTHON])
def test_every_python_block_runs_as_written(page, n, lang, body, tmp_path, monkeypatch):
    # Each block on its own, in a fresh namespace: whatever it needs, it imports or defines itself.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(body, f"{page} (block {n})", "exec"), {"__name__": "__docs__"})


def test_every_training_command_parses_and_sets_its_epochs():
    # The trainer's default is the paper's 300 epochs: a command that leaves it says so in its comment.
    from metaug_fast.cli.train import build_parser

    commands = [(page, line.strip()) for page, _, lang, body in BLOCKS if lang == "bash"
                for line in body.replace("\\\n", " ").splitlines() if TRAIN.search(line)]
    assert len(commands) >= 6
    for page, line in commands:
        m = TRAIN.search(line)
        args = m["args"].split()
        preset = args[args.index("--preset") + 1] if "--preset" in args else "default"
        build_parser(preset).parse_args(args)  # exits (and fails the test) on an unknown option or value
        assert "--epochs" in args or "--resume" in args or "300 epochs" in (m["comment"] or ""), (page, line)
        assert m["comment"], f"{page}: `{line}` does not say how long it runs"
