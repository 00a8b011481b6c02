"""worker.tasks' epoch hooks in this process: the after-write hook that a sweep's early stopping or a search's
pruner sets on a job's RunContext. On the real stack (tests/service/test_sweeps.py, test_search.py) a verdict also
marks the job cancel-requested in the store, which stops it a little later anyway; the hook's own immediate stop
is shown here."""
from __future__ import annotations

import threading
from types import SimpleNamespace

from worker import tasks
from worker.tasks import _attach_epoch_judge, attach_early_stopping, attach_search_pruning

ROWS = [("val_loss", 4, 0.5)]


def _ctx() -> SimpleNamespace:
    return SimpleNamespace(job_id="job-1", cancel=threading.Event(), metrics=SimpleNamespace(after_write=None))


def test_a_verdict_against_the_job_cancels_it_at_the_write(caplog):
    ctx, seen = _ctx(), []
    assert _attach_epoch_judge(ctx, lambda: True, lambda rows: seen.append(rows) or len(seen) == 2,
                               "rule", "stopped by the rule")
    ctx.metrics.after_write(ROWS)
    assert seen == [ROWS] and not ctx.cancel.is_set()  # no verdict yet: the job goes on
    with caplog.at_level("INFO", logger=tasks.log.name):
        ctx.metrics.after_write(ROWS)
    assert ctx.cancel.is_set() and "job job-1: stopped by the rule" in caplog.text


def test_no_hook_where_the_rule_does_not_apply_or_cannot_be_read(caplog):
    ctx = _ctx()
    assert not _attach_epoch_judge(ctx, lambda: False, lambda rows: True, "rule", "-")
    assert ctx.metrics.after_write is None

    def unreadable() -> bool:
        raise RuntimeError("database down")

    with caplog.at_level("WARNING", logger=tasks.log.name):
        assert not _attach_epoch_judge(ctx, unreadable, lambda rows: True, "sweep's early-stopping rule", "-")
    assert ctx.metrics.after_write is None and "job job-1: could not read its sweep's early-stopping rule" in caplog.text


def test_jobs_outside_a_sweep_get_neither_hook():
    ctx = _ctx()
    assert not attach_early_stopping(None, ctx) and not attach_search_pruning(None, ctx)
    assert ctx.metrics.after_write is None
