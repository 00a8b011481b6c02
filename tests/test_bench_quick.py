"""The benchmark runner end to end: `python -m bench --quick --out DIR service` writes its table, JSON,
plot and the summary with an environment header into DIR (not docs/results/); and the summary
reads every goal out of the committed full-run results. Needs Postgres and Redis (as tests/service)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"^\*Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+ \(\d+ cores\), device \S+; Python [\d.]+, "
                    r"torch .+\.\*$", re.M)


def test_quick_service_bench_writes_results_into_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "results"
    committed = REPO / "docs" / "results" / "service.json"
    before = committed.stat().st_mtime if committed.exists() else None
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "service"], cwd=REPO,
                          capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "service.md").read_text()
    assert HEADER.search(md), md[:500]
    assert "(quick run)" in md
    # Both ingestion variants and the ratio measured in the same run, plus the latency table.
    assert re.search(r"\| 1 row per call \| [\d,]+ \| 1\.0x \|", md)
    assert re.search(r"\| 200 rows per call .*\| [\d,]+ \| [\d.]+x \|", md)
    assert re.search(r"\| submit -> running .*\| [\d.]+ \| [\d.]+ \| [\d.]+ \|", md)
    data = json.loads((out / "service.json").read_text())
    assert data["mode"] == "quick" and data["name"] == "service"
    d = data["data"]
    assert d["ingest_bulk_points_per_s"] > d["ingest_single_points_per_s"] > 0
    assert d["ingest_bulk_ratio"] == d["ingest_bulk_points_per_s"] / d["ingest_single_points_per_s"]
    assert 0 < d["submit_to_running_p50_ms"] <= d["submit_to_running_p99_ms"] <= d["submit_to_running_max_ms"]
    assert d["submit_to_running_n"] == 10
    assert [t["section"][:2] for t in data["tables"]] == ["1.", "2.", "3."]
    png = (out / "service_latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = (out / "README.md").read_text()
    assert HEADER.search(summary)
    assert "[service.md](service.md) (quick," in summary
    assert re.search(r"\| 9 \| Time from submit to a job running on an idle worker \| p50 [\d.]+ ms, p99 [\d.]+ ms",
                     summary)
    assert "not measured" in summary  # approx, train, ... were not run into this directory
    assert "quick" in proc.stdout and str(out) in proc.stdout
    # Nothing written into the committed results.
    assert str(REPO / "docs" / "results") not in proc.stdout
    assert (committed.stat().st_mtime if committed.exists() else None) == before


def test_summary_reads_every_goal_of_the_committed_results(tmp_path: Path) -> None:
    from bench import summary

    rows = summary.goal_rows(REPO / "docs" / "results")
    assert not [r for r in rows if r[3] == "unreadable"], rows
    by_goal = {r[1]: r for r in rows}
    speed = next(r for g, r in by_goal.items() if g.startswith("NKP at most 3x"))
    assert re.match(r"[\d.]+x \(", speed[2]) and speed[3] in ("met", "**not met**")
    assert {r[0] for r in rows} >= {"2", "3"}


def test_quick_search_bench_writes_results_into_out_dir(tmp_path: Path) -> None:
    """`python -m bench --quick --out DIR search`: the grid and the searches run through the service,
    the hypervolume fractions are in (0, 1] (a search can not beat the grid on the grid's own space), the
    table, plot and summary row are written, and the budget is 30% of the grid."""
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "search"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads((out / "search.json").read_text())["data"]
    assert d["budget_trials"] == round(0.3 * d["grid_points"])
    for sampler in ("tpe", "random"):
        assert len(d[f"hv_fraction_{sampler}"]) == len(d["seeds"])
        assert all(0 < f <= 1 + 1e-12 for f in d[f"hv_fraction_{sampler}"])
    md = (out / "search.md").read_text()
    assert HEADER.search(md) and "## 1. Hypervolume with" in md and "Switching to the compress space" in md
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"\| 15 \| Search vs the full grid: .* \| TPE [\d.]+ \(", (out / "README.md").read_text())
