"""Job spec -> core/ call -> result summary. One function per job kind; no queue or HTTP here.

Each runner gets the parsed spec (jobs/specs.py) and a `JobContext` (worker/tasks.py) through
which it writes artifacts, metrics and progress and asks whether to stop. Runners raise on
failure (the task records the error text); they return the JSON-able `result` stored on the job.
torch and core/ are imported at module import: the worker's job-process server imports this module
once and forks each job's process from it (worker/supervisor.py), so a job does not pay the import.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from core.approx import approximate, mc_function_error
from core.compress import CompressCallbacks
from core.compress_run import CompressConfig, run_compress
from core.guards import TrainingDiverged
from core.weights import gaussian_weights, load_weights, save_factors
from jobs.compress_sources import COMPRESSED_ARTIFACT, SourceWeights, source_weights
from jobs.specs import (
    AnySpec,
    ApproxSpec,
    CompressSpec,
    GaussianWeights,
    LatencySpec,
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


class JobFailed(Exception):
    """A failure the user can act on (e.g. training diverged): its message is the job's whole error text."""


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
    if isinstance(spec, CompressSpec):
        return run_compress_job(spec, ctx)
    if isinstance(spec, LatencySpec):
        return run_latency(spec, ctx)
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
        from jobs import store, weightfiles
        from jobs.settings import get_settings

        upload = store.get_upload(str(source.upload_id))
        # Defence in depth: the file's headers against this worker's limits before anything is loaded.
        weightfiles.inspect_weights(upload.path, upload.format, weightfiles.Limits.from_settings(get_settings()),
                                    scan=False)
        ref = f"{upload.path}:{source.key}" if source.key else str(upload.path)
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
    """The (recipe-resolved) TrainSpec as core.train.TrainConfig keys: the same training fields
    (core.train_fields), job-only fields dropped; no data_root (non-imagefolder data) = core's default."""
    cfg = spec.model_dump(mode="json")
    for key in _JOB_ONLY_FIELDS:
        cfg.pop(key, None)
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


def run_train(spec: TrainSpec, ctx: JobContext) -> dict[str, Any]:
    """Train with checkpoints under <artifacts>/<job>/checkpoints, resuming one a previous attempt left.

    result = core.train.train's summary (val_top1, val_loss, params, MACs, wall_time_s, warnings, ...)
    without the per-layer init report, which is stored as the artifact init_report.json. A diverged
    run raises JobFailed with core's message (where, the loss, what to change).
    """
    import json

    from core.train import TrainCallbacks, TrainConfig, TrainingCancelled, TrainingDiverged, train

    config = TrainConfig.from_dict(train_config_dict(spec))
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
    except TrainingDiverged as exc:
        raise JobFailed(str(exc)) from None
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


# --------------------------------------------------------------------------- compress

COMPRESSED = COMPRESSED_ARTIFACT  # the compressed model: a later compress job's source
COMPRESS_REPORT = "compress_report.json"
# Spec fields that are not CompressConfig's: the job's own, and the source (a job or an upload, resolved here).
_COMPRESS_JOB_FIELDS = _JOB_ONLY_FIELDS + ("source",)
# Result keys copied from the report's totals (sweeps' results table and search objectives read them).
_TOTALS = ("params_dense", "params_compressed", "param_ratio", "macs_dense", "macs_compressed",
           "weights_compressible_dense", "weights_compressible_kept", "budget_requested", "budget_used",
           "layers_compressible", "layers_factored", "mean_block_error", "mean_linear_error", "mean_surrogate_error",
           "run_time_s")


def compress_config_dict(spec: CompressSpec, source: SourceWeights) -> dict[str, Any]:
    """The CompressConfig of a compress spec: its fields (core.compress_fields' table), the source's file and
    architecture hints, the source job's image size when the data set is the same and the spec gives none;
    no data_root (non-imagefolder data) = core's default."""
    cfg = spec.model_dump(mode="json")
    for key in _COMPRESS_JOB_FIELDS:
        cfg.pop(key, None)
    if cfg.get("data_root") is None:
        cfg.pop("data_root", None)
    cfg["finetune"] = cfg["finetune"] or {}  # the resolved training values (None: evaluate only)
    cfg["source"] = str(source.path)
    if source.model is not None:
        cfg["model"] = source.model
    if source.small_input is not None:
        cfg["small_input"] = source.small_input
    if cfg["image_size"] is None and source.image_size is not None and source.dataset == cfg["dataset"]:
        cfg["image_size"] = source.image_size  # the size the source job's model saw (digits' recipe: 8 px)
    return cfg


