"""Results do not move with torch's global matmul precision flags. Training scripts commonly set
``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``; on a GPU
that turns every fp32 ``torch.mm`` into TF32 (10 mantissa bits, about 1e-3 relative), the whole tolerance of
an fp32 Hessian-vector product. The fused backends pin their own GEMMs instead: the CUDA backend's go to
cuBLAS with a pedantic compute type (csrc/cuda/gemm.h), the second derivative's chunks to Triton's IEEE GEMM
on CUDA (kernels/matmul.py), the Triton kernels' dots say IEEE.

On the CPU of this project's CI the flags change nothing (its fp32 GEMM has no reduced-precision mode without
bf16 matrix units), so there these tests check only that flipping them is harmless; they decide on a GPU,
where they run for the Triton and CUDA backends (bench/gpu_check.sh)."""
import os

import pytest
import torch

import metaug_fast
import metaug_fast.functional as F

from helpers import hvp, label_data


def _cases():
    """(device, backend) pairs, each skipped where it cannot run; the CUDA ones marked ``gpu``. The ids
    exist everywhere: the GPU check selects them by name and marker."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    gpu = torch.cuda.is_available() and not interpreting
    runs = {("cpu", "cpp"): "cpp" in metaug_fast.available_backends(), ("cpu", "triton"): interpreting,
            ("cuda", "triton"): gpu and "triton" in metaug_fast.available_backends(),
            ("cuda", "cuda"): gpu and "cuda" in metaug_fast.available_backends()}
    return [pytest.param(*case, marks=[pytest.mark.skipif(not ok, reason=f"{case[1]} on {case[0]} is not here")]
                         + ([pytest.mark.gpu] if case[0] == "cuda" else []))
            for case, ok in runs.items()]


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()


def _restore(saved):
    torch.backends.cuda.matmul.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("op", ["weighted", "info_nce"])
def test_label_mode_with_tf32_flags_matches_ieee(device, backend, op):
    B, M, D = (40, 70, 16) if device == "cpu" else (700, 1300, 128)
    emb, labels, ref, ref_labels = (None if x is None else x.to(device)
                                    for x in label_data(B, M, D, dtype=torch.float32))

    def loss(e, r):
        if op == "info_nce":
            return F.info_nce_embeddings(e, labels, r, ref_labels, temperature=0.05, backend=backend).sum()
        return F.oucl_embeddings(e, labels, r, ref_labels, form=op, beta=64.0, backend=backend).sum()

    vecs = (torch.randn_like(emb), torch.randn_like(ref))
    saved = _flags()
    runs = []
    try:
        for setting in ("ieee", "allow_tf32", "high"):
            _restore(saved)
            if setting == "allow_tf32":
                torch.backends.cuda.matmul.allow_tf32 = True
            elif setting == "high":
                torch.set_float32_matmul_precision("high")
            loss_value, grads, hv = hvp(loss, (emb.clone().requires_grad_(), ref.clone().requires_grad_()), vecs)
            runs.append((loss_value,) + grads + hv)
    finally:
        _restore(saved)
    for setting, run in zip(("allow_tf32", "high"), runs[1:]):
        for got, want in zip(run, runs[0]):
            scale = want.abs().max().clamp_min(1e-30)
            torch.testing.assert_close(got / scale, want / scale, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{backend} on {device} under {setting}: {m}")
