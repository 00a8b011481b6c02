"""Benchmarks: `python -m bench [--quick] [--out DIR] [NAME ...]` (or `make bench` / `make bench-quick`).

Each module here with a `run(quick: bool)` function is one benchmark; it writes its table(s) and
plots with bench.common.write_result (a .md with the environment header, plus a .json with its
numbers) to docs/results/ (quick runs: bench/_out/quick/) and prints the ratios it measured in the
same run. bench/summary.py then composes README.md there: every goal of the issues next to the
measured number.
"""
