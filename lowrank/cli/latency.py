"""`lowrank latency`: measured forward latency of a registered model, dense against factored.

    lowrank latency --model resnet18 --rank-ratio 0.25 [--image-size 32] [--batch 1,64] [--latency-aware] [--json]

End to end (p50, p90, images/s, speed-up) at each batch size and, per factored layer, the dense
layer against its factored form on the layer's real input shape (core/latency.py); with
--latency-aware also the network that keeps dense every layer whose factored form is not faster.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from core.names import MODELS as MODEL_NAMES  # torch-free
from lowrank.cli._common import CliError, check_model_and_rank, parse_int_list, print_json


def add_measure_flags(p: argparse.ArgumentParser, *, job: bool = False) -> None:
    """The measurement flags of `lowrank latency`, shared with `lowrank submit latency` (job=True: every default
    None, so a flag left out takes the job spec's default, and --source JOB joins --rank / --rank-ratio)."""
    def default(value: Any) -> Any:
        return None if job else value

    p.add_argument("--model", required=not job, help=f"one of {', '.join(MODEL_NAMES)}"
                   + ("; with --source: the compress job's" if job else ""))
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="rank of every factored layer (>= 1)")
    group.add_argument("--rank-ratio", type=float, help="rank as a fraction of min(out, in*kh*kw), in (0, 1]")
    if job:
        group.add_argument("--source", metavar="JOB", help="a succeeded compress job (id or prefix): its per-layer "
                                                           "ranks, model and calibration image size")
    p.add_argument("--image-size", type=int, default=default(224), help="input images are this many px on a side"
                   + (" (default 224; with --source: its calibration size)" if job else ""))
    p.add_argument("--batch", default=default("1,32"), help="comma-separated batch sizes (default 1,32)")
    if job:
        p.add_argument("--device", choices=("cpu", "cuda"), help="cpu, or cuda (a GPU worker's queue)")
    else:
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="CPU intra-op threads while timing (default: torch's current count)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on CUDA only)")
    p.add_argument("--repeats", type=int, default=default(20), help="timed samples per network and per layer "
                                                                    "(default 20)")
    p.add_argument("--no-per-layer", dest="per_layer", action="store_false", default=default(True),
                   help="end to end only (default: per layer and end to end)")
    p.add_argument("--latency-aware", action="store_true", default=default(False),
                   help="also the network that keeps dense every layer whose factored form is not faster")
    p.add_argument("--latency-batch", type=int, help="batch size the latency-aware choice is timed at (default: the first)")
    p.add_argument("--num-classes", type=int, default=default(10), help="classifier outputs (default 10)")
    p.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem (default: for images of 64 px or less)")


# Flags of add_measure_flags -> the latency job spec's fields (`lowrank submit latency`).
SPEC_FIELDS = {"model": "model", "rank": "rank", "rank_ratio": "rank_ratio", "image_size": "image_size",
               "device": "device", "threads": "threads", "channels_last": "channels_last", "repeats": "repeats",
               "per_layer": "per_layer", "latency_aware": "latency_aware", "latency_batch": "latency_batch",
               "num_classes": "num_classes", "small_input": "small_input"}


def spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The latency job spec's fields from the flags given (the spec validates them; --source may be a prefix)."""
    spec = {field: getattr(args, flag) for flag, field in SPEC_FIELDS.items() if getattr(args, flag) is not None}
    if args.batch is not None:
        spec["batches"] = parse_int_list(args.batch, "--batch")
    if args.source is not None:
        spec["source"] = args.source
    return spec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("latency", help="measure forward latency, dense vs factored, per layer and end to end",
                              description=__doc__.split("\n\n")[0])
    add_measure_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(handler=run)


