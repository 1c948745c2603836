"""MetAug training: the meta feature augmenter, the memory bank, the
second-order meta step, models, data, the linear probe and the trainer behind ``python -m metaug_fast.cli.train``."""
from .bank import MemoryBank, ShardedMemoryBank
from .mag import MetaFeatureAugmenter
from .step import MetAugConfig, MetAugStep, margin_terms, objective

__all__ = ["MemoryBank", "ShardedMemoryBank", "MetaFeatureAugmenter", "MetAugConfig", "MetAugStep", "objective",
           "margin_terms"]
