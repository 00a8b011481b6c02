"""What a training run's trainer and its torchrun launcher share, so neither imports the other at module
level: how a run reports (`TrainCallbacks`), how it is stopped (`TrainingCancelled`), and this process's
place in a DistributedDataParallel group (`ProcessGroup`; `in_process_group`, `current`).

core/train.py (the trainer) and core/distributed.py (the torchrun launcher and the rank entry point)
both import this module; core.train re-exports TrainCallbacks and TrainingCancelled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


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
    before_evaluate(model): after each epoch's steps, before the epoch's evaluation (and before rank 0's
    buffers are broadcast under DDP); may update buffers, e.g. re-estimate BatchNorm statistics
    (core.compress_run's fine-tuning), never parameters. Its effect is saved in the checkpoint.
    """

    def on_metrics(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def on_progress(self, frac: float) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def before_evaluate(self, model: Any) -> None:
        pass


@dataclass
class ProcessGroup:
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


def in_process_group() -> bool:
    """True inside a process of an initialized torch.distributed group with more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current() -> ProcessGroup:
    """This process's place in the initialized torch.distributed group."""
    import torch.distributed as dist

    return ProcessGroup(rank=dist.get_rank(), world=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
