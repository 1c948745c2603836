"""The command lines: ``python -m metaug_fast.cli.train`` (MetAug training), ``.compare`` (MetAug against
its ablations, ``make train``) and ``.demo`` (a short OUCL demo); installed as ``metaug-train``,
``metaug-compare`` and ``metaug-demo``."""
