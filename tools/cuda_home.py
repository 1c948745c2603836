"""The CUDA toolkit root, one rule for the Makefile (``make check-cuda``) and the GPU check: /usr/local/cuda
where its nvcc exists (on this machine /usr/local/bin/nvcc is a wrapper script around it), else the folder
above the bin/ that holds the nvcc on the PATH. Prints nothing when there is no nvcc.

    python3 tools/cuda_home.py
"""
import os
import shutil
from typing import Optional


def cuda_home() -> Optional[str]:
    if os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


if __name__ == "__main__":
    print(cuda_home() or "")
