"""Benchmarks: each `python -m bench.<name>` prints numbers (bench/README.md lists them, with their last figures);
the other modules are what they share. Nothing here is a test: tests assert behaviour, benchmarks measure.

Empty on purpose: bench/gpu_check.py imports this package before its smoke test has checked the third-party modules.
"""
