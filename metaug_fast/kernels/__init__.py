"""Triton kernels of metaug_fast (the subpackage ``metaug_fast.kernels``).

Kernels are imported lazily by the ``triton`` backend so that ``import metaug_fast`` never requires
Triton. Tests run them on the CPU under ``TRITON_INTERPRET=1`` (set in tests/conftest.py before any
kernel is defined).
"""
