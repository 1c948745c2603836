"""Benchmarks of metaug_fast (run as modules: ``python -m bench.<script>``)."""
