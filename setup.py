"""Build metaug_fast: the Python package (found by setuptools' discovery, pyproject.toml), the C++ CPU
extension metaug_fast._C and, when a GPU is present or METAUG_BUILD_CUDA=1, the CUDA extension
metaug_fast._C_cuda.

Install with ``pip install -e . --no-build-isolation`` so the build uses the torch already installed.
``METAUG_NO_EXT=1`` skips the extensions: the package then runs on the reference backend.
``METAUG_CUDA_ONLY=1`` builds only the CUDA extension (``make check-cuda`` uses it to compile-check).
"""
import glob
import os

import setuptools
from setuptools import setup

LICENSE = "Apache-2.0"


def _license_metadata() -> dict:
    # A PEP 639 license expression is read from setuptools 77 on; older ones (down to the 64 that
    # pyproject.toml allows) take the same identifier as the legacy License field.
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": LICENSE} if major >= 77 else {"license": LICENSE}


def _want_cuda() -> bool:
    # METAUG_BUILD_CUDA=1 forces the CUDA extension, =0 skips it; unset, it is built where a GPU is present.
    flag = os.environ.get("METAUG_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    import torch

    return torch.cuda.is_available()


def _cuda_include_dirs():
    # pip's CUDA 13 runtime headers (needed by ATen/cuda/CUDAContext.h) live in nvidia/cu13/include.
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return [d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d)]


ext_modules, cmdclass = [], {}
if os.environ.get("METAUG_NO_EXT", "0") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # csrc/build_info.h stores it in each library, so that a torch mismatch is caught before loading.
    torch_version = [f"-DMETAUG_TORCH_VERSION={torch.__version__}"]

    if os.environ.get("METAUG_CUDA_ONLY", "0") != "1":
        # -fopenmp at compile and link time, or at::parallel_for runs on one thread.
        # -ffp-contract=off: the Hessian-vector product subtracts e'·t - Σ w·e'·t, which cancels exactly for a
        # row dominated by one entry only when both products are rounded alike; a fused multiply-add keeps
        # one unrounded and leaves a residue of about one ulp times β² (seen: 1e-3 relative error in fp32).
        # -fno-trapping-math: floating-point exceptions are never enabled, so GCC may compute both sides of a
        # select in SIMD lanes; without it the AVX2 copies of the label epilogues stay scalar (no ymm code at
        # all: measured 3-4x slower per score on an AVX2 machine). Results are the same: it changes no
        # rounding and no NaN/inf behaviour, only whether a lane may raise a flag nobody reads.
        ext_modules.append(
            CppExtension(
                "metaug_fast._C",
                sources=["csrc/module.cpp", "csrc/cpu/score.cpp", "csrc/cpu/label.cpp"],
                depends=["csrc/oucl_common.h", "csrc/oucl_host.h", "csrc/op_schemas.h", "csrc/build_info.h",
                         *glob.glob("csrc/cpu/*.[hi]*")],
                extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", *torch_version],
                extra_link_args=["-fopenmp"],
            )
        )
    if _want_cuda():
        ext_modules.append(
            CUDAExtension(
                "metaug_fast._C_cuda",
                sources=["csrc/cuda/module_cuda.cpp", "csrc/cuda/score.cu", "csrc/cuda/label.cu"],
                depends=["csrc/oucl_common.h", "csrc/oucl_host.h", "csrc/build_info.h", "csrc/cuda/device.h",
                         "csrc/cuda/warp.cuh", "csrc/cuda/gemm.h", "csrc/cuda/label_hvp.cuh"],
                include_dirs=_cuda_include_dirs(),
                extra_compile_args={"cxx": ["-O3", *torch_version], "nvcc": ["-O3", "--fmad=false", "-lineinfo"]},
            )
        )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass, **_license_metadata())
