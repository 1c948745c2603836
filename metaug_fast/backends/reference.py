"""The ``reference`` backend: :mod:`metaug_fast.reference`, pure PyTorch on any device; the oracle every
other backend is tested against and the fallback of ``backend="auto"``."""
from .. import reference
from .._backend import Backend, add

OPS = ("oucl", "oucl_embeddings", "pairwise_similarity", "margin_statistics", "margin_statistics_embeddings",
       "margin_injection_loss", "info_nce", "info_nce_embeddings", "symmetric_info_nce")

BACKEND = add(Backend("reference", rank=0, where="tensors on any device", runs_on=lambda device: True,
                      unavailable=lambda: None, impls={op: getattr(reference, op) for op in OPS}))
