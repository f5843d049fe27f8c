"""Benchmarks: scripts that print figures (not timed tests). Run each from the repository root
as a module of this package, e.g. ``.venv/bin/python -m benchmarks.infer --quick``; they use
the library's public names only.
"""