class _CompressHooks(CompressCallbacks):
    """core.compress callbacks: progress, top-1s and fine-tune epochs as metrics, cancellation."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.epoch_started = time.monotonic()

    def on_progress(self, frac: float) -> None:
        self.ctx.set_progress(frac)

    def on_metrics(self, metrics: dict[str, float]) -> None:  # top1_dense, top1_compressed...: step 0
        self.ctx.add_metrics([(k, 0, float(v)) for k, v in metrics.items()
                              if isinstance(v, (int, float)) and math.isfinite(float(v))])
        self.epoch_started = time.monotonic()

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """A fine-tune epoch ended: its metrics at step `epoch`, with the `epoch` and `epoch_time_s` rows a
        train job writes at an epoch's end (sweeps' early stopping reads them), stored now."""
        rows = [(k, int(epoch), float(v)) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        names = {name for name, _, _ in rows}
        rows.append(("epoch", int(epoch), float(epoch)))
        if "epoch_time_s" not in names:
            rows.append(("epoch_time_s", int(epoch), time.monotonic() - self.epoch_started))
        self.epoch_started = time.monotonic()
        self.ctx.add_metrics(rows)
        self.ctx.flush_metrics()

    def should_stop(self) -> bool:
        return self.ctx.should_stop()


def _compress_result(report: dict[str, Any], source: SourceWeights) -> dict[str, Any]:
    """The job's result: top-1 at each step, sizes, totals and the per-layer table (the whole report is
    the artifact compress_report.json)."""
    top1, totals, src, opts = report["top1"], report["totals"], report["source"], report["options"]
    finetuned = [float(x) for x in top1.get("finetuned") or []]
    layers = []
    for row in report["layers"]:
        errors = row.get("errors") or {}
        layers.append({"layer": row["layer"], "kind": row["kind"], "shape": row["shape"], "status": row["status"],
                       "reason": row.get("reason"), "rank": row["rank"], "params_dense": row["params_dense"],
                       "params_compressed": row["params_compressed"], "activation": row.get("activation"),
                       "block_error": _finite_or_none(errors.get("block")),
                       "linear_error": _finite_or_none(errors.get("linear")),
                       "surrogate_error": _finite_or_none(errors.get("surrogate"))})
    result: dict[str, Any] = {
        "val_top1": finetuned[-1] if finetuned else top1["compressed"],
        "top1_dense": top1["dense"], "top1_compressed_before_bn": top1["compressed_before_bn"],
        "top1_compressed": top1["compressed"], "top1_finetuned": finetuned,
        **{k: totals[k] for k in _TOTALS if k in totals},
        "model": src["model"], "num_classes": src["num_classes"], "small_input": src["small_input"],
        "source": {"from": source.description, "kind": src["kind"], "notes": src.get("notes") or []},
        "method": opts["method"], "allocation": opts["allocation"], "budget": opts["budget"], "rank": opts["rank"],
        "rank_ratio": opts["rank_ratio"], "refine": opts["refine"],
        "data": report["data"], "calibration": report["calibration"], "device": report["device"],
        "finetune": report.get("finetune"), "layers": layers,
        "artifact": COMPRESSED, "report_artifact": COMPRESS_REPORT,
    }
    return result


def _finite_or_none(x: Any) -> float | None:
    return None if x is None else _finite(x)


def run_compress_job(spec: CompressSpec, ctx: JobContext) -> dict[str, Any]:
    """Compress the spec's source with core.compress_run.run_compress (what `lowrank compress` runs), fine-tune
    it when asked; the compressed model is the artifact compressed.safetensors (a later compress job's
    source), the whole report compress_report.json. A re-queued job starts again (nothing to resume)."""
    import json

    from core.calibration import CalibrationCancelled
    from core.train import TrainingCancelled

    source = source_weights(spec.source)
    # Defence in depth for an upload: its headers against this worker's limits before torch reads it.
    if source.model is not None:
        from jobs import store, weightfiles
        from jobs.settings import get_settings

        upload = store.get_upload(str(spec.source.upload))
        weightfiles.inspect_weights(upload.path, upload.format, weightfiles.Limits.from_settings(get_settings()),
                                    scan=False)
    config = CompressConfig.from_dict(compress_config_dict(spec, source))
    ctx.check_cancel()
    ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
    model_path = ctx.artifact_dir / COMPRESSED
    try:
        out = run_compress(config, callbacks=_CompressHooks(ctx), save_path=str(model_path))
    except (CalibrationCancelled, TrainingCancelled) as exc:
        raise JobCancelled(str(exc) or "cancelled") from exc
    except TrainingDiverged as exc:
        raise JobFailed(str(exc)) from None
    ctx.add_artifact(COMPRESSED, model_path)
    report_path = ctx.artifact_dir / COMPRESS_REPORT
    report_path.write_text(json.dumps(out.report, indent=1, default=float))
    ctx.add_artifact(COMPRESS_REPORT, report_path)
    ctx.set_progress(1.0)
    return _compress_result(out.report, source)


# --------------------------------------------------------------------------- latency


def _latency_hooks(ctx: JobContext) -> Any:
    """core.latency callbacks: progress after each measurement, the cancel flag before each."""
    from core.latency import LatencyCallbacks

    class Hooks(LatencyCallbacks):
        def on_progress(self, frac: float) -> None:
            ctx.set_progress(frac)

        def should_stop(self) -> bool:
            return ctx.should_stop()

    return Hooks()


def latency_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers a results table, a sweep or a search reads, from core.latency.compare_latency's dict: per batch
    size N the p50 ms of the factored and the dense network (latency_ms_bN, dense_latency_ms_bN), the speed-up
    dense / factored (speedup_bN), the latency-aware network's (latency_aware_ms_bN, latency_aware_speedup_bN)
    and how many factored layers are slower than their dense original (slower_layers_bN); the same without
    the suffix at the first batch size."""
    lat = result["latency"]
    out: dict[str, float] = {}
    for e in lat["end_to_end"]:
        b, t = e["batch"], e["timing"]["p50_ms"]
        if e["variant"] == "dense":
            out[f"dense_latency_ms_b{b}"] = t
        elif e["variant"] == "factored":
            out[f"latency_ms_b{b}"], out[f"speedup_b{b}"] = t, e["speedup"]
        else:
            out[f"latency_aware_ms_b{b}"], out[f"latency_aware_speedup_b{b}"] = t, e["speedup"]
    for b, rows in lat["layers"].items():
        out[f"slower_layers_b{b}"] = sum(1 for r in rows if r["slower"])
    first = lat["batches"][0]
    for key in ("latency_ms", "dense_latency_ms", "speedup", "slower_layers", "latency_aware_speedup"):
        if f"{key}_b{first}" in out:
            out[key] = out[f"{key}_b{first}"]
    return out


