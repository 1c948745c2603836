"""metaug_fast: fast, exact OUCL and MetAug contrastive-learning kernels for PyTorch.

>>> from metaug_fast import OUCLLoss
>>> import metaug_fast.functional as F

The mathematics is docs/mathematics.md#mathematics; ``metaug_fast.reference`` is its executable form and
every backend is tested against it.
"""
from . import functional, reference
from ._backend import BackendUnavailableError, available_backends
from .functional import *  # noqa: F401,F403  (the functional API: functional.__all__)
from .loss import OUCLLoss

__version__ = "0.1.0"

__all__ = ["OUCLLoss", "BackendUnavailableError", "available_backends", "functional", "reference", *functional.__all__]
