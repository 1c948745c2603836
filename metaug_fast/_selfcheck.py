"""The self-check behind ``backend="auto"`` on a GPU (docs/gpu-status.md#auto-backend).

A fused GPU backend (Triton, CUDA) is picked by ``auto`` only after it has passed, in this process, a small
check against the reference on the device, dtype and mode family (score or label) of the call: weighted
OUCL and InfoNCE, loss and gradients in the call's dtype, and a Hessian-vector product in fp32 (fp64 for
fp64), at a size with interior tiles. Within the documented bounds (docs/accuracy.md#accuracy) it is used
from then on; otherwise ``auto`` warns once, naming the check that failed, and runs the next candidate (in
the end the reference). The check costs a few milliseconds after the kernels compile, once per process and
(device, dtype, family); the verdicts can be kept on disk.

Environment:
    ``METAUG_SELF_CHECK``: ``run`` (the default), ``skip`` (trust the fused backend without checking), or
    ``force`` (check again even when a verdict is on disk).
    ``METAUG_SELF_CHECK_CACHE``: a folder; the verdicts are kept there, keyed by the device's name and
    compute capability and the versions of torch, Triton and metaug_fast.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

MODE_ENV = "METAUG_SELF_CHECK"
CACHE_ENV = "METAUG_SELF_CHECK_CACHE"
MODES = ("run", "skip", "force")
FAMILIES = {"oucl": "score", "info_nce": "score", "margin_statistics": "score", "margin_injection_loss": "score",
            "oucl_embeddings": "label", "info_nce_embeddings": "label", "margin_statistics_embeddings": "label",
            "symmetric_info_nce": "label", "pairwise_similarity": "label", "label_kernels": "label"}
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-52}
# fp32/fp64 bounds of the contract suite (relative to each output's largest entry); half dtypes are held to
# twice the reference's own error in that dtype plus one ulp.
FIRST_ORDER_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
HVP_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}

_VERDICTS: Dict[Tuple[str, str, str, str], Optional[str]] = {}
_WARNED: set = set()


def passes(backend, device: torch.device, dtype: Optional[torch.dtype], op: str) -> bool:
    """Whether ``auto`` may run ``op`` on ``backend`` for tensors of ``dtype`` on ``device``: its check ran
    (or was read from disk) and passed. Warns once per failed check."""
    mode = os.environ.get(MODE_ENV, "run").strip() or "run"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {mode!r}")
    if mode == "skip":
        return True
    dtype = dtype if dtype in ULP else torch.float32
    key = (backend.name, str(device), str(dtype).replace("torch.", ""), FAMILIES[op])
    if key not in _VERDICTS:
        stored = None if mode == "force" else _disk_verdict(key, device)
        _VERDICTS[key] = stored[0] if stored is not None else _store(key, device, run_check(backend, device, dtype,
                                                                                             FAMILIES[op]))
    failure = _VERDICTS[key]
    if failure is not None and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"backend='auto' is not using the {backend.name} backend for {key[3]} mode in {key[2]} on "
                      f"{device}: its self-check failed ({failure}). The reference implementation runs instead; "
                      f"please report this with the GPU's name. {MODE_ENV}=skip uses {backend.name} anyway.",
                      RuntimeWarning, stacklevel=4)
    return failure is None


def clear() -> None:
    """Forgets this process's verdicts and warnings (tests, or after changing the environment)."""
    _VERDICTS.clear()
    _WARNED.clear()


# ------------------------------------------------------------------------------------------------ the check
def run_check(backend, device: torch.device, dtype: torch.dtype, family: str) -> Optional[str]:
    """None when ``backend`` passes every case of ``family`` on ``device`` in ``dtype``; else what failed."""
    try:
        for name, fn, inputs in _cases(family, device):
            problem = (_first_order(fn, inputs, backend.name, dtype)
                       or _second_order(fn, inputs, backend.name, dtype, family))
            if problem:
                return f"{name}: {problem}"
    except Exception as exc:  # noqa: BLE001 (a backend that raises fails its check; the message says how)
        return f"raised {type(exc).__name__}: {str(exc)[:200]}"
    return None


def _sizes(device: torch.device):
    """Label rows and width, score rows and columns: interior tiles on a GPU (Triton's default label tiles
    are 128 × 64, score blocks 16 rows × 128-512 columns); a few 16 × 16 tiles in Triton's interpreter."""
    if device.type == "cuda":
        return (160, 64), (64, 3, 700)
    return (12, 16), (8, 3, 40)


def _cases(family: str, device: torch.device) -> List[Tuple[str, Callable, Tuple[Tensor, ...]]]:
    """(name, backend name -> function of the inputs, fp64 inputs on ``device``) per case."""
    import metaug_fast.functional as F

    gen = torch.Generator().manual_seed(0)
    (n, d), (b, kp, kn) = _sizes(device)
    if family == "label":
        z = torch.randn(n, d, generator=gen, dtype=torch.float64)
        emb = torch.cat([z, z + 0.1 * torch.randn(n, d, generator=gen, dtype=torch.float64)]).to(device)
        labels = torch.arange(n, device=device).repeat(2)
        return [("label weighted", lambda be: lambda e: F.oucl_embeddings(e, labels, backend=be), (emb,)),
                ("label InfoNCE", lambda be: lambda e: F.info_nce_embeddings(e, labels, backend=be), (emb,))]
    pos = (0.6 + 0.35 * torch.rand(b, kp, generator=gen, dtype=torch.float64)).to(device)
    neg = (0.4 + 0.5 * torch.rand(b, kn, generator=gen, dtype=torch.float64)).to(device)
    return [("score weighted", lambda be: lambda p, q: F.oucl(p, q, backend=be), (pos, neg)),
            ("score InfoNCE", lambda be: lambda p, q: F.info_nce(p, q, backend=be), (pos, neg))]


