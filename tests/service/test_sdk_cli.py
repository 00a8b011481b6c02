"""The Python SDK (lowrank.client.Client) and the `lowrank` client commands against the live service."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank.client import ApiError, Client, ConnectionFailed

REPO = Path(__file__).resolve().parents[2]


def lowrank_process(*argv: str, url: str, env: dict[str, str] | None = None,
                    timeout: float = 120) -> subprocess.CompletedProcess:
    """The real console command in a subprocess."""
    full_env = {**os.environ, "LOWRANK_URL": url, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lowrank", *argv], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def lowrank(capsys, monkeypatch):
    """`lowrank ARGV` run in this process through lowrank.cli.main (the same parser and handlers as the
    console script, without a Python start per call); returns (returncode, stdout, stderr)."""
    from lowrank.cli import main

    def run(*argv: str, url: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        monkeypatch.setenv("LOWRANK_URL", url)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, rc, out.out, out.err)
    return run


@pytest.mark.timeout(120)
def test_sdk_sweep_wait_with_progress_and_results(api_server, worker_process, unique_tag):
    base = {"kind": "approx", "weights": {"source": "gaussian", "m": 24, "d": 12}, "rank": 1, "tags": [unique_tag]}
    seen: list[float] = []
    with Client(api_server.url, token=None) as c:
        job = c.submit({**base, "rank": 3})
        assert c.wait(job["id"], timeout=60)["status"] == "succeeded"
        sweep = c.sweep(base, {"rank": [1, 3], "method": ["spectral", "nkp"]}, [0, 1], name="sdk")
        assert sweep["total"] == 8
        done = c.wait_sweep(sweep["id"], timeout=90, poll_s=0.3, progress=lambda s: seen.append(s["progress"]))
        assert done["counts"]["succeeded"] == 8
        assert seen[-1] == 1.0 and seen == sorted(seen)  # progress only goes up, ends at 1
        rows = c.results(sweep["id"])
        assert len(rows) == 4 and {"rank", "method", "mean", "std", "min", "max", "n", "job_ids"} <= set(rows[0])
        jobs = {j["id"]: j for j in c.iter_jobs(sweep=sweep["id"])}
        assert len(jobs) == 8
        for r in rows:
            errs = [jobs[i]["result"]["error"] for i in r["job_ids"]]
            assert r["n"] == 2 and r["mean"] == pytest.approx(sum(errs) / 2, rel=1e-12)
        df = c.results_frame(sweep["id"], group_by=["method"])
        assert list(df["method"]) == ["spectral", "nkp"] and list(df["n"]) == [4, 4]
        assert c.results_csv(sweep["id"]).splitlines()[0].startswith("method,rank,mean")

        with pytest.raises(ApiError) as err:
            c.sweep(base, {"rank": [1, 99]})
        assert err.value.status_code == 422 and "grid point #1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConnectionFailed, match="127.0.0.1:1"), Client("http://127.0.0.1:1") as dead:
        dead.jobs()


@pytest.mark.timeout(120)
def test_cli_commands_json_parses_and_errors_are_one_line(api_server, worker_process, idle_api_server, tmp_path,
                                                          unique_tag, lowrank):
    url = api_server.url
    r = lowrank_process("submit", "approx", "--m", "32", "--d", "16", "--rank", "4", "--method", "nkp", "--tag", unique_tag,
                "--wait", "--json", url=url)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded" and job["spec"]["rank"] == 4 and job["result"]["error"] > 0

    base = tmp_path / "spec.json"
    base.write_text(json.dumps({"kind": "approx", "weights": {"source": "gaussian", "m": 32, "d": 16}, "rank": 1,
                                "tags": [unique_tag]}))
    r = lowrank("sweep", "create", "--base", str(base), "--grid", "rank=1,2", "--grid", "method=spectral,nkp",
                "--seeds", "0,1", "--name", "cli", "--watch", "--interval", "0.3", "--timeout", "90", "--json", url=url)
    assert r.returncode == 0, r.stderr
    sweep = json.loads(r.stdout)
    assert sweep["counts"]["succeeded"] == 8 and sweep["grid"] == {"rank": [1, 2], "method": ["spectral", "nkp"]}
    sid = sweep["id"]

    watched = lowrank("sweep", "watch", sid, "--interval", "0.2", "--timeout", "30", url=url)  # the live table
    assert watched.returncode == 0, watched.stderr
    assert "spectral" in watched.stdout and "nkp" in watched.stdout and "8/8" in watched.stdout
    shown = json.loads(lowrank("sweep", "show", sid, "--json", url=url).stdout)
    assert shown["id"] == sid and shown["progress"] == 1.0
    listed = json.loads(lowrank("sweep", "list", "--json", url=url).stdout)
    assert sid in [s["id"] for s in listed["items"]]
    table = json.loads(lowrank("results", sid, "--json", url=url).stdout)
    assert table["metric"] == "error" and len(table["rows"]) == 4 and all(row["n"] == 2 for row in table["rows"])
    r = lowrank("results", sid, "--csv", "--group-by", "rank", url=url)
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["rank"] for row in rows] == ["1", "2"] and all(row["n"] == "4" for row in rows)
    r = lowrank("results", sid, url=url)  # the table form
    assert r.returncode == 0 and "spectral" in r.stdout and "mean" in r.stdout
    jobs = json.loads(lowrank("jobs", "--sweep", sid, "--json", url=url).stdout)
    assert len(jobs["items"]) == 8
    first = json.loads(lowrank("jobs", "--sweep", sid, "--limit", "5", "--json", url=url).stdout)
    rest = json.loads(lowrank("jobs", "--sweep", sid, "--limit", "5", "--cursor", first["next_cursor"], "--json",
                              url=url).stdout)
    assert len(first["items"]) == 5 and len(rest["items"]) == 3 and rest["next_cursor"] is None
    assert [j["id"] for j in first["items"] + rest["items"]] == [j["id"] for j in jobs["items"]]
    table = lowrank("jobs", "--sweep", sid, "--limit", "5", url=url)  # the table form names the next page
    assert table.returncode == 0 and f"--cursor {first['next_cursor']}" in table.stderr
    assert json.loads(lowrank("jobs", "--status", "succeeded", "--json", url=url).stdout)["items"]
    logs = json.loads(lowrank("logs", job["id"], "--json", url=url).stdout)
    assert logs["job"]["id"] == job["id"] and "series" in logs["metrics"]
    assert "succeeded" in lowrank("logs", job["id"], url=url).stdout

    # cancel / retry of single jobs, on the idle server (its jobs stay queued)
    idle = idle_api_server.url
    queued = json.loads(lowrank("submit", "approx", "--m", "8", "--d", "8", "--rank", "1", "--json", url=idle).stdout)
    assert json.loads(lowrank("cancel", queued["id"], "--json", url=idle).stdout)["status"] == "cancelled"
    assert json.loads(lowrank("retry", queued["id"], "--json", url=idle).stdout)["status"] == "queued"
    s2 = json.loads(lowrank("sweep", "create", "--base", str(base), "--grid", "rank=1,2,3", "--json", url=idle).stdout)
    c = json.loads(lowrank("sweep", "cancel", s2["id"], "--json", url=idle).stdout)
    assert c["counts"]["cancelled"] == 3
    c = json.loads(lowrank("sweep", "retry-failed", s2["id"], "--include-cancelled", "--json", url=idle).stdout)
    assert c["counts"]["queued"] == 3
    lowrank("sweep", "cancel", s2["id"], url=idle)
    lowrank("cancel", queued["id"], url=idle)

    # errors: exit 2 with one line on stderr
    for argv in (("submit", "approx", "--m", "32", "--d", "16", "--rank", "64"),
                 ("sweep", "create", "--base", str(base), "--grid", "rank=1,99"),
                 ("sweep", "create", "--base", str(tmp_path / "missing.json"), "--grid", "rank=1"),
                 ("sweep", "create", "--base", str(base), "--grid", "rank"),
                 ("results", sid, "--metric", "nope"),
                 ("sweep", "show", "00000000-0000-0000-0000-000000000000"),
                 ("cancel", "not-a-uuid"),
                 ("jobs", "--limit", "0"),
                 ("jobs", "--cursor", "forged")):
        r = lowrank(*argv, url=url)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error"), (argv, r.stderr)
    r = lowrank_process("jobs", "--json", url="http://127.0.0.1:1")
    assert r.returncode == 2 and "http://127.0.0.1:1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = lowrank("jobs", url=url, env={"LOWRANK_URL": "http://127.0.0.1:1"})  # --url default comes from the env
    assert r.returncode == 2 and "127.0.0.1:1" in r.stderr
