"""Run every benchmark under bench/ (or the ones named) and write docs/results/."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import bench


def discover() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.iter_modules(bench.__path__)
        if not info.name.startswith("_") and info.name != "common"
        and hasattr(importlib.import_module(f"bench.{info.name}"), "run")
    )


def main(argv: list[str] | None = None) -> int:
    names = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in under 5 minutes")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(names)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
    Path("docs/results").mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.names or names:
        print(f"== bench {name} ({'quick' if args.quick else 'full'})", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"bench.{name}").run(quick=args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            failed.append(name)
            print(f"!! bench {name} failed: {exc!r}", file=sys.stderr, flush=True)
        print(f"== bench {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
