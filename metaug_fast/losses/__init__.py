"""Drop-in replacements for the contrastive losses of other libraries, one module per library, each
mirroring its import path: change the import line, keep the code.

- :mod:`metaug_fast.losses.pml`: pytorch-metric-learning's ``CircleLoss`` and ``NTXentLoss``;
- :mod:`metaug_fast.losses.open_clip`: open_clip's ``ClipLoss``;
- :mod:`metaug_fast.losses.lightly`: lightly's ``NTXentLoss``;
- :mod:`metaug_fast.losses.official`: the official MetAug code's criterion.

Each class is one parametrization of the fused ops of :mod:`metaug_fast.functional`, tested for equal
values and gradients against the library it replaces; an option it does not implement raises a
``ValueError`` that names it.
"""
