"""Train a (factored) ResNet/EfficientNet: `train(config, checkpoint_dir=..., resume=..., callbacks=...)`.

* Config: `TrainConfig`, built from core.train_fields (the fields the service's job spec has too);
  fields left out take the recipe's values (core.recipes: per data set and model family).
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
* Guards (core/guards.py): a non-finite loss, or one far above its starting value, raises
  TrainingDiverged with where, the loss and what to change; a final accuracy at chance level adds
  a line to the summary's `warnings`.

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
import zlib
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import recipes, train_fields
from core.guards import DivergenceGuard, TrainingDiverged, chance_warning
from core.run_context import ProcessGroup, TrainCallbacks, TrainingCancelled, current, in_process_group

# Fields that may change between a run and its resume without changing its results.
RESUME_MAY_DIFFER = ("num_workers", "log_every", "data_root", "download", "device", "recipe")


class _TrainConfigMethods:
    """What TrainConfig does besides holding its fields (core.train_fields.FIELDS, one attribute each)."""

    def __post_init__(self) -> None:
        # Fields left None take the recipe's value (core.recipes): a config always holds what runs.
        resolved = recipes.resolve(self.to_dict())
        for name in train_fields.RESOLVED_FIELDS:
            setattr(self, name, resolved.get(name))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build (recipe resolved) and validate; unknown keys raise ValueError naming them and the allowed keys."""
        if not isinstance(d, dict):
            raise ValueError(f"train config must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown train config key(s): {', '.join(unknown)}; allowed: {', '.join(known)}")
        config = cls(**d)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Types, ranges and the rules across fields (core.train_fields); FieldError (a ValueError) naming
        the field and what is allowed. Returns self."""
        train_fields.validate(self.to_dict())
        return self

    @property
    def factored(self) -> bool:
        return self.rank is not None or self.rank_ratio is not None


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(f.name, f.type, dataclasses.field(default=f.default)) for f in train_fields.FIELDS],
    bases=(_TrainConfigMethods,), namespace={"__module__": __name__})
TrainConfig.__doc__ = """One training run's settings: the fields of core.train_fields.FIELDS (types, defaults, docs).

