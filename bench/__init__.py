"""Benchmarks of this project against MMDetection's and MMEngine's own components.

`python -m bench.run` runs every section (bench/<name>.py with `measure(quick)`) and writes
docs/benchmarks.md.
"""
