"""Job spec -> core/ call -> result summary. One function per job kind; no queue or HTTP here.

Each runner gets the parsed spec (jobs/specs.py) and a `JobContext` (worker/tasks.py) through
which it writes artifacts, metrics and progress and asks whether to stop. Runners raise on
failure (the task records the error text); they return the JSON-able `result` stored on the job.
torch and core/ are imported at module import: the Celery main process imports this module
before it forks its pool children, so a job does not pay the import.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

import torch

from core.approx import approximate, mc_function_error
from core.weights import gaussian_weights, load_weights, save_factors
from jobs.specs import (
    AnySpec,
    ApproxSpec,
    GaussianWeights,
    LearnSpec,
    ModelLayerWeights,
    TrainSpec,
    UploadWeights,
)

log = logging.getLogger(__name__)

FACTORS = "factors.safetensors"
# Fields of a train spec that describe the job, not the training (TrainConfig rejects them).
_JOB_ONLY_FIELDS = ("kind", "name", "tags", "priority")


class JobCancelled(Exception):
    """The job's cancel flag was seen between steps; the task records status `cancelled`."""


class JobContext(Protocol):
    """What a runner may do besides computing (implemented in worker/tasks.py)."""

    job_id: str
    artifact_dir: Path

    def should_stop(self) -> bool: ...
    def check_cancel(self) -> None: ...           # raises JobCancelled when should_stop()
    def set_progress(self, frac: float) -> None: ...
    def add_metrics(self, rows: list[tuple[str, int, float]]) -> None: ...   # batched by the context
    def flush_metrics(self) -> None: ...   # store every buffered row now (waits out a database outage)
    def add_artifact(self, name: str, path: Path) -> None: ...             # size + sha256 recorded


def run_spec(spec: AnySpec, ctx: JobContext) -> dict[str, Any]:
    """Dispatch on spec.kind; returns the result summary (JSON-able)."""
    if isinstance(spec, ApproxSpec):
        return run_approx(spec, ctx)
    if isinstance(spec, LearnSpec):
        return run_learn(spec, ctx)
    if isinstance(spec, TrainSpec):
        return run_train(spec, ctx)
    raise TypeError(f"no runner for spec kind {getattr(spec, 'kind', type(spec).__name__)!r}")


def compute_device() -> torch.device:
    """cuda:0 when this worker process was given a GPU (the launcher sets CUDA_VISIBLE_DEVICES), else cpu."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- weights sources


def resolve_weights(source: GaussianWeights | UploadWeights | ModelLayerWeights, seed: int) -> torch.Tensor:
    """The (m, d) float matrix a weights source names; ValueError (user-facing) when it cannot load."""
    if isinstance(source, GaussianWeights):
        return gaussian_weights(source.m, source.d, seed)
    if isinstance(source, UploadWeights):
        from jobs import store

        path = store.get_upload_path(str(source.upload_id))
        ref = f"{path}:{source.key}" if source.key else str(path)
        return load_weights(ref)
    if isinstance(source, ModelLayerWeights):
        from core.models import layer_weight_matrix

        return layer_weight_matrix(source.model, source.layer, seed=seed)
    raise TypeError(f"unknown weights source {source!r}")


def _save_factors(ctx: JobContext, U: torch.Tensor, V: torch.Tensor) -> None:
    ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.artifact_dir / FACTORS
    save_factors(path, U.detach().cpu().contiguous(), V.detach().cpu().contiguous())
    ctx.add_artifact(FACTORS, path)


def _finite(x: float) -> float | None:
    """JSON has no NaN/inf: store None instead (the table shows a dash)."""
    return float(x) if math.isfinite(float(x)) else None


# --------------------------------------------------------------------------- approx


def run_approx(spec: ApproxSpec, ctx: JobContext) -> dict[str, Any]:
    """Approximate the spec's matrix; result = {error, time_s, iterations, m, d, rank, method, ...}."""
    W = resolve_weights(spec.weights, spec.seed)
    m, d = W.shape
    if spec.rank > min(m, d):
        raise ValueError(f"rank must be <= min(m, d) = {min(m, d)} for this {m} x {d} matrix, got {spec.rank}")
    ctx.check_cancel()
    device = compute_device()
    ctx.set_progress(0.05)
    approx = approximate(W.to(device), spec.rank, spec.method, seed=spec.seed)
    result: dict[str, Any] = {
        "error": _finite(approx.error), "time_s": approx.time_s, "iterations": approx.iterations,
        "m": m, "d": d, "rank": approx.rank, "method": approx.method, "device": str(device),
        "info": approx.info,
    }
    if spec.mc_samples:
        ctx.check_cancel()
        ctx.set_progress(0.6)
        W_hat = approx.U @ approx.V
        mean, stderr = mc_function_error(W.to(device), W_hat, spec.mc_samples, seed=spec.seed)
        result["mc_error"], result["mc_stderr"], result["mc_samples"] = _finite(mean), _finite(stderr), spec.mc_samples
    _save_factors(ctx, approx.U, approx.V)
    ctx.set_progress(1.0)
    return result


# --------------------------------------------------------------------------- learn


