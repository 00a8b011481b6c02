"""One compression run from a config: source file + data set + options -> compressed model + report.

`run_compress(config)` is what `lowrank compress` runs here (and what a worker will run): load the
trained source (core/source.py), draw disjoint calibration and held-out images from the data
set's training split (in its evaluation preprocessing), measure the dense top-1 on the validation
split, compress (core/compress.py), measure top-1 before and after BN re-estimation, and
then optionally fine-tune it (`finetune_epochs`: core.train's loop, started from the compressed
model, with the data set's recipe and the `finetune` overrides) and save it (core/artifact.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from core.calibration import CalibrationCancelled
from core.compress import CompressCallbacks, CompressOptions, CompressResult, compress_model
from core.train import TrainCallbacks, TrainingCancelled

__all__ = ["CompressConfig", "FinetuneCancelled", "run_compress", "finetune_config"]


class FinetuneCancelled(CalibrationCancelled, TrainingCancelled):
    """`should_stop()` returned True during fine-tuning (caught as either cancel exception)."""


@dataclass
class CompressConfig(CompressOptions):
    """Every CompressOptions field plus where the model and the data come from."""

    source: str = ""                      # train checkpoint last.pt, state_dict (.safetensors/.pt) or compressed model
    model: str | None = None              # architecture (core.models) when the file does not say it
    num_classes: int | None = None        # default: read off the classifier
    small_input: bool | None = None       # default: the checkpoint's, or read off a ResNet stem
    dataset: str = "digits"               # core.data.DATASETS; calibration from its training split
    data_root: str = "data"
    image_size: int | None = None         # default: the train checkpoint's (same data set), else the data set's
    synthetic_train_size: int = 1024
    synthetic_val_size: int = 256
    calib_images: int = 256               # images whose patches fit the statistics
    heldout_images: int = 64              # disjoint images the per-layer errors are measured on
    calib_batch_size: int = 64
    max_val_batches: int | None = None    # cap on validation batches for top-1 (None: all)
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    finetune_epochs: int = 0              # epochs of training the compressed model (0: evaluate only)
    finetune: dict[str, Any] = field(default_factory=dict)  # training-field overrides (core.train_fields.
    #                                       FINETUNE_FIELDS); the rest from the recipe, as for `lowrank train`

    def validate(self) -> CompressConfig:
        """ValueError (core.train_fields.FieldError) naming the field: core.compress_fields' table (finetune_epochs
        among its fields), then each `finetune` override (core.train_fields.check_finetune). Returns self."""
        from core import compress_fields
        from core.train_fields import check_finetune

        compress_fields.validate(self.to_dict())
        check_finetune(self.finetune)  # FieldError naming finetune.<field>
        if not self.source:
            raise ValueError("source must name a checkpoint, state_dict or compressed-model file")
        return self

    def options(self) -> CompressOptions:
        return CompressOptions(**{f.name: getattr(self, f.name) for f in fields(CompressOptions)})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here; use device 'cpu'")
    return torch.device(name)


def finetune_config(config: CompressConfig, model: str, small_input: bool, image_size: int,
                    num_classes: int | None = None):
    """The core.train.TrainConfig that fine-tunes `config`'s compressed model: the run's model, data, image
    size, seed, device and val cap, `finetune_epochs` epochs, `config.finetune`'s overrides, the recipe's
    values for the rest. FieldError naming `finetune.<field>` (or finetune_epochs) when they cannot train."""
    from core.train import TrainConfig
    from core.train_fields import FieldError, finetune_error

    values = {"model": model, "dataset": config.dataset, "data_root": config.data_root, "image_size": image_size,
              "small_input": small_input, "num_classes": num_classes if config.dataset == "synthetic" else None,
              "init": "dense", "epochs": config.finetune_epochs, "seed": config.seed, "device": config.device,
              "synthetic_train_size": config.synthetic_train_size, "synthetic_val_size": config.synthetic_val_size,
              "max_val_batches": config.max_val_batches, **config.finetune}
    try:
        return TrainConfig.from_dict(values)
    except FieldError as exc:
        raise finetune_error(exc) from None


class _Share(CompressCallbacks):
    """`cb` with on_progress mapped onto [start, start + span] (compression, then fine-tuning, share 0..1)."""

    def __init__(self, cb: CompressCallbacks, start: float, span: float) -> None:
        self.cb, self.start, self.span = cb, start, span

    def on_stage(self, stage: str) -> None:
        self.cb.on_stage(stage)

    def on_progress(self, frac: float) -> None:
        self.cb.on_progress(self.start + self.span * frac)

    def on_layer(self, row: dict[str, Any]) -> None:
        self.cb.on_layer(row)

    def on_metrics(self, metrics: dict[str, float]) -> None:
        self.cb.on_metrics(metrics)

    def should_stop(self) -> bool:
        return self.cb.should_stop()


class _FinetuneCallbacks(TrainCallbacks):
    """core.train's hooks onto a CompressCallbacks: epoch metrics -> on_epoch, progress, should_stop; and
    with bn_reestimate, BN statistics re-estimated on the calibration images before each epoch's evaluation."""

    def __init__(self, cb: _Share, bn_loader: Any | None, device: torch.device) -> None:
        self.cb, self.bn_loader, self.device = cb, bn_loader, device

    def before_evaluate(self, model: torch.nn.Module) -> None:
        # Training's running statistics lag weights that still move (a short fine-tuning of a damaged
        # network: measured 0.18 val top-1 with them, 0.87 re-estimated); only the eval-mode numbers change.
        if self.bn_loader is not None:
            from core.calibration import reestimate_bn

            reestimate_bn(model, self.bn_loader, self.device)
            model.train()

    def on_metrics(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        if "val_top1" in metrics:  # the epoch-level report (step-level ones carry train_loss_step and lr)
            self.cb.cb.on_epoch(epoch, dict(metrics))

    def on_progress(self, frac: float) -> None:
        self.cb.on_progress(frac)

    def should_stop(self) -> bool:
        return self.cb.should_stop()


def _finetune(result: CompressResult, config: CompressConfig, train_config: Any, cb: _Share, bn_loader: Any | None,
              device: torch.device) -> dict[str, Any]:
    """Train result.model in place for finetune_epochs (core.train with init_model); the report's finetune entry."""
    from core.train import train
    from core.train_fields import FINETUNE_FIELDS

    cb.on_stage("finetune")
    try:
        summary = train(train_config, callbacks=_FinetuneCallbacks(cb, bn_loader, device), init_model=result.model)
    except TrainingCancelled as exc:
        raise FinetuneCancelled(f"fine-tuning {exc}") from None
    result.model.eval()
    resolved = train_config.to_dict()
    keep = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_time_s", "images_per_s")
    return {"epochs": config.finetune_epochs, **{k: resolved[k] for k in FINETUNE_FIELDS},
            "bn_reestimate": bn_loader is not None,
            "history": [{"epoch": h["epoch"], **{k: h[k] for k in keep}} for h in summary["history"]],
            "time_s": summary["wall_time_s"], "warnings": summary["warnings"]}


def run_compress(config: CompressConfig | dict[str, Any], *, callbacks: CompressCallbacks | None = None,
                 save_path: str | None = None) -> CompressResult:
    """Compress `config.source` as configured, fine-tune it when asked; the report adds source, data and top-1.

    report["top1"]: dense, compressed_before_bn (the factors alone), compressed (after BN
    re-estimation on the calibration images; equal to the former when bn_reestimate is false) and
    finetuned (val top-1 after each fine-tuning epoch, BN statistics re-estimated on the calibration
    images first when bn_reestimate is set; empty without), fractions of the validation split. report["finetune"]: None, or the resolved training values (recipe included), per-epoch
    history, time and warnings. Fine-tuning calls callbacks.on_stage("finetune"), on_epoch after each
    epoch and polls should_stop between steps (FinetuneCancelled); a diverging loss raises
    core.guards.TrainingDiverged. save_path: also write the model there (the fine-tuned one if any).
    """
    from torch.utils.data import DataLoader

    from core.artifact import save_compressed
    from core.calibration import calibration_subsets, evaluate_top1, reestimate_bn
    from core.data import build_datasets
    from core.source import load_source_model

    config = config if isinstance(config, CompressConfig) else CompressConfig.from_dict(config)
    config.validate()
    user_cb = callbacks or CompressCallbacks()
    compress_share = 1.0 / (1 + config.finetune_epochs)  # progress: compression weighs as much as an epoch
    cb = _Share(user_cb, 0.0, compress_share)
    device = _device(config.device)
    t0 = time.perf_counter()
    net, source = load_source_model(config.source, config.model, num_classes=config.num_classes,
                                    small_input=config.small_input)
    image_size = config.image_size
    # What the source was trained (a train checkpoint) or compressed (a compressed artifact) on.
    trained = source.train_config or ((source.compressed_spec or {}).get("extra") or {}).get("data") or {}
    if image_size is None and trained.get("dataset") == config.dataset:
        image_size = trained.get("image_size")  # the size it was trained at (digits' recipe: the native 8 px)
    train_ds, val_ds, data = build_datasets(
        config.dataset, data_root=config.data_root, image_size=image_size, seed=config.seed,
        num_classes=source.num_classes if config.dataset == "synthetic" else None,
        synthetic_train_size=config.synthetic_train_size, synthetic_val_size=config.synthetic_val_size)
    if data.num_classes != source.num_classes:
        raise ValueError(f"num_classes: the model has {source.num_classes} outputs, data set {config.dataset} "
                         f"has {data.num_classes} classes")
    train_config = None  # resolved and checked before any work
    if config.finetune_epochs > 0:
        train_config = finetune_config(config, source.model, source.small_input, data.image_size, source.num_classes)
    fit, held = calibration_subsets(train_ds, val_ds, config.calib_images, config.heldout_images, config.seed)
    bs = config.calib_batch_size
    fit_loader, held_loader = DataLoader(fit, batch_size=bs), DataLoader(held, batch_size=bs)
    val_loader = DataLoader(val_ds, batch_size=bs)

    net.to(device)
    top1 = {"dense": evaluate_top1(net, val_loader, device, config.max_val_batches)["top1"]}
    cb.on_metrics({"top1_dense": top1["dense"]})
    options = dataclasses.replace(config.options(), bn_reestimate=False)  # re-estimated below, measured both ways
    result = compress_model(net, fit_loader, held_loader, options, device=device, callbacks=cb,
                            input_size=(3, data.image_size, data.image_size))
    top1["compressed_before_bn"] = evaluate_top1(result.model, val_loader, device, config.max_val_batches)["top1"]
    bn_images = None
    if config.bn_reestimate:
        bn_images = reestimate_bn(result.model, fit_loader, device)
        top1["compressed"] = evaluate_top1(result.model, val_loader, device, config.max_val_batches)["top1"]
    else:
        top1["compressed"] = top1["compressed_before_bn"]
    cb.on_metrics({"top1_compressed_before_bn": top1["compressed_before_bn"], "top1_compressed": top1["compressed"]})
    top1["finetuned"] = []
    finetune = None
    if train_config is not None:
        finetune = _finetune(result, config, train_config, _Share(user_cb, compress_share, 1.0 - compress_share),
                             fit_loader if config.bn_reestimate else None, device)
        top1["finetuned"] = [h["val_top1"] for h in finetune["history"]]
        cb.on_metrics({"top1_finetuned": top1["finetuned"][-1]})

    report = result.report
    report["finetune"] = finetune
    report["options"] = config.to_dict()
    report["top1"] = top1
    report["calibration"]["bn_reestimate_images"] = bn_images
    src = source.to_dict()
    if src.get("compressed_spec"):
        src["compressed_spec"] = {"factored_layers": len(src["compressed_spec"]["factored"])}
    report["source"] = src
    report["data"] = {"dataset": data.name, "image_size": data.image_size, "num_classes": data.num_classes,
                      "calib_images": len(fit), "heldout_images": len(held), "val_images": len(val_ds)}
    report["device"] = str(device)
    report["totals"]["run_time_s"] = time.perf_counter() - t0
    if save_path is not None:
        arch = {"model": source.model, "num_classes": source.num_classes, "small_input": source.small_input}
        save_compressed(save_path, result.model, arch, extra={
            "method": config.method, "options": config.to_dict(), "contexts": result.contexts,
            "top1": top1, "source": str(config.source),
            # The data it was calibrated and measured on: a later compress of this file uses the same size.
            "data": {"dataset": data.name, "image_size": data.image_size},
            "finetune": None if finetune is None else {k: v for k, v in finetune.items() if k != "history"}})
        report["saved"] = str(save_path)
    return result
