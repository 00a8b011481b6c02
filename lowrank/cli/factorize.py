"""`lowrank factorize`: factorize a registered model with one or more init methods and compare them.

    lowrank factorize --model resnet50 --rank-ratio 0.25 --methods spectral,nkp [--latency-aware] [--json]

Per layer: rank, parameters dense/factored and the normalized function error of each method
(MATH.md Section 2). Every method starts from the same seeded fresh init of each layer. With
--latency-aware a layer stays dense when its factored form is not measured faster (core/latency.py)
at --batch images of --image-size px on --device; the same layers for every method.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from core.names import INIT_METHODS as METHOD_NAMES  # torch-free
from core.names import MODELS as MODEL_NAMES
from lowrank.cli._common import CliError, check_model_and_rank, parse_str_list, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("factorize", help="factorize a model's layers and compare init methods",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"one of {', '.join(MODEL_NAMES)}")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="rank of every factored layer (>= 1)")
    group.add_argument("--rank-ratio", type=float, help="rank as a fraction of min(out, in*kh*kw), in (0, 1]")
    p.add_argument("--methods", default="spectral,nkp", help=f"comma-separated, of {', '.join(METHOD_NAMES)}")
    p.add_argument("--seed", type=int, default=0, help="seeds each layer's fresh init and the methods")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--small-input", action="store_true", help="3x3 stride-1 stem (32 px images)")
    p.add_argument("--include", help="comma-separated dotted layer names to factor (default: all but stem/classifier)")
    p.add_argument("--exclude", help="comma-separated dotted layer names to keep dense")
    p.add_argument("--latency-aware", action="store_true",
                   help="keep dense every layer whose factored form is not measured faster")
    p.add_argument("--image-size", type=int, default=224, help="--latency-aware: input images of this many px")
    p.add_argument("--batch", type=int, default=1, help="--latency-aware: the batch size layers are timed at")
    p.add_argument("--device", default="cpu", help="--latency-aware: where layers are timed (cpu, cuda, cuda:N)")
    p.add_argument("--threads", type=int, help="--latency-aware: CPU threads while timing (default: torch's count)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=run)


def _validate(args: argparse.Namespace) -> list[str]:
    check_model_and_rank(args, MODEL_NAMES)
    if args.num_classes < 1:
        raise CliError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.image_size < 8:
        raise CliError(f"--image-size must be an integer >= 8, got {args.image_size}")
    if args.batch < 1:
        raise CliError(f"--batch must be an integer >= 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be an integer >= 1, got {args.threads}")
    if args.device != "cpu" and not (args.device == "cuda" or (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        raise CliError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    methods = parse_str_list(args.methods)
    bad = [m for m in methods if m not in METHOD_NAMES]
    if not methods or bad:
        raise CliError(f"--methods must be a comma-separated list of {', '.join(METHOD_NAMES)}, got {args.methods!r}")
    return list(dict.fromkeys(methods))


def compare_methods(model: str, methods: list[str], *, rank: int | None, rank_ratio: float | None,
                    seed: int = 0, num_classes: int = 10, small_input: bool = False,
                    include: list[str] | None = None, exclude: list[str] | None = None,
                    latency: Any = None) -> dict[str, Any]:
    """Factorize `model` once per method; rows merged by layer with `error` a dict method -> error.
    latency: a core.latency.LatencyPolicy shared by the methods (it times each layer once)."""
    import torch

    from core.factorize import factorize_model
    from core.models import build_model

    rows: dict[str, dict[str, Any]] = {}
    totals: dict[str, Any] = {"time_s": {}, "mean_error": {}}
    if latency is not None:  # time the layers once, apart from the methods' times (the policy caches its verdicts)
        t0 = time.perf_counter()
        factorize_model(build_model(model, num_classes=num_classes, small_input=small_input), rank=rank,
                        rank_ratio=rank_ratio, method="random", seed=seed, include=include, exclude=exclude,
                        compare_spectral=False, compute_init=False, latency=latency)
        totals["latency_time_s"] = time.perf_counter() - t0
    for method in methods:
        torch.manual_seed(seed)
        net = build_model(model, num_classes=num_classes, small_input=small_input)
        t0 = time.perf_counter()
        report = factorize_model(net, rank=rank, rank_ratio=rank_ratio, method=method, seed=seed,
                                 include=include, exclude=exclude, compare_spectral=False, latency=latency)
        totals["time_s"][method] = time.perf_counter() - t0
        totals["mean_error"][method] = report.totals["mean_error"]
        for key in ("layers", "layers_factored", "layers_kept_dense", "params_dense", "params_factored", "param_ratio"):
            totals[key] = report.totals[key]
        for row in report.layers:
            entry = rows.setdefault(row.layer, {
                "layer": row.layer, "kind": row.kind, "shape": row.shape, "rank": row.rank,
                "status": row.status, "reason": row.reason, "params_dense": row.params_dense,
                "params_factored": row.params_factored, "dense_ms": row.dense_ms, "factored_ms": row.factored_ms,
                "error": {}})
            entry["error"][method] = row.error
    return {"model": model, "rank": rank, "rank_ratio": rank_ratio, "seed": seed, "methods": methods,
            "latency": report.latency, "layers": list(rows.values()), "totals": totals}


def run(args: argparse.Namespace) -> int:
    methods = _validate(args)
    include = parse_str_list(args.include) if args.include else None
    exclude = parse_str_list(args.exclude) if args.exclude else None
    from core.factorize import FactorizeError

    policy = None
    if args.latency_aware:
        import torch

        from core.latency import LatencyPolicy

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise CliError(f"--device {args.device}: CUDA is not available on this machine")
        policy = LatencyPolicy(image_size=args.image_size, batch=args.batch, device=args.device, threads=args.threads)
    try:
        result = compare_methods(args.model, methods, rank=args.rank, rank_ratio=args.rank_ratio,
                                 seed=args.seed, num_classes=args.num_classes, small_input=args.small_input,
                                 include=include, exclude=exclude, latency=policy)
    except FactorizeError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print_json(result)
        return 0
    _print_table(result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    methods = result["methods"]
    table = Table(title=f"{result['model']} factorized "
                        f"({'rank ' + str(result['rank']) if result['rank'] else 'ratio ' + str(result['rank_ratio'])})")
    for col in ("layer", "shape", "rank", "params dense", "params factored", *[f"error {m}" for m in methods]):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for row in result["layers"]:
        if row["status"] != "factored":
            continue
        table.add_row(row["layer"], "x".join(map(str, row["shape"])), str(row["rank"]),
                      f"{row['params_dense']:,}", f"{row['params_factored']:,}",
                      *[f"{row['error'][m]:.4f}" for m in methods])
    t = result["totals"]
    console = Console(width=None if sys.stdout.isatty() else 160)  # pipes: do not squeeze the names
    console.print(table)
    console.print(f"{t['layers_factored']} of {t['layers']} layers factored; parameters "
                  f"{t['params_dense']:,} -> {t['params_factored']:,} ({t['param_ratio']:.3f}x)")
    if result["latency"] is not None:
        lat = result["latency"]
        kept = [r for r in result["layers"] if r["status"] == "kept_dense"]
        console.print(f"latency-aware ({lat['device']}, batch {lat['batch']}, {lat['image_size']} px, "
                      f"{lat['threads']} thread(s), timed in {t['latency_time_s']:.1f} s): {len(kept)} layer(s) kept dense")
        for r in kept:
            console.print(f"  {r['layer']}: {r['reason']}")
    for m in methods:
        err = t["mean_error"][m]
        console.print(f"  {m}: mean error {err:.4f}, {t['time_s'][m]:.2f} s" if err is not None
                      else f"  {m}: {t['time_s'][m]:.2f} s")
