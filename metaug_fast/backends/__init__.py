"""The backends, one module each. Importing this package imports every module in it, and each adds its record
to ``metaug_fast._backend.REGISTRY``, where its ``rank`` places it: a new backend is a new module here, with
nothing to list elsewhere in the package."""
import importlib
import pkgutil


def import_all() -> None:
    """Import every module of this package (again importing nothing already imported)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


import_all()
