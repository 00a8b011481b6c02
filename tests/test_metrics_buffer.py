"""worker.tasks.MetricsBuffer: rows survive failed writes (a database outage) and are written once it
is back; only the first failure of a run logs a traceback. The writes are injected (a failing then
working store.record_metrics) because this tests the buffer's own logic; the real outage, with a
stopped Postgres and a real worker, is tests/faults/test_fault_postgres.py."""
from __future__ import annotations

import logging

import pytest

from worker import tasks


class FlakyStore:
    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.batches = failures, 0, []

    def __call__(self, job_id: str, rows: list) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("connection refused\nsecond line")
        self.batches.append(list(rows))


def test_rows_survive_failed_writes_and_one_traceback_per_outage(monkeypatch, caplog) -> None:
    store = FlakyStore(failures=3)
    monkeypatch.setattr(tasks.store, "record_metrics", store)
    buf = tasks.MetricsBuffer("job-1", max_rows=1000, max_age_s=3600)
    buf.add([("loss", 1, 0.5), ("lr", 1, 0.1)])
    caplog.set_level(logging.INFO, logger=tasks.log.name)
    for _ in range(3):  # three flushes during the outage: nothing lost, nothing written
        buf.flush(raise_errors=False)
    assert buf.rows == [("loss", 1, 0.5), ("lr", 1, 0.1)] and buf.written == 0 and buf.failures == 3
    buf.add([("loss", 2, 0.4)])
    buf.flush()
    assert store.batches == [[("loss", 1, 0.5), ("lr", 1, 0.1), ("loss", 2, 0.4)]]
    assert buf.rows == [] and buf.written == 3 and buf.failures == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and [bool(r.exc_info) for r in warnings] == [True, False, False]
    assert "3 in a row" in warnings[-1].getMessage() and "ConnectionError: connection refused" in warnings[-1].getMessage()
    assert any("written again after 3 failed attempts" in r.getMessage() for r in caplog.records)


def test_flush_raises_when_asked_and_keeps_the_rows(monkeypatch) -> None:
    monkeypatch.setattr(tasks.store, "record_metrics", FlakyStore(failures=1))
    buf = tasks.MetricsBuffer("job-2")
    buf.add([("loss", 1, 0.5)])
    with pytest.raises(ConnectionError):
        buf.flush(raise_errors=True)
    assert buf.rows == [("loss", 1, 0.5)]
    buf.flush()
    assert buf.rows == [] and buf.written == 1