def rel_err(x: Tensor, ref: Tensor) -> float:
    """max |x - ref| / max |ref|."""
    x, ref = x.double(), ref.double()
    return (x - ref).abs().max().item() / max(ref.abs().max().item(), 1e-300)


def outputs(fn: Callable, inputs, order: int) -> List[Tensor]:
    """(loss, gradients) or (loss, gradients, Hessian-vector products along fixed directions)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*xs)
    grads = torch.autograd.grad(loss, xs, create_graph=order > 1)
    if order == 1:
        return [loss.detach(), *grads]
    gen = torch.Generator().manual_seed(1)
    vecs = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x) for x in xs]
    hvs = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vecs)), xs)
    return [loss.detach(), *(g.detach() for g in grads), *hvs]


def low_precision_bounds(own: List[Tensor], exact: List[Tensor], dtype: torch.dtype) -> List[float]:
    """The documented bound of each fp16/bf16 output (docs/accuracy.md#accuracy): twice the error of the
    reference's own output in that dtype (``own``) against fp64 (``exact``), plus one ulp."""
    return [2 * rel_err(r, w) + ULP[dtype] for r, w in zip(own, exact)]


def _compare(got: List[Tensor], exact: List[Tensor], bounds: List[float], order: int) -> Optional[str]:
    names = ["loss"] + ["gradient"] * ((len(got) - 1) // order) + ["Hessian-vector product"] * (
        (len(got) - 1) // order if order > 1 else 0)
    for name, g, w, bound in zip(names, got, exact, bounds):
        if not bool(torch.isfinite(g).all()) and bool(torch.isfinite(w).all()):
            return f"{name} not finite"
        err = rel_err(g, w)
        if not err <= bound:
            return f"{name} relative error {err:.3g} > {bound:.3g}"
    return None


def _first_order(fn, inputs, name: str, dtype: torch.dtype) -> Optional[str]:
    low = tuple(x.to(dtype) for x in inputs)
    exact = outputs(fn("reference"), tuple(x.double() for x in low), 1)
    got = outputs(fn(name), low, 1)
    if dtype in FIRST_ORDER_TOL:
        bounds = [FIRST_ORDER_TOL[dtype]] * len(got)
    else:
        bounds = low_precision_bounds(outputs(fn("reference"), low, 1), exact, dtype)
    problem = _compare(got, exact, bounds, 1)
    return f"{problem} in {str(dtype).replace('torch.', '')}" if problem else None


def _second_order(fn, inputs, name: str, dtype: torch.dtype, family: str) -> Optional[str]:
    """The Hessian-vector products: in fp32 (fp64 for fp64), or for label mode in bf16 itself, whose second
    derivative keeps bf16 rows on the tensor cores, held like the first order to the reference's own error."""
    if family == "label" and dtype == torch.bfloat16:
        low = tuple(x.to(dtype) for x in inputs)
        exact = outputs(fn("reference"), tuple(x.double() for x in low), 2)
        bounds = low_precision_bounds(outputs(fn("reference"), low, 2), exact, dtype)
        problem = _compare(outputs(fn(name), low, 2), exact, bounds, 2)
        return f"{problem} in bfloat16" if problem else None
    hdtype = torch.float64 if dtype == torch.float64 else torch.float32
    xs = tuple(x.to(hdtype) for x in inputs)
    exact = outputs(fn("reference"), tuple(x.double() for x in xs), 2)
    got = outputs(fn(name), xs, 2)
    problem = _compare(got, exact, [HVP_TOL[hdtype]] * len(got), 2)
    return f"{problem} in {str(hdtype).replace('torch.', '')}" if problem else None


# ------------------------------------------------------------------------------------- verdicts on disk
def _cache_file() -> Optional[Path]:
    folder = os.environ.get(CACHE_ENV, "").strip()
    return Path(folder) / "self_check.json" if folder else None


def _disk_key(key, device: torch.device) -> str:
    import metaug_fast

    where = str(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        where = f"{p.name} sm_{p.major}{p.minor}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return "|".join((*key[:1], where, *key[2:], f"torch {torch.__version__}", f"triton {triton_version}",
                     f"metaug_fast {metaug_fast.__version__}"))


def _disk_verdict(key, device) -> Optional[Tuple[Optional[str]]]:
    """(verdict,) as stored (None inside means passed), or None when nothing is stored."""
    path = _cache_file()
    if path is None or not path.exists():
        return None
    stored = json.loads(path.read_text()).get(_disk_key(key, device), "absent")
    return None if stored == "absent" else (stored,)


def _store(key, device, verdict: Optional[str]) -> Optional[str]:
    path = _cache_file()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[_disk_key(key, device)] = verdict
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: processes sharing the folder never read half a file
    return verdict