def run_learn(spec: LearnSpec, ctx: JobContext) -> dict[str, Any]:
    """Learn a rank-r layer from teacher samples (x ~ N(0, I_d), y = relu(W x) [+ noise]).

    result = {error (normalized function error of the learned UV on the teacher's W), nkp_error
    (NKP's error on W, the promise's yardstick), samples, rule, estimator, time_s, m, d, rank,
    eps, delta, noise}; the factors are the artifact factors.safetensors.
    """
    from core.learn import Teacher, learn_low_rank

    W = resolve_weights(spec.teacher, spec.seed)
    m, d = W.shape
    if spec.rank > min(m, d):
        raise ValueError(f"rank must be <= min(m, d) = {min(m, d)} for this {m} x {d} teacher, got {spec.rank}")
    ctx.check_cancel()
    ctx.set_progress(0.05)
    # The teacher's sample stream and NKP are both seeded from the job seed.
    teacher = Teacher(W, noise=spec.noise or 0.0, seed=spec.seed)
    res = learn_low_rank(teacher, d, spec.rank, eps=spec.eps, delta=spec.delta, seed=spec.seed,
                         noise=spec.noise, device=compute_device())
    _save_factors(ctx, res.U, res.V)
    ctx.set_progress(1.0)
    return {
        "error": None if res.error is None else _finite(res.error),
        "nkp_error": None if res.nkp_error is None else _finite(res.nkp_error),
        "samples": int(res.samples), "rule": res.rule, "estimator": res.estimator, "time_s": float(res.time_s),
        "m": m, "d": d, "rank": spec.rank, "eps": spec.eps, "delta": spec.delta, "noise": spec.noise,
        "info": res.info,
    }


# --------------------------------------------------------------------------- train


def train_config_dict(spec: TrainSpec) -> dict[str, Any]:
    """The TrainSpec as core.train.TrainConfig keys (job-only fields dropped; init=dense -> no factoring)."""
    cfg = spec.model_dump(mode="json")
    for key in _JOB_ONLY_FIELDS:
        cfg.pop(key, None)
    if cfg.get("init") == "dense":
        cfg.pop("init")  # rank and rank_ratio are both None: the model stays dense
    if cfg.get("data_root") is None:
        cfg.pop("data_root", None)
    return cfg


class _TrainHooks:
    """core.train callbacks that stream metrics through the context and honour cancellation."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def on_metrics(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        rows = [(name, int(step), float(v)) for name, v in metrics.items()
                if isinstance(v, (int, float)) and math.isfinite(float(v))]
        rows.append(("epoch", int(step), float(epoch)))
        self.ctx.add_metrics(rows)
        if "val_loss" in metrics:
            # The epoch's end: core.train writes its checkpoint right after this returns, and a resume
            # starts after that epoch, so its rows (and all before) must be stored first - a worker
            # killed later would otherwise leave a gap no resumed run fills.
            self.ctx.flush_metrics()

    def on_progress(self, frac: float) -> None:
        self.ctx.set_progress(frac)

    def should_stop(self) -> bool:
        return self.ctx.should_stop()


def allow_child_processes() -> None:
    """Let this process start DataLoader worker processes.

    Celery's prefork pool runs tasks in daemonic processes, and `multiprocessing` refuses to start
    children of a daemon ("daemonic processes are not allowed to have children"), so a train job with
    num_workers > 0 failed in a worker. Clearing the flag is safe here: PyTorch's DataLoader workers
    watch their parent and exit when it dies (a hard time limit's SIGKILL, a killed worker), and the
    iterator shuts them down when training ends, fails or is cancelled."""
    import multiprocessing

    proc = multiprocessing.current_process()
    if proc._config.get("daemon"):  # noqa: SLF001 - the flag `Process.daemon` refuses to change once started
        proc._config["daemon"] = False  # noqa: SLF001


def run_train(spec: TrainSpec, ctx: JobContext) -> dict[str, Any]:
    """Train with checkpoints under <artifacts>/<job>/checkpoints, resuming one a previous attempt left.

    result = core.train.train's summary (val_top1, val_loss, params, MACs, wall_time_s, ...)
    without the per-layer init report, which is stored as the artifact init_report.json.
    """
    import json

    from core.train import TrainCallbacks, TrainConfig, TrainingCancelled, train

    config = TrainConfig.from_dict(train_config_dict(spec))
    if config.num_workers > 0:
        allow_child_processes()
    ckpt_dir = ctx.artifact_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume = (ckpt_dir / "last.pt").exists()  # a re-queued job continues where the dead worker stopped
    if resume:
        log.info("job %s: resuming from %s", ctx.job_id, ckpt_dir / "last.pt")
    ctx.check_cancel()

    hooks = _TrainHooks(ctx)
    callbacks = type("JobTrainCallbacks", (TrainCallbacks,), {
        "on_metrics": lambda self, step, epoch, metrics: hooks.on_metrics(step, epoch, metrics),
        "on_progress": lambda self, frac: hooks.on_progress(frac),
        "should_stop": lambda self: hooks.should_stop(),
    })()
    try:
        summary = train(config, checkpoint_dir=ckpt_dir, resume=resume, callbacks=callbacks)
    except TrainingCancelled as exc:
        raise JobCancelled(str(exc) or "cancelled between training steps") from exc
    finally:
        if (ckpt_dir / "last.pt").exists():
            ctx.add_artifact("checkpoints/last.pt", ckpt_dir / "last.pt")

    summary = dict(summary)
    report = summary.pop("init_report", None)
    if report is not None:
        path = ctx.artifact_dir / "init_report.json"
        path.write_text(json.dumps({"layers": report, "totals": summary.get("init_totals")}, indent=1, default=float))
        ctx.add_artifact("init_report.json", path)
        summary["init_report_artifact"] = "init_report.json"
    return summary
