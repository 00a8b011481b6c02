"""Train a (factored) ResNet/EfficientNet: `train(config, checkpoint_dir=..., resume=..., callbacks=...)`.

* Model: `core.models.build_model`, then `core.factorize.factorize_model` when `rank` or
  `rank_ratio` is set (init `spectral`, `rescale`, `nkp` or `random`; MATH.md Section 7).
* Optimizer SGD (momentum, nesterov) or AdamW; per-step schedule: linear warm-up over
  `warmup_epochs`, then cosine to 0, step decay, or constant.
* Weight decay `standard`: the optimizer's decay on every parameter (for factored layers that
  is `||U||^2 + ||V||^2`). `frobenius` (Khodak et al. 2021): U and V get no optimizer decay;
  instead `weight_decay / 2 * sum ||U V||_F^2` is added to the loss, so its gradient is
  `weight_decay * (U V) V^T` for U (and alike for V), the analogue of standard decay's
  `weight_decay * W`. Other parameters keep the optimizer's decay. (With AdamW the penalty goes
  through Adam's normalization like any loss term; AdamW's decoupled decay covers the rest.)
* AMP (bf16/fp16) and channels-last on CUDA only; on CPU runs are seeded and deterministic.
* A checkpoint `checkpoint_dir/last.pt` after every epoch (written atomically): model,
  optimizer, schedule, grad scaler, RNG states (torch, CUDA, numpy, python, per process) and
  the data loader's generator, epoch, step, config, metric history. `resume=True` continues
  from it exactly (same metrics as an uninterrupted run on CPU).
* `config.devices > 1`: DistributedDataParallel under torchrun (core/distributed.py); metrics,
  callbacks and checkpoints come from rank 0.

Accuracies are fractions in [0, 1]; losses are mean cross-entropy per image (train loss with
label smoothing, as optimized; val loss without); times in seconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import time
import typing
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
WD_MODES = ("standard", "frobenius")
AMP_MODES = ("none", "bf16", "fp16")
INITS = ("spectral", "rescale", "nkp", "random")
# Fields that may change between a run and its resume without changing its results.
RESUME_MAY_DIFFER = ("num_workers", "log_every", "data_root", "download", "device")


class TrainingCancelled(Exception):
    """Raised by `train` when `callbacks.should_stop()` returned True; the last checkpoint stays valid."""


class TrainCallbacks:
    """Hooks `train` calls (override any; defaults do nothing). Called from rank 0 only.

    on_metrics(step, epoch, metrics): per epoch with train_loss, train_top1, val_loss, val_top1,
    val_top5, lr, epoch_time_s, images_per_s (train_loss and train_top1: means over the epoch); and
    every `log_every` optimizer steps with train_loss_step (the mean since the previous step-level
    report) and lr. The two loss statistics have different names because an epoch's last step can
    carry both: a stored series (unique on name + step) then never mixes them. `step` counts
    optimizer steps from 1, `epoch` counts from 1. on_progress(frac): fraction of all steps done, in [0, 1].
    should_stop(): polled between steps; True makes `train` raise TrainingCancelled (keep it cheap).
    """

    def on_metrics(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def on_progress(self, frac: float) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainConfig:
    model: str = "resnet18"               # a name in core.models.MODELS
    dataset: str = "digits"               # one of core.data.DATASETS
    num_classes: int | None = None        # None: the data set's (synthetic: 10)
    small_input: bool = False             # 3x3 stride-1 stem, no max-pool (32 px data; 16x the activations)
    image_size: int | None = None         # None: the data set's default (32; imagefolder 224)
    rank: int | None = None               # rank of every factored layer; None with rank_ratio None: dense
    rank_ratio: float | None = None       # rank as a fraction of min(out, in*kh*kw), in (0, 1]
    init: str = "nkp"                     # factor init: spectral | rescale | nkp | random
    include: list[str] | None = None      # dotted layer names to factor (default: all but stem/classifier)
    exclude: list[str] | None = None      # dotted layer names to keep dense
    epochs: int = 5
    batch_size: int = 128                 # per process
    lr: float = 0.1                       # peak learning rate (after warm-up)
    optimizer: str = "sgd"                # sgd | adamw
    momentum: float = 0.9                 # SGD momentum (AdamW: beta1)
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_mode: str = "standard"             # standard | frobenius (decay ||U V||_F^2 of factored layers)
    schedule: str = "cosine"              # cosine | step | constant (after warm-up)
    step_size: int = 30                   # step schedule: epochs between decays
    step_gamma: float = 0.1               # step schedule: decay factor
    warmup_epochs: float = 0.0            # linear warm-up length in epochs (fractions allowed)
    label_smoothing: float = 0.0
    amp: str = "none"                     # none | bf16 | fp16 (CUDA only)
    channels_last: bool = False           # CUDA only
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    devices: int = 1                      # processes (GPUs) for DistributedDataParallel
    seed: int = 0
    num_workers: int = 0                  # DataLoader worker processes
    data_root: str = "data"               # imagefolder / cifar location
    download: bool = False                # cifar: fetch when missing (never otherwise)
    synthetic_train_size: int = 1024
    synthetic_val_size: int = 256
    max_train_batches: int | None = None  # cap on steps per epoch (smoke runs, benchmarks)
    max_val_batches: int | None = None
    log_every: int = 50                   # optimizer steps between step-level on_metrics calls

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build and validate; unknown keys raise ValueError naming them and the allowed keys."""
        if not isinstance(d, dict):
            raise ValueError(f"train config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train config key(s): {', '.join(unknown)}; "
                             f"allowed: {', '.join(f.name for f in fields(cls))}")
        config = cls(**d)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check types and ranges; ValueError naming the field and what is allowed. Returns self."""
        from core.data import DATASETS
        from core.models import MODELS

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

        def at_least(name: str, low: float, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value!r}")

        choice("model", tuple(MODELS))
        choice("dataset", DATASETS)
        choice("init", INITS)
        choice("optimizer", OPTIMIZERS)
        choice("wd_mode", WD_MODES)
        choice("schedule", SCHEDULES)
        choice("amp", AMP_MODES)
        for name in ("epochs", "batch_size", "step_size", "devices", "synthetic_train_size",
                     "synthetic_val_size", "log_every"):
            at_least(name, 1)
        for name in ("num_classes", "rank", "max_train_batches", "max_val_batches"):
            at_least(name, 1, optional=True)
        at_least("image_size", 8, optional=True)
        for name in ("weight_decay", "warmup_epochs", "seed", "num_workers"):
            at_least(name, 0)
        if self.rank is not None and self.rank_ratio is not None:
            raise ValueError("give at most one of rank and rank_ratio (both are set)")
        if not self.factored and (self.include or self.exclude):
            raise ValueError("include/exclude choose layers to factor: give rank or rank_ratio too")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise ValueError(f"rank_ratio must be in (0, 1], got {self.rank_ratio!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        if not 0 < self.step_gamma <= 1:
            raise ValueError(f"step_gamma must be in (0, 1], got {self.step_gamma!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be <= epochs ({self.epochs}), got {self.warmup_epochs!r}")
        if self.device != "auto" and self.device != "cpu" and not (
                self.device == "cuda" or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device == "cpu" and self.amp != "none":
            raise ValueError(f"amp={self.amp!r} needs a CUDA device; on device cpu use amp='none'")
        if self.device == "cpu" and self.channels_last:
            raise ValueError("channels_last needs a CUDA device; on device cpu set channels_last=false")
        if self.dataset in ("cifar10", "cifar100") and self.image_size not in (None, 32):
            raise ValueError(f"image_size: {self.dataset} images are 32 px, got {self.image_size}")
        return self

    @property
    def factored(self) -> bool:
        return self.rank is not None or self.rank_ratio is not None


def _check_type(name: str, value: Any, hint: Any) -> None:
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return
        raise ValueError(f"{name} must not be null")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")
    elif base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    elif base is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")


# ----------------------------------------------------------------------------- helpers

def resolve_device(config: TrainConfig, local_rank: int = 0) -> torch.device:
    """The torch device for `config.device` (per process under DDP); ValueError when unavailable."""
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}: CUDA is not available here; use device 'cpu'")
        index = int(want[5:]) if ":" in want else 0
        index += local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {config.device!r}: needs GPU {index}, only "
                             f"{torch.cuda.device_count()} visible")
        return torch.device("cuda", index)
    if config.amp != "none":
        raise ValueError(f"amp={config.amp!r} needs a CUDA device; device resolves to cpu: use amp='none'")
    if config.channels_last:
        raise ValueError("channels_last needs a CUDA device; device resolves to cpu: set channels_last=false")
    return torch.device("cpu")


def derive_seed(*parts: Any) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's key array as a tensor keeps the checkpoint loadable with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def lr_factor(step: int, *, steps_per_epoch: int, total_steps: int, warmup_steps: int,
              schedule: str, step_size: int, step_gamma: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
    if schedule == "step":
        return step_gamma ** ((step // steps_per_epoch) // step_size)
    return 1.0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (in state_dict order): equal iff the weights are identical."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _loss_top(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed (plain) cross-entropy, top-1 hits and top-k hits of a batch, as tensors."""
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    topk = logits.topk(k, dim=1).indices
    hits = topk == labels[:, None]
    return loss, hits[:, 0].sum(), hits.any(dim=1).sum()