def run_latency(spec: LatencySpec, ctx: JobContext) -> dict[str, Any]:
    """Measure the spec's model dense against factored with core.latency.compare_latency (what `lowrank latency`
    runs): at its rank or rank ratio, or at its source compress job's per-layer ranks. result = compare_latency's
    dict (settings, parameter counts, `latency`: end_to_end and per-batch `layers` rows, kept_dense) with
    latency_metrics' numbers at the top level (also stored as metrics at step 0), params_dense and
    params_factored, and the source's id."""
    from core.factorize import FactorizeError
    from core.latency import LatencyCancelled, compare_latency
    from jobs.latency_sources import source_ranks

    ranks = None
    if spec.source is not None:
        from jobs import store

        ranks = source_ranks(store.get_job(str(spec.source)).result)
        if not ranks:
            raise JobFailed(f"source: compress job {spec.source} factored no layer; nothing to measure")
    if spec.device == "cuda":
        device = compute_device()
        if device.type != "cuda":
            raise JobFailed("device cuda: this worker has no CUDA device (a GPU worker takes device=cuda jobs)")
    else:
        device = torch.device("cpu")
    ctx.check_cancel()
    ctx.set_progress(0.0)
    try:
        result = compare_latency(spec.model, rank=spec.rank, rank_ratio=spec.rank_ratio, ranks=ranks,
                                 image_size=spec.image_size, batches=list(spec.batches), device=str(device),
                                 threads=spec.threads, channels_last=spec.channels_last, repeats=spec.repeats,
                                 per_layer=spec.per_layer, latency_aware=spec.latency_aware,
                                 latency_batch=spec.latency_batch, num_classes=spec.num_classes,
                                 small_input=spec.small_input, seed=spec.seed, callbacks=_latency_hooks(ctx))
    except LatencyCancelled as exc:
        raise JobCancelled(str(exc)) from exc
    except (FactorizeError, ValueError) as exc:
        raise JobFailed(str(exc)) from None
    except RuntimeError as exc:  # e.g. an image too small for the model's downsampling
        if "size" not in str(exc).lower():
            raise
        raise JobFailed(f"image_size {spec.image_size} is too small for {spec.model}: "
                        f"{str(exc).splitlines()[0]}") from None
    metrics = latency_metrics(result)
    ctx.add_metrics([(name, 0, float(v)) for name, v in metrics.items() if math.isfinite(float(v))])
    fact = result["factorize"]["factored"]
    result = {**metrics, "params_dense": fact["params_dense"], "params_factored": fact["params_factored"],
              "layers_factored": fact["layers_factored"], "device": result["latency"]["device"],
              "source": None if spec.source is None else {"job": str(spec.source)}, **result}
    ctx.set_progress(1.0)
    return result
