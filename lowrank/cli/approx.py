"""`lowrank approx`: approximate one weight matrix at several ranks with several methods, locally.

    lowrank approx (--weights PATH[:key] | --m M --d D) --ranks 1,4,16 [--methods spectral,nkp]
                   [--seed 0] [--mc-samples N] [--device cpu|cuda] [--save DIR] [--json]

Everything the user gave is validated before any computation, and files are written only after
every approximation succeeded (each atomically), so a bad input never leaves DIR half-written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from core.names import APPROX_METHODS as METHODS  # core.approx.METHODS, without torch
from lowrank.cli._common import CliError, parse_int_list, parse_str_list, print_json

DEFAULT_METHODS = "spectral,rescale,nkp"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "approx",
        help=f"low-rank approximation of a layer's function ({' / '.join(METHODS)})",
        description="Approximate a weight matrix W (m x d) at several ranks; prints the normalized "
                    "function error L(UV)/L(0) of each method (MATH.md Sections 1-5).",
    )
    src = p.add_argument_group("weights (one of)")
    src.add_argument("--weights", metavar="PATH[:KEY]", help=".npy, .npz, .safetensors or .pt file (KEY names the array)")
    src.add_argument("--m", type=int, metavar="M", help="rows of a Gaussian W with N(0, 1/d) entries (with --d)")
    src.add_argument("--d", type=int, metavar="D", help="columns of the Gaussian W (with --m)")
    p.add_argument("--ranks", required=True, metavar="R1,R2,...", help="comma-separated ranks, each in 1..min(m, d)")
    p.add_argument("--methods", default=DEFAULT_METHODS, metavar="M1,M2,...",
                   help=f"comma-separated, from {', '.join(METHODS)} (default {DEFAULT_METHODS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gaussian W and of the random methods (default 0)")
    p.add_argument("--mc-samples", type=int, default=None, metavar="N",
                   help="also estimate the error by Monte Carlo with N input samples (N >= 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to compute (default cpu)")
    p.add_argument("--save", metavar="DIR", default=None, help="write DIR/<method>-r<rank>.safetensors with tensors U, V")
    p.add_argument("--json", action="store_true", help="print a JSON list of result objects instead of a table")
    p.set_defaults(handler=cmd_approx)


def _validate_plan(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """Checks that need no weights: source flags, methods, rank syntax, MC samples, save folder."""
    if args.weights is not None and (args.m is not None or args.d is not None):
        raise CliError("give either --weights PATH[:KEY] or --m M --d D, not both")
    if args.weights is None:
        if args.m is None or args.d is None:
            raise CliError("weights: give --weights PATH[:KEY], or both --m M and --d D for a Gaussian W")
        if args.m < 1 or args.d < 1:
            raise CliError(f"--m and --d must be positive integers, got m={args.m}, d={args.d}")
    methods = parse_str_list(args.methods)
    if not methods:
        raise CliError(f"--methods must list at least one of {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CliError(f"--methods: unknown method {unknown[0]!r}; allowed: {', '.join(METHODS)}")
    methods = list(dict.fromkeys(methods))  # keep order, drop repeats
    ranks = parse_int_list(args.ranks, "--ranks")
    if not ranks:
        raise CliError("--ranks must list at least one rank, e.g. --ranks 1,4,16")
    bad = [r for r in ranks if r <= 0]
    if bad:
        raise CliError(f"--ranks: rank {bad[0]} is not positive; each rank must be in 1..min(m, d)")
    ranks = list(dict.fromkeys(ranks))
    if args.mc_samples is not None and args.mc_samples < 2:
        raise CliError(f"--mc-samples must be an integer >= 2, got {args.mc_samples}")
    if args.save is not None:
        save = Path(args.save)
        if save.exists() and not save.is_dir():
            raise CliError(f"--save: {save} exists and is not a directory")
        probe = save if save.exists() else next((p for p in save.absolute().parents if p.exists()), Path("/"))
        if not os.access(probe, os.W_OK | os.X_OK):
            raise CliError(f"--save: cannot write under {probe}")
    return methods, ranks


def cmd_approx(args: argparse.Namespace) -> int:
    methods, ranks = _validate_plan(args)

    import torch

    from core.approx import approximate, mc_function_error
    from core.weights import WeightsError, gaussian_weights, load_weights, save_factors

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__} sees no GPU); use --device cpu")
    if args.weights is not None:
        try:
            W = load_weights(args.weights)
        except WeightsError as exc:
            raise CliError(f"--weights: {exc}") from None
        source = args.weights
    else:
        W = gaussian_weights(args.m, args.d, seed=args.seed)
        source = f"gaussian(m={args.m}, d={args.d}, seed={args.seed})"
    m, d = W.shape
    too_big = [r for r in ranks if r > min(m, d)]
    if too_big:
        raise CliError(f"--ranks: rank {too_big[0]} exceeds min(m, d) = {min(m, d)} for W of shape ({m}, {d})")
    if not bool((W != 0).any()):
        raise CliError("--weights: W is all zeros, so the normalized error L(W')/L(0) is undefined")

    results: list[dict[str, Any]] = []
    factors = []
    for method in methods:
        for rank in ranks:
            try:
                a = approximate(W, rank, method, seed=args.seed, device=args.device)
                row: dict[str, Any] = {"method": method, "rank": rank, "error": a.error, "time_s": a.time_s,
                                       "iterations": a.iterations, "m": m, "d": d, "weights": source,
                                       "device": args.device, "seed": args.seed}
                if args.mc_samples is not None:
                    row["mc_error"], row["mc_stderr"] = mc_function_error(W.to(a.U.device), (a.U, a.V), args.mc_samples, seed=args.seed)
            except ValueError as exc:  # validated above; anything left is still the user's input
                raise CliError(f"{method} at rank {rank}: {exc}") from None
            results.append(row)
            factors.append((method, rank, a.U, a.V))

    if args.save is not None:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        for (method, rank, U, V), row in zip(factors, results):
            path = out / f"{method}-r{rank}.safetensors"
            save_factors(path, U, V)
            row["saved"] = str(path)

    if args.json:
        print_json(results)
    else:
        _print_table(results, source, m, d, args)
    return 0


def _print_table(results: list[dict[str, Any]], source: str, m: int, d: int, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"W {m} x {d} from {source}: normalized function error L(UV)/L(0)")
    table.add_column("method")
    table.add_column("rank", justify="right")
    table.add_column("error", justify="right")
    if args.mc_samples is not None:
        table.add_column(f"MC ({args.mc_samples} samples)", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("iterations", justify="right")
    for r in results:
        cells = [r["method"], str(r["rank"]), f"{r['error']:.6f}"]
        if args.mc_samples is not None:
            cells.append(f"{r['mc_error']:.6f} ± {r['mc_stderr']:.6f}")
        cells += [f"{r['time_s']:.3f}", str(r["iterations"])]
        table.add_row(*cells)
    Console(file=sys.stdout, soft_wrap=True).print(table)
    if args.save is not None:
        print(f"factors saved under {args.save}")
