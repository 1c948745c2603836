"""Build metaug_fast: the Python package, its Triton kernels (shipped as metaug_fast.kernels) and the
C++ CPU extension metaug_fast._C.

Install with ``pip install -e . --no-build-isolation`` so the build uses the torch already installed.
``METAUG_NO_EXT=1`` skips the extension: the package then runs on the reference backend.
"""
import os

from setuptools import setup

packages = ["metaug_fast", "metaug_fast._ops", "metaug_fast.kernels"]
package_dir = {"metaug_fast": "metaug_fast", "metaug_fast.kernels": "kernels"}

ext_modules, cmdclass = [], {}
if os.environ.get("METAUG_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -fopenmp at compile and link time, or at::parallel_for runs on one thread.
    # -ffp-contract=off: the Hessian-vector product subtracts e'·t - Σ w·e'·t, which cancels exactly for a
    # row dominated by one entry only when both products are rounded alike; a fused multiply-add keeps
    # one unrounded and leaves a residue of about one ulp times β² (seen: 1e-3 relative error in fp32).
    ext_modules.append(
        CppExtension(
            "metaug_fast._C",
            sources=["csrc/module.cpp", "csrc/oucl_cpu.cpp"],
            depends=["csrc/oucl_rows.inc", "csrc/oucl_label_tiles.inc"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
