"""Sweeps: a base job spec x a grid of dotted spec paths x seeds, created in one transaction.

    create_sweep(SweepCreate(name="ranks", base={...approx spec...},
                             grid={"rank": [1, 2, 4], "method": ["spectral", "nkp"]}, seeds=[0, 1, 2]))

One module per concern:

    request.py         SweepCreate / EarlyStopping (the API's body), grid points, each validated as a job spec
    create.py          create_sweep: the sweep and its jobs in one transaction, idempotent per owner
    lifecycle.py       SweepRecord, get / list, cancel, retry the failed jobs
    results_table.py   results over seeds per grid point (SQL on Postgres, Python on SQLite), JSON and CSV
    compare.py         each grid point against a baseline point, paired by seed (jobs/paired.py)
    early_stopping.py  successive halving of train sweeps at milestone epochs (the worker's hooks)

Search sweeps (strategy "search": a sampler asks the points) are jobs/search.py. Everything public is
re-exported here: `from jobs import sweeps; sweeps.create_sweep(...)`.
"""
from __future__ import annotations

from jobs.sweeps.compare import ComparisonTable, compare_results, comparison_csv, comparison_document, parse_baseline
from jobs.sweeps.create import create_sweep, point_jobs
from jobs.sweeps.early_stopping import (
    EPOCH_END_MARKER,
    apply_early_stopping,
    decide_rung,
    has_early_stopping,
    on_epoch_metrics,
    on_job_finished,
)
from jobs.sweeps.lifecycle import SweepPage, SweepRecord, cancel_sweep, get_sweep, list_sweeps, retry_failed
from jobs.sweeps.request import (
    DEFAULT_METRIC,
    METRIC_PATTERN,
    EarlyStopping,
    SweepCreate,
    check_grid_keys,
    expand,
    grid_points,
)
from jobs.sweeps.results_table import ResultsTable, dumps, results, results_csv, results_document

__all__ = [
    "DEFAULT_METRIC", "EPOCH_END_MARKER", "METRIC_PATTERN", "ComparisonTable", "EarlyStopping", "ResultsTable",
    "SweepCreate", "SweepPage", "SweepRecord", "apply_early_stopping", "cancel_sweep", "check_grid_keys",
    "compare_results", "comparison_csv", "comparison_document", "create_sweep", "decide_rung", "dumps", "expand",
    "get_sweep", "grid_points", "has_early_stopping", "list_sweeps", "on_epoch_metrics", "on_job_finished",
    "parse_baseline", "point_jobs", "results", "results_csv", "results_document", "retry_failed",
]