def _validate(args: argparse.Namespace) -> list[int]:
    check_model_and_rank(args, MODEL_NAMES)
    if args.image_size < 8:
        raise CliError(f"--image-size must be an integer >= 8, got {args.image_size}")
    batches = parse_int_list(args.batch, "--batch")
    if not batches or any(b < 1 for b in batches):
        raise CliError(f"--batch must be a comma-separated list of integers >= 1, got {args.batch!r}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be an integer >= 1, got {args.threads}")
    if args.repeats < 3:
        raise CliError(f"--repeats must be an integer >= 3, got {args.repeats}")
    if args.latency_batch is not None and args.latency_batch < 1:
        raise CliError(f"--latency-batch must be an integer >= 1, got {args.latency_batch}")
    if args.num_classes < 1:
        raise CliError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.device != "cpu" and not (args.device == "cuda" or (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        raise CliError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    return list(dict.fromkeys(batches))


def run(args: argparse.Namespace) -> int:
    batches = _validate(args)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: CUDA is not available on this machine")
    from core.factorize import FactorizeError
    from core.latency import compare_latency

    try:
        result = compare_latency(args.model, rank=args.rank, rank_ratio=args.rank_ratio, image_size=args.image_size,
                                 batches=batches, device=args.device, threads=args.threads,
                                 channels_last=args.channels_last, repeats=args.repeats, per_layer=args.per_layer,
                                 latency_aware=args.latency_aware, latency_batch=args.latency_batch,
                                 num_classes=args.num_classes, small_input=args.small_input, seed=args.seed)
    except FactorizeError as exc:
        raise CliError(str(exc)) from None
    except RuntimeError as exc:  # e.g. an image too small for the model's downsampling
        if "size" not in str(exc).lower():
            raise
        raise CliError(f"--image-size {args.image_size} is too small for {args.model}: {str(exc).splitlines()[0]}") from None
    if args.json:
        print_json(result)
        return 0
    print_tables(result)
    return 0


def print_tables(result: dict[str, Any]) -> None:
    """The tables `lowrank latency` prints (also `lowrank job ID` for a latency job's result)."""
    from rich.console import Console
    from rich.table import Table

    lat = result["latency"]
    console = Console(width=None if sys.stdout.isatty() else 160)
    how = (f"rank {result['rank']}" if result.get("rank") else f"ratio {result['rank_ratio']}"
           if result.get("rank_ratio") else f"the per-layer ranks of compress job {(result.get('source') or {}).get('job')}")
    console.print(f"{result['model']} at {result['image_size']} px, factored at {how}; device {lat['device']}, "
                  f"{lat['threads']} CPU thread(s), channels-last {'on' if lat['channels_last'] else 'off'}")
    table = Table(title="end to end (forward, eval mode)")
    for col in ("batch", "network", "params", "p50 ms", "p90 ms", "images/s", "speed-up vs dense"):
        table.add_column(col, justify="left" if col == "network" else "right")
    params = {"dense": result["factorize"]["factored"]["params_dense"],
              **{k: v["params_factored"] for k, v in result["factorize"].items()}}
    for e in lat["end_to_end"]:
        t = e["timing"]
        table.add_row(str(e["batch"]), e["variant"], f"{params[e['variant']]:,}", f"{t['p50_ms']:.3f}",
                      f"{t['p90_ms']:.3f}", f"{e['throughput']:.1f}", f"{e['speedup']:.2f}x")
    console.print(table)
    for batch, rows in lat["layers"].items():
        table = Table(title=f"per factored layer, batch {batch} (dense layer vs its factored form, isolated)")
        for col in ("layer", "input", "rank", "dense ms", "factored ms", "speed-up", ""):
            table.add_column(col, justify="left" if col in ("layer", "input", "") else "right")
        for row in rows:
            table.add_row(row["layer"], "x".join(map(str, row["input_shape"])), str(row["rank"]),
                          f"{row['dense']['p50_ms']:.4f}", f"{row['factored']['p50_ms']:.4f}",
                          f"{row['speedup']:.2f}x", "SLOWER" if row["slower"] else "")
        console.print(table)
        slower = sum(r["slower"] for r in rows)
        console.print(f"batch {batch}: {slower} of {len(rows)} factored layers slower than dense")
    if "kept_dense" in result:
        kept = result["kept_dense"]
        aware = result["factorize"]["latency-aware"]
        console.print(f"latency-aware (timed at batch {result['latency_policy']['batch']}): kept {len(kept)} layer(s) dense, "
                      f"{aware['layers_factored']} factored, parameters {aware['params_factored']:,}")
        for k in kept:
            console.print(f"  {k['layer']}: {k['reason']}")
