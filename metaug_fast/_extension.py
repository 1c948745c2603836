"""Loading the compiled extensions (``metaug_fast._C``, ``metaug_fast._C_cuda``) safely.

An extension compiled against one torch and loaded under another can fail with an undefined symbol or,
worse, load and crash later, since torch promises no ABI between versions. Each library therefore carries
the torch version it was built against (``csrc/build_info.h``), read here from the file *before* the
library is loaded; a mismatch is reported as :class:`TorchMismatchError`, with the command that rebuilds.
"""
from __future__ import annotations

import importlib
import importlib.util
import mmap
import os
from types import ModuleType
from typing import Optional

import torch

MARKER = b"metaug_fast:built-with-torch="

REBUILD = ("rebuild it against this torch: `pip install --no-build-isolation --no-deps --force-reinstall "
           "metaug_fast` from its source (an sdist or a checkout; `pip install -e . --no-build-isolation` in a "
           "checkout)")


class TorchMismatchError(ImportError):
    """The extension was compiled against another torch than the one in this process."""


def built_with(path: str) -> Optional[str]:
    """The torch version recorded in the library at ``path``; None for a library without the record."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(MARKER)
        if start < 0:
            return None
        start += len(MARKER)
        end = data.find(b";", start, start + 128)
        return data[start:end].decode("ascii", "replace") if end >= 0 else None


def load(name: str) -> ModuleType:
    """Imports ``metaug_fast.<name>`` after checking the torch it was built against.

    Raises:
        ImportError: it is not built.
        TorchMismatchError: it was built against another torch (it is then not loaded at all).
    """
    full = f"{__package__}.{name}"
    spec = importlib.util.find_spec(full)
    if spec is None or spec.origin is None:
        raise ImportError(f"{full} is not built")
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.dirname(os.path.abspath(spec.origin)) != here:
        # An import hook of another copy's editable install can hand over that copy's build.
        raise ImportError(f"{full} is not built in {here} (the one found, {spec.origin}, belongs to another copy "
                          "of metaug_fast)")
    version = built_with(spec.origin)
    if version is None:
        raise TorchMismatchError(f"{full} ({spec.origin}) does not record the torch it was built against (built "
                                 f"by an older metaug_fast?); {REBUILD}")
    if version != torch.__version__:
        raise TorchMismatchError(f"{full} was built against torch {version}, but this process runs torch "
                                 f"{torch.__version__}; {REBUILD}")
    return importlib.import_module(full)