@dataclass
class _Dist:
    """This process's place in a DistributedDataParallel run (world 1: no DDP)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def any_true(self, flag: bool, device: torch.device) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.broadcast(t, src=0)  # rank 0's callbacks decide for everyone
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# ----------------------------------------------------------------------------- training

def train(config: TrainConfig | dict[str, Any], *, checkpoint_dir: str | os.PathLike | None = None,
          resume: bool = False, callbacks: TrainCallbacks | None = None) -> dict[str, Any]:
    """Train `config` and return a JSON-able summary.

    Summary keys: val_top1, val_top5, val_loss, train_loss, train_top1 (last epoch),
    best_val_top1, params_dense, params_factored, macs_dense, macs_factored (per image at the
    data's image size), epochs (completed), wall_time_s (training time summed over resumes),
    device, world_size, init_report (per-layer rows of `factorize_model`, None when dense),
    init_totals, resumed_from_epoch (None when started fresh), history (per-epoch metrics), config.
    With `resume=True` and `checkpoint_dir/last.pt` present, training continues from it (its
    config must match but for RESUME_MAY_DIFFER); without a checkpoint it starts fresh.
    `config.devices > 1` runs under torchrun with DDP (see core/distributed.py).
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config)
    else:
        config.validate()
    callbacks = callbacks or TrainCallbacks()
    if config.devices > 1:
        from core import distributed

        if distributed.in_process_group():
            return _Trainer(config, checkpoint_dir, resume, callbacks, distributed.current()).run()
        return distributed.launch(config, checkpoint_dir=checkpoint_dir, resume=resume, callbacks=callbacks)
    return _Trainer(config, checkpoint_dir, resume, callbacks, _Dist()).run()


