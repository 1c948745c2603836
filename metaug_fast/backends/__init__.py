"""The backends, one module each; importing this package adds them to ``metaug_fast._backend.REGISTRY`` in
the order ``available_backends()`` lists them."""
# isort: off
from . import reference, cpp, triton, cuda  # noqa: F401  (each registers its backend, in this order)
# isort: on