`TrainConfig(**fields)` or `TrainConfig.from_dict(d)` (which also validates). Fields left None
that a recipe gives are filled at construction (core.recipes.resolve), so `to_dict()` is the
complete, reproducible config."""

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


# ----------------------------------------------------------------------------- training

def train(config: TrainConfig | dict[str, Any], *, checkpoint_dir: str | os.PathLike | None = None,
          resume: bool = False, callbacks: TrainCallbacks | None = None,
          init_model: nn.Module | None = None) -> dict[str, Any]:
    """Train `config` and return a JSON-able summary.

    Summary keys: val_top1, val_top5, val_loss, train_loss, train_top1 (last epoch),
    best_val_top1, params_dense, params_factored, macs_dense, macs_factored (per image at the
    data's image size), epochs (completed), wall_time_s (training time summed over resumes),
    device, world_size, init_report (per-layer rows of `factorize_model`, None when dense),
    init_totals, resumed_from_epoch (None when started fresh), warnings (list of strings, e.g. accuracy
    at chance level), history (per-epoch metrics), config (resolved: the recipe's values filled in).
    Raises TrainingDiverged (core/guards.py) when the loss diverges, TrainingCancelled when stopped.
    With `resume=True` and `checkpoint_dir/last.pt` present, training continues from it (its
    config must match but for RESUME_MAY_DIFFER); without a checkpoint it starts fresh.
    `config.devices > 1` runs under torchrun with DDP (see core/distributed.py).

    init_model: start from this network (e.g. a compressed one: core.compress_run's fine-tuning)
    instead of building `config.model`; it is trained in place (moved to the device) with the same
    loop, recipe, guards and callbacks. The config describes it (model and small_input for the
    record, init 'dense': nothing is factorized on top); one process only.
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config)
    else:
        config.validate()
    callbacks = callbacks or TrainCallbacks()
    if init_model is not None:
        if config.factored:
            raise train_fields.FieldError("init", "init_model is trained as it is: leave rank and rank_ratio out "
                                                  "(init 'dense')")
        if config.devices > 1:
            raise train_fields.FieldError("devices", "init_model trains in one process: devices must be 1")
        return _Trainer(config, checkpoint_dir, resume, callbacks, ProcessGroup(), init_model).run()
    if config.devices > 1:
        if in_process_group():
            return _Trainer(config, checkpoint_dir, resume, callbacks, current()).run()
        from core.distributed import launch  # the torchrun launcher (imports no core.train)

        return launch(config, checkpoint_dir=checkpoint_dir, resume=resume, callbacks=callbacks)
    return _Trainer(config, checkpoint_dir, resume, callbacks, ProcessGroup()).run()


class _Trainer:
    def __init__(self, config: TrainConfig, checkpoint_dir: str | os.PathLike | None, resume: bool,
                 callbacks: TrainCallbacks, dist: ProcessGroup, init_model: nn.Module | None = None) -> None:
        self.config, self.callbacks, self.dist, self.init_model = config, callbacks, dist, init_model
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = resume
        self.device = resolve_device(config, dist.local_rank if dist.world > 1 else 0)

    # -- setup
    def _latency_policy(self, model: nn.Module, image_size: int, checkpoint: dict[str, Any] | None) -> Any:
        """latency_aware's policy: layers timed on the training device at latency_batch. The verdicts are
        measured once, by rank 0 of a fresh run; a resumed run reuses its checkpoint's, and under DDP the
        other ranks receive rank 0's (so every process builds the same structure)."""
        from core.latency import LatencyPolicy, decisions

        cfg, dist = self.config, self.dist
        decided = None
        if checkpoint is not None:
            decided = decisions((checkpoint.get("init_report") or {}).get("layers") or [])
        elif dist.world > 1 and not dist.main:
            decided = decisions(dist.gather(None)[0]["layers"])  # waits for rank 0's measurement
        return LatencyPolicy(image_size=image_size, batch=cfg.latency_batch, device=str(self.device),
                             channels_last=cfg.channels_last if self.device.type == "cuda" else False,
                             decided=decided)

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
        if self.init_model is not None:
            model = self.init_model
        else:
            model = build_model(cfg.model, num_classes=info.num_classes, small_input=cfg.small_input)
        image = (3, info.image_size, info.image_size)
        self.params_dense = count_params(model)
        self.macs_dense = count_macs(model, image)
        self.init_report = None
        if cfg.factored:
            # On resume (or on ranks > 0, which DDP overwrites with rank 0's weights) only the
            # structure is needed; the factors come from the checkpoint / the broadcast.
            compute = checkpoint is None and dist.main
            latency = self._latency_policy(model, info.image_size, checkpoint) if cfg.latency_aware else None
            report = factorize_model(model, rank=cfg.rank, rank_ratio=cfg.rank_ratio, method=cfg.init,
                                     include=cfg.include, exclude=cfg.exclude, seed=cfg.seed,
                                     compute_init=compute, latency=latency)
            if compute:
                self.init_report = report.to_dict()
            elif checkpoint is not None:
                self.init_report = checkpoint.get("init_report")
            if cfg.latency_aware and checkpoint is None and dist.world > 1 and dist.main:  # the others wait for it
                dist.gather(self.init_report if dist.main else None)
            if report.totals["layers_factored"] == 0 and report.totals["layers_kept_dense"]:
                raise train_fields.FieldError(
                    "latency_aware", f"latency_aware kept every layer of {cfg.model} dense: no factored form is faster "
                                     f"on {self.device} at batch {cfg.latency_batch} (see the init report); train "
                                     "init='dense', or try a lower rank or another latency_batch")
            if report.totals["layers_factored"] == 0:  # validation rules this out unless the class count was unknown
                field = "rank" if cfg.rank is not None else "rank_ratio"
                raise train_fields.FieldError(field, f"{field} {cfg.rank if cfg.rank is not None else cfg.rank_ratio} "
                                                     f"factorizes no layer of {cfg.model}: every layer keeps its full size")
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
        cap = None if cfg.max_val_batches is None else cfg.max_val_batches * cfg.batch_size * dist.world
        self.val_images = min(len(val_ds), cap or len(val_ds))  # evaluate() sets the exact count it saw
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
            "guard": self.guard.state(),
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
            self._guard(lambda: self.guard.step(batch_loss.item(), n, epoch=epoch + 1, step=self.step))
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

    def _guard(self, check: Any) -> None:
        """Run a divergence check on rank 0; every rank stops together when it fails (rank 0's flag is broadcast)."""
        error = None
        if self.dist.main:
            try:
                check()
            except TrainingDiverged as exc:
                error = exc
        if self.dist.any_true(error is not None, self.device):
            raise error or TrainingDiverged(f"diverged at step {self.step} (reported by rank 0)")

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
        self.val_images = int(n)
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
        cfg = self.config
        hint = f"lower lr (now {cfg.lr:g})" + (f" or warm up longer (warmup_epochs now {cfg.warmup_epochs:g})"
                                               if cfg.warmup_epochs < 1 else "")
        self.guard = DivergenceGuard(hint, self.info.num_classes,
                                     start=(ckpt.get("guard") or {}).get("start") if ckpt else None)
        if ckpt is not None:
            self._restore(ckpt)
            start_epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        else:
            seed_everything(derive_seed(self.config.seed, "train", self.dist.rank))
        self._last_pct = -1
        for epoch in range(start_epoch, self.config.epochs):
            t0 = time.perf_counter()
            metrics = self._train_epoch(epoch)
            if self.dist.main:
                self.callbacks.before_evaluate(self.raw_model)
            self._sync_buffers()
            metrics.update(self.evaluate())
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            metrics["epoch_time_s"] = time.perf_counter() - t0
            metrics["epoch"] = epoch + 1
            # NaN/inf or an exploded val loss is no result to store or resume from (core/guards.py)
            self._guard(lambda: self.guard.epoch_end(metrics["val_loss"], epoch=epoch + 1, steps=self.step))
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
            "latency_policy": self.init_report.get("latency") if self.init_report else None,
            "resumed_from_epoch": resumed_from,
            "warnings": [w for w in [chance_warning(last["val_top1"], self.info.num_classes, self.val_images)] if w],
            "history": self.history,
            "config": self.config.to_dict(),
        }
        if self.dist.world > 1:
            summary["rank_fingerprints"] = fingerprints
            summary["ranks_in_sync"] = len(set(fingerprints)) == 1
        json.dumps(summary)  # the contract: JSON-able
        return summary


__all__ = ["TrainConfig", "TrainCallbacks", "TrainingCancelled", "TrainingDiverged", "train", "resolve_device",
           "lr_factor", "weights_fingerprint"]