class _Trainer:
    def __init__(self, config: TrainConfig, checkpoint_dir: str | os.PathLike | None, resume: bool,
                 callbacks: TrainCallbacks, dist: _Dist) -> None:
        self.config, self.callbacks, self.dist = config, callbacks, dist
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = resume
        self.device = resolve_device(config, dist.local_rank if dist.world > 1 else 0)

    # -- setup
    def _build(self, checkpoint: dict[str, Any] | None) -> None:
        from torch.utils.data import DataLoader, Subset
        from torch.utils.data.distributed import DistributedSampler

        from core.data import build_datasets
        from core.factorize import factorize_model
        from core.models import build_model, count_macs, count_params

        cfg, dist = self.config, self.dist
        train_ds, val_ds, info = build_datasets(
            cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size, download=cfg.download,
            seed=cfg.seed, num_classes=cfg.num_classes, synthetic_train_size=cfg.synthetic_train_size,
            synthetic_val_size=cfg.synthetic_val_size)
        self.info = info
        if len(train_ds) < cfg.batch_size * dist.world:
            raise ValueError(f"batch_size: {cfg.batch_size} x {dist.world} process(es) exceeds the "
                             f"{len(train_ds)} training images of {cfg.dataset}")

        seed_everything(cfg.seed)  # same model init in every process
        model = build_model(cfg.model, num_classes=info.num_classes, small_input=cfg.small_input)
        image = (3, info.image_size, info.image_size)
        self.params_dense = count_params(model)
        self.macs_dense = count_macs(model, image)
        self.init_report = None
        if cfg.factored:
            # On resume (or on ranks > 0, which DDP overwrites with rank 0's weights) only the
            # structure is needed; the factors come from the checkpoint / the broadcast.
            compute = checkpoint is None and dist.main
            report = factorize_model(model, rank=cfg.rank, rank_ratio=cfg.rank_ratio, method=cfg.init,
                                     include=cfg.include, exclude=cfg.exclude, seed=cfg.seed,
                                     compute_init=compute)
            if compute:
                self.init_report = report.to_dict()
            elif checkpoint is not None:
                self.init_report = checkpoint.get("init_report")
        self.params_factored = count_params(model)
        self.macs_factored = count_macs(model, image)

        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.raw_model = model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(model, device_ids=ids)  # broadcasts rank 0's weights to all ranks
        else:
            self.model = model

        # Loaders: the generator (seeded from seed and rank; its state goes into every checkpoint)
        # draws the shuffle order and the worker processes' seeds; under DDP the DistributedSampler
        # shuffles with (seed, epoch).
        self.loader_gen = torch.Generator()
        self.loader_gen.manual_seed(derive_seed(cfg.seed, "loader", dist.rank))
        if dist.world > 1:
            self.sampler = DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank,
                                              shuffle=True, seed=cfg.seed, drop_last=True)
            shuffle = None
        else:
            self.sampler, shuffle = None, True
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=shuffle,
                                       sampler=self.sampler, num_workers=cfg.num_workers,
                                       generator=self.loader_gen, drop_last=True, pin_memory=pin,
                                       persistent_workers=False)
        # Validation: each process takes every world-th image (no padding), sums are all-reduced.
        val_part = Subset(val_ds, range(dist.rank, len(val_ds), dist.world)) if dist.world > 1 else val_ds
        self.val_loader = DataLoader(val_part, batch_size=cfg.batch_size, shuffle=False,
                                     num_workers=cfg.num_workers, pin_memory=pin)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.max_train_batches is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_train_batches)
        self.total_steps = self.steps_per_epoch * cfg.epochs

        # Optimizer: with Frobenius decay the factors get no optimizer decay (the loss carries it).
        from core.layers import factor_parameters

        factor_ids = {id(p) for p in factor_parameters(model)} if cfg.wd_mode == "frobenius" else set()
        decay = [p for p in model.parameters() if id(p) not in factor_ids]
        no_decay = [p for p in model.parameters() if id(p) in factor_ids]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                                warmup_steps=warmup, schedule=cfg.schedule, step_size=cfg.step_size,
                                step_gamma=cfg.step_gamma))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # -- checkpoints
    def _load_checkpoint(self) -> dict[str, Any] | None:
        if not (self.resume and self.checkpoint_dir is not None):
            return None
        path = self.checkpoint_dir / "last.pt"
        if not path.exists():
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
        now = self.config.to_dict()
        differ = sorted(k for k in set(saved) | set(now)
                        if k not in RESUME_MAY_DIFFER and saved.get(k) != now.get(k))
        if differ:
            raise ValueError(f"resume: {path} was written with a different config; differing field(s): "
                             + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in differ))
        return ckpt

    def _save_checkpoint(self, epoch: int, step: int) -> None:
        states = self.dist.gather({"rng": _rng_state(), "loader_generator": self.loader_gen.get_state()})
        if self.checkpoint_dir is None or not self.dist.main:
            return
        atomic_save({
            "format": 1,
            "config": self.config.to_dict(),
            "epoch": epoch,
            "step": step,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": [s["rng"] for s in states],
            "loader_generator": [s["loader_generator"] for s in states],
            "history": self.history,
            "init_report": self.init_report,
            "wall_time_s": self.wall_time_s,
            "world_size": self.dist.world,
        }, self.checkpoint_dir / "last.pt")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"][self.dist.rank])
        self.loader_gen.set_state(ckpt["loader_generator"][self.dist.rank])
        self.history = list(ckpt["history"])
        self.wall_time_s = float(ckpt["wall_time_s"])

    # -- loops
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        from core.layers import frobenius_penalty

        cfg, dev = self.config, self.device
        self.model.train()
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        hits = torch.zeros((), device=dev, dtype=torch.int64)
        seen = 0
        log_loss = torch.zeros((), device=dev, dtype=torch.float64)
        log_n = 0
        frob = cfg.wd_mode == "frobenius" and cfg.weight_decay > 0
        t0 = time.perf_counter()
        for images, labels in itertools.islice(self.train_loader, self.steps_per_epoch):
            if self.dist.any_true(self.dist.main and self.callbacks.should_stop(), dev):
                raise TrainingCancelled(f"cancelled at epoch {epoch + 1}, step {self.step}")
            images, labels = self._to_device(images, labels)
            with self._autocast():
                logits = self.model(images)
                loss = self.criterion(logits.float(), labels)
            total = loss
            if frob:
                total = loss + 0.5 * cfg.weight_decay * frobenius_penalty(self.raw_model).to(loss.device)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                total.backward()
                self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            n = labels.shape[0]
            seen += n
            batch_loss = loss.detach().double() * n
            loss_sum += batch_loss
            log_loss += batch_loss
            log_n += n
            hits += (logits.detach().argmax(1) == labels).sum()
            if self.step % cfg.log_every == 0:
                step_loss = self.dist.all_sum([log_loss.item(), float(log_n)], dev)
                if self.dist.main:
                    self.callbacks.on_metrics(self.step, epoch + 1, {
                        "train_loss_step": step_loss[0] / step_loss[1], "lr": self.optimizer.param_groups[0]["lr"]})
                log_loss.zero_()
                log_n = 0
            self._progress()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_time = time.perf_counter() - t0
        totals = self.dist.all_sum([loss_sum.item(), float(hits.item()), float(seen)], dev)
        return {"train_loss": totals[0] / totals[2], "train_top1": totals[1] / totals[2],
                "images_per_s": totals[2] / train_time, "train_time_s": train_time}

    def _progress(self) -> None:
        pct = int(100 * self.step / self.total_steps)
        if self.dist.main and pct != self._last_pct:
            self._last_pct = pct
            self.callbacks.on_progress(min(1.0, self.step / self.total_steps))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """val_loss, val_top1, val_top5 of the current weights (eval mode, all of val / max_val_batches)."""
        model, dev = self.raw_model, self.device
        model.eval()
        k = min(5, self.info.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=dev)
        for images, labels in itertools.islice(self.val_loader, self.config.max_val_batches):
            images, labels = self._to_device(images, labels)
            with self._autocast():
                logits = model(images)
            loss, top1, topk = _loss_top(logits.float(), labels, k)
            sums += torch.stack([loss.double(), top1.double(), topk.double(),
                                 torch.tensor(labels.shape[0], dtype=torch.float64, device=dev)])
        loss, top1, topk, n = self.dist.all_sum(sums.tolist(), dev)
        n = max(n, 1.0)
        return {"val_loss": loss / n, "val_top1": top1 / n, "val_top5": topk / n}

    def _sync_buffers(self) -> None:
        # BatchNorm running statistics drift apart per process; rank 0's are the model's.
        if self.dist.world == 1:
            return
        import torch.distributed as dist

        for buf in self.raw_model.buffers():
            dist.broadcast(buf, src=0)

    def run(self) -> dict[str, Any]:
        ckpt = self._load_checkpoint()
        self._build(ckpt)
        self.history: list[dict[str, float]] = []
        self.wall_time_s = 0.0
        start_epoch, self.step = 0, 0
        if ckpt is not None:
            self._restore(ckpt)
            start_epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        else:
            seed_everything(derive_seed(self.config.seed, "train", self.dist.rank))
        self._last_pct = -1
        for epoch in range(start_epoch, self.config.epochs):
            t0 = time.perf_counter()
            metrics = self._train_epoch(epoch)
            self._sync_buffers()
            metrics.update(self.evaluate())
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            metrics["epoch_time_s"] = time.perf_counter() - t0
            metrics["epoch"] = epoch + 1
            bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(metrics[k])]
            if bad:  # NaN/inf is no result to store or resume from (and not valid JSON)
                raise FloatingPointError(f"training diverged: {bad[0]} is {metrics[bad[0]]} after epoch "
                                         f"{epoch + 1}; try a lower lr (now {self.config.lr}) or more warm-up")
            self.wall_time_s += metrics["epoch_time_s"]
            self.history.append(metrics)
            if self.dist.main:
                self.callbacks.on_metrics(self.step, epoch + 1, {
                    k: metrics[k] for k in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                                            "lr", "epoch_time_s", "images_per_s")})
            self._save_checkpoint(epoch + 1, self.step)
        return self._summary(resumed_from=int(ckpt["epoch"]) if ckpt is not None else None)

    def _summary(self, resumed_from: int | None) -> dict[str, Any]:
        last = self.history[-1] if self.history else self.evaluate()
        fingerprints = self.dist.gather(weights_fingerprint(self.raw_model)) if self.dist.world > 1 else []
        summary = {
            "val_top1": last["val_top1"],
            "val_top5": last["val_top5"],
            "val_loss": last["val_loss"],
            "train_loss": last.get("train_loss"),
            "train_top1": last.get("train_top1"),
            "best_val_top1": max((h["val_top1"] for h in self.history), default=last["val_top1"]),
            "params_dense": self.params_dense,
            "params_factored": self.params_factored,
            "macs_dense": self.macs_dense,
            "macs_factored": self.macs_factored,
            "epochs": len(self.history),
            "wall_time_s": self.wall_time_s,
            "device": _device_name(self.device),
            "world_size": self.dist.world,
            "init_report": self.init_report["layers"] if self.init_report else None,
            "init_totals": self.init_report["totals"] if self.init_report else None,
            "resumed_from_epoch": resumed_from,
            "history": self.history,
            "config": self.config.to_dict(),
        }
        if self.dist.world > 1:
            summary["rank_fingerprints"] = fingerprints
            summary["ranks_in_sync"] = len(set(fingerprints)) == 1
        json.dumps(summary)  # the contract: JSON-able
        return summary


__all__ = ["TrainConfig", "TrainCallbacks", "TrainingCancelled", "train", "resolve_device",
           "lr_factor", "weights_fingerprint"]
