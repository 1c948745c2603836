"""backend="auto" on a GPU: a fused backend is used once its self-check against the reference has passed
(metaug_fast/_selfcheck.py). Without a GPU, Triton's interpreter stands in: the Triton backend's record is
made an ``auto`` candidate for CPU tensors, ahead of the C++ one, and a kernel is broken on purpose."""
import dataclasses
import warnings

import pytest
import torch

import metaug_fast
import metaug_fast.functional as F
from metaug_fast import _backend, _selfcheck

pytestmark = pytest.mark.skipif("triton" not in metaug_fast.available_backends(),
                                reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)")


@pytest.fixture
def triton_first(monkeypatch):
    """The registry as a GPU process sees it, with CPU tensors standing in for CUDA ones; returns the calls
    made to the Triton label op through ``auto``."""
    calls = []
    triton = _backend.REGISTRY["triton"]

    def counted(*args, **kwargs):
        calls.append(1)
        return triton.impls["oucl_embeddings"](*args, **kwargs)

    stand_in = dataclasses.replace(triton, auto_on=("cpu",), impls={**triton.impls, "oucl_embeddings": counted})
    registry = {"triton": stand_in, **{k: v for k, v in _backend.REGISTRY.items() if k != "triton"}}
    monkeypatch.setattr(_backend, "REGISTRY", registry)
    monkeypatch.delenv(_selfcheck.MODE_ENV, raising=False)
    monkeypatch.delenv(_selfcheck.CACHE_ENV, raising=False)
    _selfcheck.clear()
    yield calls
    _selfcheck.clear()


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(20, 16, generator=gen, dtype=torch.float64), torch.arange(10).repeat(2)


def test_auto_uses_the_fused_backend_after_its_check_passes(triton_first):
    emb, labels = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = F.oucl_embeddings(emb, labels)
    assert list(_selfcheck._VERDICTS.values()) == [None]
    assert torch.allclose(value, F.oucl_embeddings(emb, labels, backend="reference"), rtol=1e-10)
    triton_first.clear()  # the check itself calls the backend explicitly; from here only auto's calls count
    F.oucl_embeddings(emb, labels)
    assert len(triton_first) == 1, "auto did not run the Triton backend, or checked it again"


@pytest.mark.parametrize("broken", ["gradient", "hvp"])
def test_a_broken_kernel_is_caught_and_auto_falls_back_with_one_warning(triton_first, monkeypatch, broken):
    # Broken where a kernel is: the backward kernels' per-row factors are scaled by 1 + 1e-3 (first-order
    # break), or the fused second-derivative op returns a product off by 1 + 1e-2.
    from metaug_fast.kernels import label as K

    if broken == "gradient":
        real = K.grad_factors
        monkeypatch.setattr(K, "grad_factors", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    else:  # the backend's ops namespace hands out a broken op
        from metaug_fast._ops.score import TRITON_OPS

        real, lookup = TRITON_OPS.oucl_label_hvp, type(TRITON_OPS).__getattr__
        broken_op = lambda *a, **k: tuple(x * (1 + 1e-2) for x in real(*a, **k))
        monkeypatch.setattr(type(TRITON_OPS), "__getattr__",
                            lambda self, name: broken_op if name == "oucl_label_hvp" else lookup(self, name))
    emb, labels = _data()
    with pytest.warns(RuntimeWarning, match="self-check failed") as caught:
        value = F.oucl_embeddings(emb, labels)
    message = str(caught[0].message)
    assert ("gradient relative error" if broken == "gradient" else "Hessian-vector product") in message, message
    assert "label" in message and "float64" in message
    assert torch.allclose(value, F.oucl_embeddings(emb, labels, backend="reference"), rtol=0, atol=0)
    triton_first.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (backend, device, dtype, family)
        F.oucl_embeddings(emb, labels)
    assert not triton_first, "auto ran the broken backend"


def test_skip_trusts_the_backend_and_bad_values_are_refused(triton_first, monkeypatch):
    emb, labels = _data()
    monkeypatch.setenv(_selfcheck.MODE_ENV, "skip")
    F.oucl_embeddings(emb, labels)
    assert len(triton_first) == 1 and not _selfcheck._VERDICTS
    monkeypatch.setenv(_selfcheck.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="METAUG_SELF_CHECK must be one of"):
        F.oucl_embeddings(emb, labels)


def test_verdicts_kept_on_disk_when_asked(triton_first, monkeypatch, tmp_path):
    emb, labels = _data()
    monkeypatch.setenv(_selfcheck.CACHE_ENV, str(tmp_path))
    F.oucl_embeddings(emb, labels)
    stored = (tmp_path / "self_check.json").read_text()
    assert "triton|cpu|float64|label|torch " in stored and "metaug_fast " in stored
    checks = []
    monkeypatch.setattr(_selfcheck, "run_check", lambda *a: checks.append(a) or None)
    _selfcheck.clear()
    F.oucl_embeddings(emb, labels)
    assert not checks, "a stored verdict is read, not checked again"
    monkeypatch.setenv(_selfcheck.MODE_ENV, "force")
    _selfcheck.clear()
    F.oucl_embeddings(emb, labels)
    assert len(checks) == 1, "force checks again"


def test_the_cpu_path_runs_no_check():
    # The C++ backend, auto's choice for CPU tensors, has no self-check: nothing changes for CPU users.
    assert _backend.REGISTRY["cpp"].self_check is None
    assert _backend.REGISTRY["triton"].auto_on == ("cuda",) and _backend.REGISTRY["cuda"].auto_on == ("cuda",)


def test_the_bf16_label_check_holds_the_tensor_core_hvp_to_its_bound(monkeypatch):
    # In bf16 the label family's second derivative is checked in bf16 itself (the fused kernels keep bf16
    # rows), against twice the reference's own bf16 error plus one ulp: the real kernels pass, and a product
    # off by 5% is caught.
    from metaug_fast._ops.score import TRITON_OPS

    triton = _backend.REGISTRY["triton"]
    cpu = torch.device("cpu")
    assert _selfcheck.run_check(triton, cpu, torch.bfloat16, "label") is None
    real, lookup = TRITON_OPS.oucl_label_hvp, type(TRITON_OPS).__getattr__
    broken = lambda *a, **k: tuple(x * 1.05 for x in real(*a, **k))
    monkeypatch.setattr(type(TRITON_OPS), "__getattr__",
                        lambda self, name: broken if name == "oucl_label_hvp" else lookup(self, name))
    verdict = _selfcheck.run_check(triton, cpu, torch.bfloat16, "label")
    assert verdict is not None and "Hessian-vector product" in verdict and "bfloat16" in verdict, verdict
