"""OUCL across processes with torch.distributed: every rank's anchors are scored against the global batch.

``oucl_embeddings_all_gather`` gathers every rank's embeddings (with gradients) and labels; each rank
scores its own rows against the gathered set, excluding each anchor's own row. The returned loss is the
global one (the mean over every valid row of every rank, or the global sum), on every rank, and the
gradient each rank gets for its own embeddings equals that of one process holding the whole batch: each
rank back-propagates its share, and the gather's backward sums the shares that reach a row from every
rank (an all-reduce; gloo has no reduce-scatter). Under DistributedDataParallel, which averages gradients
over ranks, multiply the loss by the world size to keep that equality for the model's parameters. Every
mode is differentiable twice across ranks (the MetAug meta step's Hessian-vector product over the global
batch); :func:`mean_over_ranks` averages parameter gradients differentiably for its look-ahead.

One module per strategy: :mod:`.all_gather`, :mod:`.ring`, :mod:`.sharded` (a reference set split across
ranks) and :mod:`.score` (score mode, where only the reduction crosses ranks).
"""
from ._common import gather_all, mean_over_ranks, shutdown
from .all_gather import info_nce_embeddings_all_gather, oucl_embeddings_all_gather
from .ring import oucl_embeddings_ring
from .score import oucl_global
from .sharded import oucl_embeddings_sharded

__all__ = ["gather_all", "info_nce_embeddings_all_gather", "mean_over_ranks", "oucl_embeddings_all_gather",
           "oucl_embeddings_ring", "oucl_embeddings_sharded", "oucl_global", "shutdown"]
