"""`lowrank train`: train a (factored) network here, in the foreground.

    lowrank train --model resnet18 --dataset digits --rank-ratio 0.25 --init nkp --epochs 3
                  [--batch-size 128] [--lr 0.1] [--seed 0] [--checkpoint-dir DIR] [--resume] [--json]

Every TrainConfig field (core/train.py) has a flag; `--config FILE` reads a JSON object of
TrainConfig keys first, and flags given on the command line override it. Progress goes to
stderr; `--json` prints the summary as one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lowrank.cli._common import CliError, parse_str_list, print_json

# flag -> (TrainConfig key, type); parsed here without importing torch (so --help stays light).
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "resnet18|resnet34|resnet50|resnet101|efficientnet_b0..b3"),
    ("--dataset", "dataset", str, "digits|synthetic|cifar10|cifar100|imagefolder"),
    ("--num-classes", "num_classes", int, "default: the data set's"),
    ("--image-size", "image_size", int, "px (default: the data set's)"),
    ("--rank", "rank", int, "rank of every factored layer"),
    ("--rank-ratio", "rank_ratio", float, "rank as a fraction of min(out, in*kh*kw)"),
    ("--init", "init", str, "spectral|rescale|nkp|random"),
    ("--include", "include", "list", "comma-separated dotted layer names to factor"),
    ("--exclude", "exclude", "list", "comma-separated dotted layer names to keep dense"),
    ("--epochs", "epochs", int, ""),
    ("--batch-size", "batch_size", int, "per process"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--optimizer", "optimizer", str, "sgd|adamw"),
    ("--momentum", "momentum", float, ""),
    ("--weight-decay", "weight_decay", float, ""),
    ("--wd-mode", "wd_mode", str, "standard|frobenius"),
    ("--schedule", "schedule", str, "cosine|step|constant"),
    ("--step-size", "step_size", int, "step schedule: epochs between decays"),
    ("--step-gamma", "step_gamma", float, "step schedule: decay factor"),
    ("--warmup-epochs", "warmup_epochs", float, ""),
    ("--label-smoothing", "label_smoothing", float, ""),
    ("--amp", "amp", str, "none|bf16|fp16 (CUDA only)"),
    ("--device", "device", str, "auto|cpu|cuda|cuda:N"),
    ("--devices", "devices", int, "processes (GPUs) for DDP via torchrun"),
    ("--seed", "seed", int, ""),
    ("--num-workers", "num_workers", int, "data loader worker processes"),
    ("--data-root", "data_root", str, "imagefolder/cifar location"),
    ("--synthetic-train-size", "synthetic_train_size", int, ""),
    ("--synthetic-val-size", "synthetic_val_size", int, ""),
    ("--max-train-batches", "max_train_batches", int, "cap on steps per epoch"),
    ("--max-val-batches", "max_val_batches", int, ""),
    ("--log-every", "log_every", int, "steps between step-level metrics"),
]
_SWITCHES = [("--nesterov", "nesterov"), ("--channels-last", "channels_last"),
             ("--small-input", "small_input"), ("--download", "download")]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a (factored) network in the foreground",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON file of TrainConfig keys (flags override it)")
    for flag, key, _, help_text in _FLAGS:
        p.add_argument(flag, dest=key, default=None, metavar=key.upper(), help=help_text or None)
    for flag, key in _SWITCHES:
        p.add_argument(flag, dest=key, action="store_const", const=True, default=None)
    p.add_argument("--checkpoint-dir", help="write DIR/last.pt after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from DIR/last.pt when present")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig dict: --config file first, then the flags given."""
    config: dict[str, Any] = {}
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except OSError as exc:
            raise CliError(f"--config: cannot read {args.config}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise CliError(f"--config: {args.config} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(config, dict):
            raise CliError(f"--config: {args.config} must hold a JSON object of TrainConfig keys")
    for flag, key, kind, _ in _FLAGS:
        raw = getattr(args, key)
        if raw is None:
            continue
        if kind == "list":
            config[key] = parse_str_list(raw)
            continue
        try:
            config[key] = kind(raw)
        except ValueError:
            raise CliError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    for _, key in _SWITCHES:
        if getattr(args, key):
            config[key] = True
    config.setdefault("model", "resnet18")
    config.setdefault("dataset", "digits")
    return config


def _epoch_line(epoch: int, epochs: int, step: int, m: dict[str, float]) -> str:
    return (f"epoch {epoch}/{epochs}  step {step}  train_loss {m['train_loss']:.4f}  "
            f"train_top1 {m['train_top1']:.4f}  val_loss {m['val_loss']:.4f}  val_top1 {m['val_top1']:.4f}  "
            f"val_top5 {m['val_top5']:.4f}  lr {m['lr']:.4g}  {m['epoch_time_s']:.1f} s  "
            f"{m['images_per_s']:.0f} img/s")


def run(args: argparse.Namespace) -> int:
    from core.data import DatasetError
    from core.factorize import FactorizeError
    from core.train import TrainCallbacks, TrainConfig, train

    raw = config_from_args(args)
    try:
        config = TrainConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    if args.resume and not args.checkpoint_dir:
        raise CliError("--resume needs --checkpoint-dir (where last.pt lives)")

    class EpochPrinter(TrainCallbacks):
        def on_metrics(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
            if "val_top1" in metrics:  # epoch-level report (step-level ones carry only loss and lr)
                print(_epoch_line(epoch, config.epochs, step, metrics), file=sys.stderr, flush=True)

    try:
        summary = train(config, checkpoint_dir=args.checkpoint_dir, resume=args.resume, callbacks=EpochPrinter())
    except (DatasetError, FactorizeError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        # config problems train() finds late (device availability, resume mismatch, batch size)
        raise CliError(str(exc).splitlines()[0]) from None
    if args.json:
        print_json(summary)
        return 0
    print(f"{config.model} on {config.dataset}: val_top1 {summary['val_top1']:.4f}  "
          f"val_top5 {summary['val_top5']:.4f}  val_loss {summary['val_loss']:.4f}  "
          f"after {summary['epochs']} epoch(s), {summary['wall_time_s']:.1f} s on {summary['device']}")
    print(f"parameters {summary['params_dense']:,} dense -> {summary['params_factored']:,}; "
          f"MACs/image {summary['macs_dense']:,} -> {summary['macs_factored']:,}")
    return 0
