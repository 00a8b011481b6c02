"""`lowrank train`: train a (factored) network here, in the foreground.

    lowrank train --model resnet18 --dataset digits --rank-ratio 0.25 --init nkp
                  [--recipe digits] [--epochs 3] [--lr 0.02] [--seed 0] [--checkpoint-dir DIR] [--resume] [--json]

Every training field (core/train_fields.py, the same fields a job spec has) has a flag; `--config
FILE` reads a JSON object of those keys first, and flags given on the command line override it.
Fields left out take the recipe's values (`lowrank recipes`; default: the data set's). Progress
goes to stderr; `--json` prints the summary as one JSON object on stdout. A diverged run exits 1
with one line saying where and what to change; a bad field exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.train_fields import FIELDS, TrainField
from lowrank.cli._common import CliError, parse_str_list, print_json


def _flag(f: TrainField) -> str:
    return "--" + f.name.replace("_", "-")


def _help(f: TrainField) -> str:
    allowed = f" (one of {', '.join(f.choices)})" if f.choices else ""
    return f.doc + allowed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a (factored) network in the foreground",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON file of training fields (flags override it)")
    for f in FIELDS:  # parsed here without importing torch (so --help stays light)
        if f.base_type is bool:
            p.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=_help(f))
        else:
            p.add_argument(_flag(f), dest=f.name, default=None, metavar=f.name.upper(), help=_help(f))
    p.add_argument("--checkpoint-dir", help="write DIR/last.pt after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from DIR/last.pt when present")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The training fields: --config file first, then the flags given (recipe values are filled later)."""
    config: dict[str, Any] = {}
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except OSError as exc:
            raise CliError(f"--config: cannot read {args.config}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise CliError(f"--config: {args.config} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(config, dict):
            raise CliError(f"--config: {args.config} must hold a JSON object of training fields")
    for f in FIELDS:
        raw = getattr(args, f.name)
        if raw is None:
            continue
        kind = f.base_type
        if kind is bool or kind is str:
            config[f.name] = raw
        elif kind == list[str]:
            config[f.name] = parse_str_list(raw)
        else:
            try:
                config[f.name] = kind(raw)
            except ValueError:
                raise CliError(f"{_flag(f)} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    return config


def _epoch_line(epoch: int, epochs: int, step: int, m: dict[str, float]) -> str:
    return (f"epoch {epoch}/{epochs}  step {step}  train_loss {m['train_loss']:.4f}  "
            f"train_top1 {m['train_top1']:.4f}  val_loss {m['val_loss']:.4f}  val_top1 {m['val_top1']:.4f}  "
            f"val_top5 {m['val_top5']:.4f}  lr {m['lr']:.4g}  {m['epoch_time_s']:.1f} s  "
            f"{m['images_per_s']:.0f} img/s")


def recipe_line(config: dict[str, Any]) -> str:
    """What a run uses from its recipe, on one line (the resolved values)."""
    from core.recipes import RECIPE_FIELDS

    keys = (*RECIPE_FIELDS, "image_size", "small_input")
    return (f"{config['model']} on {config['dataset']}, recipe {config['recipe']}: "
            + ", ".join(f"{k} {config[k]}" for k in keys))


def run(args: argparse.Namespace) -> int:
    from core.data import DatasetError
    from core.factorize import FactorizeError
    from core.train import TrainCallbacks, TrainConfig, TrainingDiverged, train

    raw = config_from_args(args)
    try:
        config = TrainConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    if args.resume and not args.checkpoint_dir:
        raise CliError("--resume needs --checkpoint-dir (where last.pt lives)")

    class EpochPrinter(TrainCallbacks):
        started = False

        def on_progress(self, frac: float) -> None:
            if not self.started:  # after the first step: errors found while setting up stay one line
                self.started = True
                print(recipe_line(config.to_dict()), file=sys.stderr, flush=True)

        def on_metrics(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
            if "val_top1" in metrics:  # epoch-level report (step-level ones carry only loss and lr)
                print(_epoch_line(epoch, config.epochs, step, metrics), file=sys.stderr, flush=True)

    try:
        summary = train(config, checkpoint_dir=args.checkpoint_dir, resume=args.resume, callbacks=EpochPrinter())
    except TrainingDiverged as exc:  # the run failed (exit 1), not the command line (exit 2)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (DatasetError, FactorizeError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        # config problems train() finds late (device availability, resume mismatch)
        raise CliError(str(exc).splitlines()[0]) from None
    if args.json:
        for warning in summary["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        print_json(summary)
        return 0
    print(f"{config.model} on {config.dataset}: val_top1 {summary['val_top1']:.4f}  "
          f"val_top5 {summary['val_top5']:.4f}  val_loss {summary['val_loss']:.4f}  "
          f"after {summary['epochs']} epoch(s), {summary['wall_time_s']:.1f} s on {summary['device']}")
    print(f"parameters {summary['params_dense']:,} dense -> {summary['params_factored']:,}; "
          f"MACs/image {summary['macs_dense']:,} -> {summary['macs_factored']:,}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    return 0
