"""The `lowrank` client commands and the SDK on what a first-time user trips over: results against a
baseline (table, --json, --csv), short ids everywhere an id is taken, a --url with /api/v1, Ctrl-C in
`sweep watch`, defaults in --help, result warnings. Against the live service (the idle API: its jobs
stay queued until the test writes their results through the store, as a worker would)."""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_sdk_cli import REPO, lowrank, lowrank_process  # noqa: F401 - `lowrank` is a fixture
from test_sweep_compare import controlled_sweep

from lowrank.client import AmbiguousId, Client, ClientError, UnknownId

APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 32, "d": 16}, "rank": 2}
CHANCE = "val_top1 0.102 is at chance level (0.100 for 10 classes): the model learned nothing; check lr"


def test_results_against_a_baseline_table_json_csv_and_sdk(idle_api_server, finish_job, lowrank, unique_tag):
    url = idle_api_server.url
    with httpx.Client(base_url=url, timeout=30) as http:
        sid, _ = controlled_sweep(http, unique_tag, finish_job)
        api_doc = http.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method:spectral"}).json()
        api_csv = http.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method:spectral", "format": "csv"}).text
    short = sid[:8]
    r = lowrank("results", short, "--baseline", "method=spectral", "--json", url=url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == api_doc
    r = lowrank("results", short, "--baseline", "method=spectral", "--csv", url=url)
    assert r.returncode == 0 and r.stdout == api_csv
    r = lowrank("results", short, "--baseline", "method=spectral", url=url)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert f"sweep {short}: error versus method=spectral" in out and "ratio" in out and "95% CI" in out
    nkp2 = next(row for row in api_doc["rows"] if row["point"] == {"method": "nkp", "rank": 2})
    assert f"[{nkp2['ratio_ci_low']:.4g}, {nkp2['ratio_ci_high']:.4g}] *" in out  # * = significant
    assert "normalized function error L(W')/L(0)" in out and "paired by seed" in out
    plain = lowrank("results", short, url=url)
    assert "error: normalized function error L(W')/L(0)" in " ".join(plain.stdout.split())
    # Mistakes: one line, exit 2, the key named first.
    r = lowrank("results", short, "--baseline", "methd=spectral", url=url)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "baseline key 'methd' is not a grid key of this sweep; did you mean 'method'?" in r.stderr
    r = lowrank("results", short, "--comparison", "ratio", url=url)
    assert r.returncode == 2 and "give --baseline" in r.stderr
    # The SDK: flat rows and a DataFrame, with the prefix too.
    with Client(url) as c:
        rows = c.results(short, baseline="method=spectral")
        assert [(row["method"], row["rank"], row["n"]) for row in rows] == [("nkp", 2, 3), ("nkp", 4, 4)]
        assert rows[0]["comparison"] == "ratio" and rows[0]["ratio"] == nkp2["ratio"]
        df = c.results_frame(sid, baseline="rank:2")
        assert list(df["rank"]) == [4, 4] and list(df["method"]) == ["spectral", "nkp"]


def test_short_ids_everywhere_an_id_is_taken(idle_api_server, insert_job, finish_job, lowrank, unique_tag):
    import secrets

    url = idle_api_server.url
    with httpx.Client(base_url=url, timeout=30) as http:
        sid, jobs = controlled_sweep(http, unique_tag, finish_job)
        queued = http.post("/api/v1/jobs", json={**APPROX, "tags": [unique_tag]}).json()
    job_id = next(iter(jobs))
    r = lowrank("job", job_id[:8], url=url)
    assert r.returncode == 0 and f"job {job_id}" in r.stdout, r.stderr
    assert json.loads(lowrank("logs", job_id[:8], "--json", url=url).stdout)["job"]["id"] == job_id
    assert json.loads(lowrank("sweep", "show", sid[:8], "--json", url=url).stdout)["id"] == sid
    listed = json.loads(lowrank("jobs", "--sweep", sid[:6], "--json", url=url).stdout)["items"]
    assert sorted(j["id"] for j in listed) == sorted(jobs)
    assert json.loads(lowrank("cancel", queued["id"][:8], "--json", url=url).stdout)["status"] == "cancelled"
    assert json.loads(lowrank("retry", queued["id"][:8], "--json", url=url).stdout)["status"] == "queued"
    lowrank("cancel", queued["id"], url=url)
    # Unknown, ambiguous, malformed: exit 2, one line saying which.
    shared = secrets.token_hex(4)
    twins = [insert_job({**APPROX, "tags": [unique_tag]}, f"{shared}-0000-4000-8000-{secrets.token_hex(6)}")
             for _ in range(2)]
    for twin in twins:
        finish_job(twin, {"error": 0.5})
    for ref, says in ((shared, f"job id {shared!r} is ambiguous: it starts "), ("ffff0000ffff", "no job id starts with"),
                      ("zz12", "id_prefix must be 4 to 32 hex digits")):
        r = lowrank("job", ref, url=url)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, (ref, r.stderr)
    assert all(t in lowrank("job", shared, url=url).stderr for t in twins)
    with Client(url) as c:
        with pytest.raises(AmbiguousId):
            c.job(shared)
        with pytest.raises(UnknownId):
            c.get_sweep("ffff0000ffff")
        assert c.job(twins[1][:30])["id"] == twins[1]


def test_a_url_with_the_api_path_says_what_to_use(api_server, lowrank):
    url = api_server.url
    r = lowrank("jobs", "--url", f"{url}/api/v1", url=url)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{url}/api/v1 is the API's path, not the server's base URL: use {url}" in r.stderr
    r = lowrank("jobs", "--url", f"{url}/lab", url=url)  # a path the server does not have
    assert r.returncode == 2 and "HTTP 404" in r.stderr
    assert f"{url}/lab/api/v1/jobs is no route of a lowrank-lab API; is {url}/lab the server's base URL" in r.stderr
    with pytest.raises(ClientError, match="use http://"):
        Client(f"{url}/api/v1/")


@pytest.mark.timeout(120)
def test_ctrl_c_in_sweep_watch_leaves_the_sweep_running(idle_api_server, unique_tag):
    """SIGINT while watching: exit 130, a line saying the sweep goes on and how to watch it again; the
    sweep's jobs are untouched (still queued: no worker takes the idle API's jobs)."""
    url = idle_api_server.url
    with httpx.Client(base_url=url, timeout=30) as http:
        sweep = http.post("/api/v1/sweeps", json={"base": {**APPROX, "tags": [unique_tag]}, "grid": {"rank": [1, 2]}}).json()
        proc = subprocess.Popen([sys.executable, "-m", "lowrank", "sweep", "watch", sweep["id"][:8], "--url", url,
                                 "--interval", "0.2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            first = proc.stderr.readline()  # printed once the sweep is found, before the live table
            assert first.startswith(f"watching sweep {sweep['id']}"), first
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, err
        assert f"sweep {sweep['id']} goes on on the server" in err
        assert f"Watch it again: lowrank sweep watch {sweep['id'][:8]} --url {url}" in err
        assert http.get(f"/api/v1/sweeps/{sweep['id']}").json()["counts"]["queued"] == 2
        http.post(f"/api/v1/sweeps/{sweep['id']}/cancel")


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subparsers(sub)


def test_help_shows_every_default_and_never_the_token(monkeypatch, capsys):
    """Every option with a default (other than flags and None) shows it in --help, for every verb;
    a token from the environment is never printed."""
    monkeypatch.setenv("LOWRANK_TOKEN", "lrk_s3cret_token")
    from lowrank.cli import build_parser

    checked = 0
    for name, sub in _subparsers(build_parser()):
        text = " ".join(sub.format_help().split())
        assert "lrk_s3cret_token" not in text, name
        for action in sub._actions:
            if (not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS)
                    or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))):
                continue
            default = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert f"(default: {default})" in text or "default" in (action.help or ""), (name, action.dest)
            checked += 1
    assert checked > 20
    from lowrank.cli import main

    with pytest.raises(SystemExit) as done:
        main(["sweep", "watch", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "--interval INTERVAL seconds between polls (default: 2.0)" in out


@pytest.mark.timeout(120)
def test_result_warnings_are_printed(idle_api_server, finish_job, lowrank, unique_tag):
    """result.warnings reach the user: `lowrank job`, `lowrank logs` and `submit --wait` print each on
    stderr (so --json output stays parseable and the warning is still seen)."""
    url = idle_api_server.url
    with httpx.Client(base_url=url, timeout=30) as http:
        job = http.post("/api/v1/jobs", json={**APPROX, "tags": [unique_tag]}).json()
        finish_job(job["id"], {"error": 0.5, "warnings": [CHANCE]})
        for argv in (("job", job["id"][:8]), ("logs", job["id"]), ("job", job["id"], "--json")):
            r = lowrank(*argv, url=url)
            assert r.returncode == 0 and f"warning: job {job['id'][:8]}: {CHANCE}" in r.stderr, (argv, r.stderr)
        tag = f"{unique_tag}-wait"
        proc = subprocess.Popen([sys.executable, "-m", "lowrank", "submit", "approx", "--m", "32", "--d", "16", "--rank",
                                 "2", "--tag", tag, "--wait", "--url", url], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not (items := http.get("/api/v1/jobs", params={"tag": tag}).json()["items"]):
                assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            finish_job(items[0]["id"], {"error": 0.25, "warnings": [CHANCE]})
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert out.startswith(f"{items[0]['id']} succeeded") and "error=0.25" in out
    assert f"warning: job {items[0]['id'][:8]}: {CHANCE}" in err


def test_readme_train_sweep_example_is_accepted(idle_api_server, tmp_path, lowrank):
    """The README's train spec file and its `sweep create` line (without --watch: no worker takes the
    idle API's jobs) make a valid sweep: 2 inits x 3 ratios x 3 seeds."""
    import re

    text = (REPO / "README.md").read_text()
    spec = re.search(r"cat > train\.json <<'JSON'\n(.*?)\nJSON", text, re.S).group(1)
    line = next(ln for ln in text.splitlines() if ln.startswith("lowrank sweep create --base train.json"))
    (tmp_path / "train.json").write_text(spec)
    argv = [a if a != "train.json" else str(tmp_path / "train.json") for a in line.split()[1:] if a != "--watch"]
    r = lowrank(*argv, "--json", url=idle_api_server.url)
    assert r.returncode == 0, r.stderr
    sweep = json.loads(r.stdout)
    assert sweep["kind"] == "train" and sweep["total"] == 18 and sweep["base"]["dataset"] == "digits"
    assert lowrank("sweep", "cancel", sweep["id"][:8], url=idle_api_server.url).returncode == 0
