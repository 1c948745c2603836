"""Loads the compile-checked CUDA extension (build/check-cuda) on a machine without a GPU and checks that
it registers a CUDA kernel for every op it should (used by ``make check-cuda``)."""
import glob
import importlib.util
import sys

import torch

import metaug_fast  # noqa: F401  (defines the ops' schemas)

OPS = ("oucl_score_fwd", "oucl_score_bwd", "oucl_score_bwd_bwd", "margin_score_fwd", "margin_score_bwd",
       "oucl_label_fwd", "oucl_label_bwd", "oucl_label_hvp", "oucl_label_cross_fwd", "oucl_label_cross_bwd")


def main() -> int:
    paths = glob.glob("build/check-cuda/lib/metaug_fast/_C_cuda*.so")
    if not paths:
        print("no build/check-cuda/lib/metaug_fast/_C_cuda*.so: run make check-cuda", file=sys.stderr)
        return 1
    spec = importlib.util.spec_from_file_location("metaug_fast._C_cuda", paths[0])
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"metaug_fast::{op}", "CUDA")]
    if missing:
        print(f"CUDA kernels not registered for: {missing}", file=sys.stderr)
        return 1
    print(f"{paths[0]}: CUDA kernels registered for {', '.join(OPS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
