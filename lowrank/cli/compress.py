"""`lowrank compress`: compress a trained network here, with calibration data (MATH.md Section 8).

    lowrank compress SOURCE [--model resnet18] --dataset digits --method whiten --budget 0.25
                     [--allocation uniform|energy|stable-rank|greedy] [--refine off|independent|sequential]
                     [--calib-images 256] [--seed 0] [--save OUT.safetensors] [--json]
                     [--finetune-epochs N [--recipe digits] [--lr 0.02] [--batch-size 64] ...]

SOURCE is a train checkpoint (`last.pt`), a state_dict (`.safetensors`, weights-only `.pt`; give
`--model`) or a compressed model. Prints top-1 of the dense and the compressed model (before
fine-tuning; before and after BN re-estimation), parameters, MACs and the per-layer table (rank,
params, held-out block/linear errors and the Gaussian-surrogate prediction). `--finetune-epochs N`
then trains the compressed model for N epochs with `lowrank train`'s loop and the data set's
recipe (the training flags override it) and prints top-1 after each epoch; `--save` then writes the
fine-tuned model. Progress goes to stderr. A diverged fine-tuning exits 1, a bad flag 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from core.train_fields import BY_NAME, FINETUNE_FIELDS
from lowrank.cli._common import CliError, flags_to_config, parse_str_list, print_json

# flag -> (CompressConfig key, type, help); parsed here without importing torch (keeps --help light).
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "architecture (core.models) when SOURCE does not say it"),
    ("--num-classes", "num_classes", int, "default: read off the classifier"),
    ("--dataset", "dataset", str, "digits|synthetic|cifar10|cifar100|imagefolder (calibration + top-1)"),
    ("--data-root", "data_root", str, "imagefolder/cifar location"),
    ("--image-size", "image_size", int, "px (default: the data set's)"),
    ("--calib-images", "calib_images", int, "images whose patches fit the statistics (default 256)"),
    ("--heldout-images", "heldout_images", int, "disjoint images the per-layer errors are measured on (64)"),
    ("--calib-batch-size", "calib_batch_size", int, "default 64"),
    ("--positions", "positions_per_image", int, "output positions sampled per image and layer (64)"),
    ("--seed", "seed", int, "draws the calibration images and positions"),
    ("--method", "method", str, "spectral|nkp|whiten|asvd|nkp-data (default whiten)"),
    ("--refine", "refine", str, "off|independent|sequential (default off)"),
    ("--refine-steps", "refine_steps", int, "Adam steps per layer (100)"),
    ("--budget", "budget", float, "fraction of the compressed layers' weights to keep, in (0, 1]"),
    ("--rank", "rank", int, "one rank for every layer"),
    ("--rank-ratio", "rank_ratio", float, "one ratio of min(out, in*kh*kw) for every layer"),
    ("--allocation", "allocation", str, "uniform|energy|stable-rank|greedy (with --budget)"),
    ("--rank-step", "rank_step", int, "greedy's rank step (1)"),
    ("--eps", "eps", float, "eigen-floor of Sigma relative to its largest eigenvalue (1e-6)"),
    ("--asvd-alpha", "asvd_alpha", float, "asvd's exponent (0.5)"),
    ("--include", "include", "list", "comma-separated dotted layer names to compress"),
    ("--exclude", "exclude", "list", "comma-separated dotted layer names to keep dense"),
    ("--max-group-mb", "max_group_mb", int, "second moments held at once, MiB (1024)"),
    ("--max-val-batches", "max_val_batches", int, "cap on validation batches for top-1"),
    ("--device", "device", str, "auto|cpu|cuda|cuda:N"),
    ("--latency-batch", "latency_batch", int, "with --latency-aware: the batch size layers are timed at (1)"),
    ("--finetune-epochs", "finetune_epochs", int, "train the compressed model this many epochs (default 0)"),
]


LATENCY_AWARE_HELP = ("keep dense every layer whose factored form is not measured faster on the device "
                      "(at --latency-batch); the report lists them with both times")


def _ft_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_finetune_flags(p: argparse.ArgumentParser) -> None:
    """The fine-tuning flags (core.train_fields.FINETUNE_FIELDS, e.g. --lr), here and in `lowrank submit compress`."""
    ft = p.add_argument_group("fine-tuning (with --finetune-epochs; default: the data set's recipe, `lowrank recipes`)")
    for name in FINETUNE_FIELDS:
        f = BY_NAME[name]
        text = f.doc + (f" (one of {', '.join(f.choices)})" if f.choices else "")
        if f.base_type is bool:
            ft.add_argument(_ft_flag(name), dest=f"ft_{name}", action=argparse.BooleanOptionalAction, default=None,
                            help=text)
        else:
            ft.add_argument(_ft_flag(name), dest=f"ft_{name}", default=None, metavar=name.upper(), help=text)


def finetune_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The fine-tuning flags given, as the `finetune` mapping of training fields (type errors name the flag)."""
    finetune: dict[str, Any] = {}
    for name in FINETUNE_FIELDS:
        raw, kind = getattr(args, f"ft_{name}"), BY_NAME[name].base_type
        if raw is None:
            continue
        if kind is bool or kind is str:
            finetune[name] = raw
        elif kind == list[str]:
            finetune[name] = parse_str_list(raw)
        else:
            try:
                finetune[name] = kind(raw)
            except ValueError:
                raise CliError(f"{_ft_flag(name)} must be {'an integer' if kind is int else 'a number'}, "
                               f"got {raw!r}") from None
    return finetune


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compress", help="compress a trained network with calibration data",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="SOURCE", help="last.pt, a state_dict (.safetensors/.pt) or a compressed model")
    for flag, key, _, help_text in _FLAGS:
        p.add_argument(flag, dest=key, default=None, metavar=key.upper(), help=help_text)
    p.add_argument("--small-input", dest="small_input", action="store_const", const=True, default=None,
                   help="3x3 stride-1 stem (32 px); read off a ResNet's weights when not given")
    p.add_argument("--no-bn-reestimate", dest="bn_reestimate", action="store_false", default=True,
                   help="keep the source's BatchNorm statistics (default: re-estimate them on the calibration images)")
    p.add_argument("--latency-aware", action="store_true", help=LATENCY_AWARE_HELP)
    add_finetune_flags(p)
    p.add_argument("--save", metavar="PATH", help="write the compressed model (safetensors + rebuild spec)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The CompressConfig dict of the flags given (type errors name the flag)."""
    config = flags_to_config(args, _FLAGS, {"source": args.source, "bn_reestimate": args.bn_reestimate})
    if args.latency_aware:
        config["latency_aware"] = True
    if args.small_input:
        config["small_input"] = True
    finetune = finetune_from_args(args)
    if finetune:
        config["finetune"] = finetune
    if not any(k in config for k in ("budget", "rank", "rank_ratio")):
        raise CliError("give one of --budget, --rank, --rank-ratio")
    return config


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _flag_message(exc: Exception) -> str:
    """The first line of a config error, with `finetune.lr` / `finetune_epochs` said as the flags the user typed."""
    import re

    text = str(exc).splitlines()[0]
    text = re.sub(r"^finetune\.(\w+)", lambda m: _ft_flag(m[1]) if m[1] in FINETUNE_FIELDS else m[0], text)
    return re.sub(r"^finetune_epochs\b", "--finetune-epochs", text)


def run(args: argparse.Namespace) -> int:
    from core.calibration import CalibrationCancelled
    from core.compress import CompressCallbacks
    from core.compress_run import CompressConfig, run_compress
    from core.data import DatasetError
    from core.guards import TrainingDiverged

    raw = config_from_args(args)
    try:
        config = CompressConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CliError(_flag_message(exc)) from None
    epochs = config.finetune_epochs

    class StagePrinter(CompressCallbacks):
        def on_stage(self, stage: str) -> None:
            print(f"compress: {stage}", file=sys.stderr, flush=True)

        def on_epoch(self, epoch: int, m: dict[str, float]) -> None:
            print(f"fine-tune epoch {epoch}/{epochs}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
                  f"val_top1 {m['val_top1']:.4f}  lr {m['lr']:.4g}  {m['epoch_time_s']:.1f} s",
                  file=sys.stderr, flush=True)

    try:
        result = run_compress(config, callbacks=StagePrinter(), save_path=args.save)
    except TrainingDiverged as exc:  # the run failed (exit 1), not the command line (exit 2)
        print(f"error: fine-tuning {exc}", file=sys.stderr)
        return 1
    except (DatasetError, CalibrationCancelled) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:  # source files, budgets, layer names, data sizes: the message names the field
        raise CliError(_flag_message(exc)) from None
    report = result.report
    if args.json:
        print_json(report)
        return 0
    _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    opts, t, top1 = report["options"], report["totals"], report["top1"]
    size = (f"budget {opts['budget']} ({opts['allocation']})" if opts["budget"] is not None
            else f"rank {opts['rank']}" if opts["rank"] is not None else f"rank ratio {opts['rank_ratio']}")
    table = Table(title=f"{report['source']['model']} compressed: {opts['method']}, {size}, refine {opts['refine']}")
    for col in ("layer", "shape", "act", "rank", "params", "block err", "linear err", "surrogate"):
        table.add_column(col, justify="left" if col in ("layer", "shape", "act") else "right")
    for row in report["layers"]:
        errs = row.get("errors") or {}
        rank = str(row["rank"]) if row["rank"] is not None else row["status"]
        table.add_row(row["layer"], "x".join(map(str, row["shape"])), row.get("activation") or "-", rank,
                      f"{row['params_dense']:,} -> {row['params_compressed']:,}", _fmt(errs.get("block")),
                      _fmt(errs.get("linear")), _fmt(errs.get("surrogate")))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    skipped = [f"{r['layer']} ({r['reason']})" for r in report["layers"] if r["status"] == "skipped"]
    if skipped:
        console.print(f"kept dense: {', '.join(skipped)}")
    console.print(f"top-1 (validation, before fine-tuning): dense {top1['dense']:.4f} -> compressed "
                  f"{top1['compressed_before_bn']:.4f} without, {top1['compressed']:.4f} with BN re-estimation")
    if report.get("finetune"):
        ft = report["finetune"]
        console.print(f"top-1 after fine-tuning ({ft['epochs']} epoch(s), recipe {ft['recipe']}, lr {ft['lr']:g}, "
                      f"batch {ft['batch_size']}): "
                      + ", ".join(f"epoch {i} {v:.4f}" for i, v in enumerate(top1["finetuned"], 1))
                      + f"; {ft['time_s']:.1f} s")
        for warning in ft["warnings"]:
            console.print(f"warning: {warning}")
    console.print(f"parameters {t['params_dense']:,} -> {t['params_compressed']:,} ({t['param_ratio']:.3f}x); "
                  f"compressible weights kept {_fmt(t['budget_used'], '.3f')}"
                  + (f"; MACs/image {t['macs_dense']:,} -> {t['macs_compressed']:,}" if "macs_dense" in t else ""))
    console.print(f"mean held-out errors: block {_fmt(t['mean_block_error'])}, linear {_fmt(t['mean_linear_error'])}, "
                  f"surrogate {_fmt(t['mean_surrogate_error'])}; {t['run_time_s']:.1f} s"
                  + (f"; saved {report['saved']}" if report.get("saved") else ""))
