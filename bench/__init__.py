"""Benchmarks: `python -m bench [--quick] [NAME ...]` (or `make bench`).

Each module here with a `run(quick: bool)` function is one benchmark; it writes its table(s)
and plots to docs/results/ and prints the ratios it measured in the same run.
"""
