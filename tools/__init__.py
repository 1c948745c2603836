"""Build and compile checks that need no GPU: make check-cuda, check-triton and gpu-static."""
