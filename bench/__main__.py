"""Run every benchmark under bench/ (or the ones named), then compose the summary (README.md).

    python -m bench [--quick] [--out DIR] [--no-summary] [NAME ...]

Full runs write to docs/results/ by default; --quick runs (smoke runs, CI) write to bench/_out/quick/
(git-ignored) unless --out says otherwise, so a smoke run never overwrites the full run's numbers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path

import bench

QUICK_OUT = Path(__file__).resolve().parent / "_out" / "quick"
NOT_BENCHMARKS = {"common", "summary"}


def discover() -> list[str]:
    """Module names under bench/ that define run(quick). Modules are imported only to check that, and
    one that fails to import is reported and skipped, not fatal."""
    names = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_") or info.name in NOT_BENCHMARKS:
            continue
        try:
            mod = importlib.import_module(f"bench.{info.name}")
        except Exception as exc:  # noqa: BLE001 - someone's half-written module must not stop the others
            print(f"!! bench {info.name} cannot be imported: {exc!r}", file=sys.stderr, flush=True)
            continue
        if callable(getattr(mod, "run", None)):
            names.append(info.name)
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in under 5 minutes")
    parser.add_argument("--out", metavar="DIR", help="write results here (default: docs/results/, "
                        "or bench/_out/quick/ with --quick)")
    parser.add_argument("--no-summary", action="store_true", help="do not (re)write DIR/README.md")
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    args = parser.parse_args(argv)

    from bench import common

    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else common.DEFAULT_RESULTS)
    out = common.set_results_dir(out)  # before the modules run; also exported to subprocesses
    common.MODE = "quick" if args.quick else "full"
    names = discover()
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
    failed = []
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for name in args.names or names:
        print(f"== bench {name} ({common.MODE}) -> {out}", flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"bench.{name}")
            if hasattr(mod, "RESULTS"):  # modules that did `from bench.common import RESULTS`
                mod.RESULTS = out
            mod.run(quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' numbers
            failed.append(name)
            print(f"!! bench {name} failed: {exc!r}", file=sys.stderr, flush=True)
        timings[name] = time.perf_counter() - t0
        print(f"== bench {name} done in {timings[name]:.1f} s", flush=True)
    total = time.perf_counter() - t_all
    if not args.no_summary:
        from bench import summary

        path = summary.write_summary(out, timings=timings, failed=failed, total_s=total, mode=common.MODE)
        print(f"== summary: {path}", flush=True)
    print(f"== all benchmarks: {total:.1f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
