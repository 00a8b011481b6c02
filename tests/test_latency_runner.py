"""The latency job's runner in this process (worker/runners.run_latency), with a JobContext of the test's own (the
Protocol's methods recorded): the metrics it stores and its check of the cancel flag between measurements.
The real stack (API, worker, supervisor) runs the same jobs in tests/service/test_latency_service.py; there a
cancel also reaches the job by the supervisor's signal, so the runner's own check is shown here."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.specs import parse_spec
from worker.runners import JobCancelled, run_latency

SPEC = {"kind": "latency", "model": "resnet18", "rank_ratio": 0.25, "image_size": 16, "batches": [1, 2],
        "repeats": 3, "threads": 1}


class Context:
    def __init__(self, tmp: Path, stop_after: int | None = None) -> None:
        self.job_id, self.artifact_dir = "test", tmp
        self.progress: list[float] = []
        self.rows: list[tuple[str, int, float]] = []
        self.stop_after = stop_after

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.progress) > self.stop_after

    def check_cancel(self) -> None:
        if self.should_stop():
            raise JobCancelled("cancel requested")

    def set_progress(self, frac: float) -> None:
        self.progress.append(frac)

    def add_metrics(self, rows: list[tuple[str, int, float]]) -> None:
        self.rows.extend(rows)

    def flush_metrics(self) -> None:
        pass

    def add_artifact(self, name: str, path: Path) -> None:
        raise AssertionError("a latency job has no artifact")


def test_run_latency_stores_the_numbers_and_stops_when_cancelled(tmp_path):
    ctx = Context(tmp_path)
    res = run_latency(parse_spec(SPEC), ctx)
    metrics = {name: v for name, _, v in ctx.rows}
    for key in ("speedup_b1", "speedup_b2", "latency_ms_b1", "dense_latency_ms_b2", "slower_layers_b1", "speedup"):
        assert metrics[key] == pytest.approx(res[key]), key
    assert ctx.progress[-1] == 1.0 and ctx.progress == sorted(ctx.progress) and len(ctx.progress) > 10

    ctx = Context(tmp_path, stop_after=2)  # the flag goes up after the second measurement
    with pytest.raises(JobCancelled, match="cancelled between latency measurements"):
        run_latency(parse_spec(SPEC), ctx)
    assert len(ctx.progress) == 3 and not ctx.rows
