"""Backend selection: available_backends, auto, METAUG_BACKEND, and clear errors."""
import re

import pytest
import torch

import metaug_fast
import metaug_fast.functional as F
from metaug_fast import _backend

from conftest import requires_cpp

P, N = torch.rand(4, 3), torch.rand(4, 5)


def test_available_backends_lists_reference_first():
    names = metaug_fast.available_backends()
    assert names[0] == "reference" and set(names) <= set(_backend.REGISTRY)


@requires_cpp
def test_auto_picks_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("METAUG_BACKEND", raising=False)
    assert _backend.resolve("oucl", "auto", torch.device("cpu")) is _backend.REGISTRY["cpp"].impls["oucl"]
    # An op the C++ backend does not provide runs on reference.
    assert _backend.resolve("margin_injection_loss", "auto",
                            torch.device("cpu")) is metaug_fast.reference.margin_injection_loss


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("METAUG_BACKEND", "reference")
    assert _backend.resolve("oucl", "auto", torch.device("cpu")) is metaug_fast.reference.oucl
    monkeypatch.setenv("METAUG_BACKEND", "bogus")
    with pytest.raises(ValueError, match="METAUG_BACKEND"):
        F.oucl(P, N)
    monkeypatch.setenv("METAUG_BACKEND", "triton")
    assert _backend.resolve("oucl", "auto", torch.device("cpu")) is _backend.REGISTRY["triton"].impls["oucl"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no GPU here: Triton only runs in its interpreter
    with pytest.raises(metaug_fast.BackendUnavailableError, match="METAUG_BACKEND='triton'.*TRITON_INTERPRET"):
        F.oucl(P, N)


def test_explicit_backend_never_falls_back(monkeypatch):
    monkeypatch.delenv("METAUG_BACKEND", raising=False)
    if "cuda" not in metaug_fast.available_backends():
        with pytest.raises(metaug_fast.BackendUnavailableError, match="backend='cuda'"):
            F.oucl(P, N, backend="cuda")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(metaug_fast.BackendUnavailableError, match="backend='triton': no CUDA device"):
            F.oucl(P, N, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(ValueError, match="CUDA tensors .or CPU tensors under TRITON_INTERPRET=1. only"):
            F.oucl(P.to("meta"), N.to("meta"), backend="triton")
    if "cpp" in metaug_fast.available_backends():
        with pytest.raises(metaug_fast.BackendUnavailableError, match="does not implement margin_injection_loss"):
            F.margin_injection_loss(P, N, P[:, 0], P[:, 0], backend="cpp")
        with pytest.raises(ValueError, match="CPU tensors only"):
            F.oucl(P.to("meta"), N.to("meta"), backend="cpp")


def test_label_kernels_honour_an_explicit_backend(monkeypatch):
    # Ring mode, sharded scoring and the benches run a backend's label ops themselves: they take them through
    # the same selection as every op, so an explicit backend is used or refused, never replaced by another's
    # (OUCLLoss(backend="reference", distributed="ring") once ran the C++ kernels).
    monkeypatch.delenv("METAUG_BACKEND", raising=False)
    cpu = torch.device("cpu")
    having = sorted(name for name, b in _backend.REGISTRY.items() if b.kernels is not None)
    with pytest.raises(metaug_fast.BackendUnavailableError,
                       match=re.escape(f"backend='reference' has no fused label kernels; backends that do: {having}")):
        _backend.label_kernels("reference", cpu)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        _backend.label_kernels("bogus", cpu)
    for name in metaug_fast.available_backends():
        b = _backend.REGISTRY[name]
        if b.kernels is not None and b.runs_on(cpu):
            assert _backend.label_kernels(name, cpu) is b.kernels
    if "cpp" in metaug_fast.available_backends():
        assert _backend.label_kernels("auto", cpu) is _backend.REGISTRY["cpp"].kernels
        monkeypatch.setenv("METAUG_BACKEND", "triton")
        assert _backend.label_kernels("auto", cpu) is _backend.REGISTRY["triton"].kernels
        monkeypatch.setenv("METAUG_BACKEND", "reference")
        with pytest.raises(metaug_fast.BackendUnavailableError, match="no backend runs the fused label kernels"):
            _backend.label_kernels("auto", cpu)
    if "cuda" not in metaug_fast.available_backends():
        with pytest.raises(metaug_fast.BackendUnavailableError, match="backend='cuda'"):
            _backend.label_kernels("cuda", cpu)


def test_missing_extension_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(metaug_fast.backends.cpp, "ERROR", ImportError("libfoo.so missing"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.available_backends() == ["reference"]
    with pytest.raises(metaug_fast.BackendUnavailableError, match="pip install -e . --no-build-isolation"):
        F.oucl(P, N, backend="cpp")
    # auto still works, on reference
    monkeypatch.delenv("METAUG_BACKEND", raising=False)
    torch.testing.assert_close(F.oucl(P, N), metaug_fast.reference.oucl(P, N))


def test_auto_takes_a_gpu_backend_only_after_its_self_check(monkeypatch):
    # For CUDA tensors auto tries triton, then cuda, each only if its self-check passes for the call's
    # device, dtype and op (tests/test_selfcheck.py runs the real check); otherwise the reference.
    import dataclasses

    monkeypatch.delenv("METAUG_BACKEND", raising=False)
    asked = []
    for verdict in (False, True):
        def check(b, d, t, op, v=verdict):
            return asked.append((b.name, t, op)) or v

        registry = {name: dataclasses.replace(b, unavailable=lambda: None, self_check=check)
                    if name in ("triton", "cuda") else b for name, b in _backend.REGISTRY.items()}
        monkeypatch.setattr(_backend, "REGISTRY", registry)
        chosen = _backend.resolve("oucl", "auto", torch.device("cuda"), torch.bfloat16)
        want = registry["triton"].impls["oucl"] if verdict else metaug_fast.reference.oucl
        assert chosen is want
    assert asked == [("triton", torch.bfloat16, "oucl"), ("cuda", torch.bfloat16, "oucl"),
                     ("triton", torch.bfloat16, "oucl")]


def test_every_registered_backend_has_a_contract_entry():
    # A new backend is its kernels, its record and one entry in tests/backends.py: without the entry the
    # contract grid would never run it.
    from backends import ENTRIES

    missing = set(_backend.REGISTRY) - {name for name, *_ in ENTRIES}
    assert not missing, f"backends without an entry in tests/backends.py: {sorted(missing)}"


def test_a_backend_module_is_found_and_ranked_without_being_listed(monkeypatch, tmp_path):
    # A new backend is a new module in metaug_fast/backends: the package imports whatever modules it holds,
    # and the record's rank, not the order of discovery, says where auto tries it.
    import sys

    import metaug_fast.backends as package

    (tmp_path / "zz_stand_in.py").write_text(
        "from metaug_fast._backend import Backend, add\n"
        "BACKEND = add(Backend('stand_in', rank=15, where='nowhere', runs_on=lambda device: False,\n"
        "                      unavailable=lambda: 'a test stand-in'))\n")
    monkeypatch.setattr(_backend, "REGISTRY", dict(_backend.REGISTRY))
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "metaug_fast.backends.zz_stand_in", raising=False)
    try:
        package.import_all()
        assert list(_backend.REGISTRY) == ["reference", "cpp", "stand_in", "triton", "cuda"]
        assert "stand_in" not in metaug_fast.available_backends()
    finally:
        sys.modules.pop("metaug_fast.backends.zz_stand_in", None)


def test_two_backends_cannot_share_a_rank(monkeypatch):
    monkeypatch.setattr(_backend, "REGISTRY", dict(_backend.REGISTRY))
    with pytest.raises(ValueError, match="'other' has rank 10, already 'cpp'"):
        _backend.add(_backend.Backend("other", rank=10, where="nowhere", runs_on=lambda device: False,
                                      unavailable=lambda: None))
