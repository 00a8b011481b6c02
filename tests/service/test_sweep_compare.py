"""Paired comparisons (GET /api/v1/sweeps/{id}/results?baseline=KEY:VALUE) on the real service, with the
numbers worked out by hand in the test from the individual jobs' results (statistics.fmean/stdev and a
table value of Student's t, never jobs/paired.py), on Postgres and on the embedded default's SQLite;
and the results table's fixes: params filled for approx sweeps and never averaged over sizes, no std
for n = 1, an unknown grid key named first with a "did you mean", short ids resolved by id_prefix."""
from __future__ import annotations

import csv
import io
import math
import statistics
import time

import httpx
import pytest

# Student's t quantiles t_{0.975, dof} from a published table (dof = pairs - 1).
T975 = {1: 12.706204736174698, 2: 4.302652729749464, 3: 3.182446305284263}

M, D = 32, 16
GRID = {"method": ["spectral", "nkp"], "rank": [2, 4]}
SEEDS = [0, 1, 2, 3]
# The error each job reports, by (method, rank, seed); None: that job fails (its seed is then unpaired).
ERRORS = {
    ("spectral", 2, 0): 0.52, ("spectral", 2, 1): 0.47, ("spectral", 2, 2): 0.55, ("spectral", 2, 3): 0.50,
    ("nkp", 2, 0): 0.41, ("nkp", 2, 1): None, ("nkp", 2, 2): 0.47, ("nkp", 2, 3): 0.44,
    ("spectral", 4, 0): 0.30, ("spectral", 4, 1): 0.28, ("spectral", 4, 2): 0.33, ("spectral", 4, 3): 0.31,
    ("nkp", 4, 0): 0.22, ("nkp", 4, 1): 0.25, ("nkp", 4, 2): 0.21, ("nkp", 4, 3): 0.26,
}


def _base(tag: str) -> dict:
    return {"kind": "approx", "weights": {"source": "gaussian", "m": M, "d": D}, "rank": 1, "tags": [tag]}


def _jobs(client: httpx.Client, sweep_id: str) -> list[dict]:
    r = client.get("/api/v1/jobs", params={"sweep": sweep_id, "limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _write_results(client: httpx.Client, sweep_id: str, finish_job) -> None:
    """Run the sweep's jobs as a worker would, through the store: claim, then finish with the result
    an approx job reports (ERRORS; time_s = 0.1 + error / 10 so a second metric is known too)."""
    for job in _jobs(client, sweep_id):
        p = job["sweep_point"]
        err = ERRORS[(p["method"], p["rank"], job["seed"])]
        if err is None:
            finish_job(job["id"], error="RuntimeError: made to fail")
        else:
            finish_job(job["id"], {"error": err, "time_s": 0.1 + err / 10, "iterations": 1, "m": M, "d": D,
                                   "rank": p["rank"], "method": p["method"], "device": "cpu"})


def _by_hand(jobs: list[dict], metric: str, key: str, base_value, ratio: bool) -> dict[tuple, dict]:
    """For every point other than the baseline's: the pairs by seed, the per-pair statistic
    (difference, or ln ratio), its mean, sample std, n, the t interval, from the jobs' own results."""
    value = {(tuple(sorted(j["sweep_point"].items())), j["seed"]): j["result"][metric]
             for j in jobs if j["status"] == "succeeded"}
    out = {}
    for point in {tuple(sorted(j["sweep_point"].items())) for j in jobs}:
        p = dict(point)
        if p[key] == base_value:
            continue
        partner = tuple(sorted({**p, key: base_value}.items()))
        mine = {s for (pt, s) in value if pt == point}
        theirs = {s for (pt, s) in value if pt == partner}
        seeds = sorted(mine & theirs)
        d = [math.log(value[(point, s)] / value[(partner, s)]) if ratio else value[(point, s)] - value[(partner, s)]
             for s in seeds]
        n = len(d)
        mean = statistics.fmean(d)
        std = statistics.stdev(d) if n > 1 else None
        half = T975[n - 1] * std / math.sqrt(n) if n > 1 else None
        out[tuple(sorted(p.items()))] = {"n": n, "seeds": seeds, "unpaired": len(mine ^ theirs), "mean": mean,
                                         "std": std, "lo": mean - half if half else None,
                                         "hi": mean + half if half else None}
    return out


def _check_against_hand(doc: dict, hand: dict, ratio: bool) -> None:
    assert len(doc["rows"]) == len(hand) == 2
    for row in doc["rows"]:
        want = hand[tuple(sorted(row["point"].items()))]
        assert row["n"] == want["n"] and row["seeds"] == want["seeds"] and row["n_unpaired"] == want["unpaired"]
        assert row["mean"] == pytest.approx(want["mean"], rel=1e-12)
        assert row["std"] == pytest.approx(want["std"], rel=1e-12)
        assert row["ci_low"] == pytest.approx(want["lo"], rel=1e-12)
        assert row["ci_high"] == pytest.approx(want["hi"], rel=1e-12)
        assert row["significant"] == (want["hi"] < 0 or want["lo"] > 0)
        if ratio:
            assert row["ratio"] == pytest.approx(math.exp(want["mean"]), rel=1e-12)
            assert row["ratio_ci_low"] == pytest.approx(math.exp(want["lo"]), rel=1e-12)
            assert row["ratio_ci_high"] == pytest.approx(math.exp(want["hi"]), rel=1e-12)
        else:
            assert row["ratio"] is None


def controlled_sweep(client: httpx.Client, tag: str, finish_job) -> tuple[str, dict]:
    """The sweep GRID x SEEDS with the results ERRORS (jobs written through the store); (id, jobs by id)."""
    r = client.post("/api/v1/sweeps", json={"name": "paired", "base": _base(tag), "grid": GRID, "seeds": SEEDS})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    _write_results(client, sid, finish_job)
    return sid, {j["id"]: j for j in _jobs(client, sid)}


def _comparison_checks(client: httpx.Client, sid: str, jobs: dict) -> dict:
    """The numbers, the unpaired seed, the CSV, the difference comparison; returns the ratio document."""
    r = client.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method:spectral"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["comparison"] == "ratio" and doc["statistic"] == "log_ratio" and doc["confidence"] == 0.95
    assert doc["baseline"] == {"key": "method", "value": "spectral"} and doc["metric"] == "error"
    hand = _by_hand(list(jobs.values()), "error", "method", "spectral", ratio=True)
    _check_against_hand(doc, hand, ratio=True)
    rank2 = next(row for row in doc["rows"] if row["point"] == {"method": "nkp", "rank": 2})
    # nkp r=2 seed 1 failed: 3 pairs (seeds 0, 2, 3), t_{0.975,2} = 4.303; the row names its jobs in seed order.
    assert rank2["n"] == 3 and rank2["n_unpaired"] == 1 and rank2["baseline_point"] == {"method": "spectral", "rank": 2}
    assert [jobs[i]["seed"] for i in rank2["job_ids"]] == [0, 2, 3] == rank2["seeds"]
    assert [jobs[i]["seed"] for i in rank2["baseline_job_ids"]] == [0, 2, 3]
    assert all(jobs[i]["sweep_point"] == {"method": "spectral", "rank": 2} for i in rank2["baseline_job_ids"])
    assert rank2["ratio"] < 1 and rank2["significant"] is True  # nkp's error is lower here, and clearly so
    # The same with KEY=VALUE (the CLI's form), and as CSV.
    assert client.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method=spectral"}).json() == doc
    text = client.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method:spectral", "format": "csv"})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text.text)))
    assert len(rows) == 2 and rows[0]["baseline method"] == "spectral" and rows[0]["comparison"] == "ratio"
    for row, js in zip(rows, doc["rows"]):
        assert int(row["rank"]) == js["point"]["rank"] and int(row["n"]) == js["n"]
        assert float(row["ci_low"]) == js["ci_low"] and float(row["ratio"]) == js["ratio"]
        assert row["significant"] == "true" and row["job_ids"].split() == js["job_ids"]
    # A difference of another metric (time_s): the same pairs, mean of the differences.
    diff = client.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method:spectral", "metric": "time_s"}).json()
    assert diff["comparison"] == "difference" and diff["statistic"] == "difference"
    _check_against_hand(diff, _by_hand(list(jobs.values()), "time_s", "method", "spectral", ratio=False), ratio=False)
    forced = client.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method:spectral", "comparison": "difference"})
    _check_against_hand(forced.json(), _by_hand(list(jobs.values()), "error", "method", "spectral", ratio=False),
                        ratio=False)
    # The other key as baseline: rank 4 against rank 2 for each method (a number given as text).
    by_rank = client.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "rank:2"}).json()
    assert [row["point"] for row in by_rank["rows"]] == [{"method": "spectral", "rank": 4}, {"method": "nkp", "rank": 4}]
    _check_against_hand(by_rank, _by_hand(list(jobs.values()), "error", "rank", 2, ratio=True), ratio=True)
    return doc


def test_paired_comparison_matches_the_numbers_by_hand_on_postgres(idle_client, unique_tag, finish_job):
    """A 2 x 2 grid x 4 seeds whose results are written through the store (one job failed): every
    number of the comparison equals the one computed here from the jobs' results."""
    sid, jobs = controlled_sweep(idle_client, unique_tag, finish_job)
    _comparison_checks(idle_client, sid, jobs)


def test_paired_comparison_on_sqlite_gives_the_same_answers(idle_client, spawn_api, service_env, environment,
                                                            finish_job, tmp_path, unique_tag):
    """The embedded default's database (SQLite, read by the Python path: an API on a SQLite file, its
    results written through the store on that file) gives the numbers by hand too, and the same
    comparison and results documents as Postgres apart from the ids."""
    from jobs import migrate

    sqlite_url = f"sqlite:///{tmp_path / 'lowrank.db'}"
    migrate.upgrade(sqlite_url)
    # A queue prefix of its own: the session's worker must not receive these jobs.
    env = {"LOWRANK_DATABASE_URL": sqlite_url, "LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}sqlite."}
    api = spawn_api(env=env)
    with httpx.Client(base_url=api.url, timeout=30) as lite, environment(env):
        sid, jobs = controlled_sweep(lite, unique_tag, finish_job)
        doc_lite = _comparison_checks(lite, sid, jobs)
        rows_lite = lite.get(f"/api/v1/sweeps/{sid}/results").json()["rows"]
    pg_sid, _ = controlled_sweep(idle_client, unique_tag, finish_job)
    doc_pg = idle_client.get(f"/api/v1/sweeps/{pg_sid}/results", params={"baseline": "method:spectral"}).json()
    rows_pg = idle_client.get(f"/api/v1/sweeps/{pg_sid}/results").json()["rows"]

    def without_ids(doc: dict) -> dict:
        return {**doc, "sweep_id": None, "rows": [{k: v for k, v in r.items() if "job_ids" not in k} for r in doc["rows"]]}

    assert without_ids(doc_lite) == without_ids(doc_pg)  # the same Python arithmetic on both
    # The plain results aggregate in SQL on Postgres (avg, stddev_samp): equal to the last bits or so.
    assert len(rows_lite) == len(rows_pg) == 4
    for a, b in zip(rows_lite, rows_pg):
        assert {k: v for k, v in a.items() if k not in ("job_ids", "mean", "std")} == \
               {k: v for k, v in b.items() if k not in ("job_ids", "mean", "std")}
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-12) and a["std"] == pytest.approx(b["std"], rel=1e-9)
    assert rows_pg[0]["params"] == 2 * (M + D) and rows_pg[1]["params"] == 4 * (M + D)  # r (m + d)


@pytest.mark.timeout(180)
def test_paired_comparison_of_a_real_approx_sweep(client, worker_process, unique_tag):
    """The worker's own results (2 ranks x 2 methods x 3 seeds, the same Gaussian matrix per seed for
    both methods): NKP's error over spectral's, paired by seed, equals the numbers by hand, and NKP
    is below spectral at both ranks (MATH.md Section 3: rescaling alone beats spectral)."""
    body = {"base": _base(unique_tag), "grid": {"rank": [2, 4], "method": ["spectral", "nkp"]}, "seeds": [0, 1, 2]}
    r = client.post("/api/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    deadline = time.monotonic() + 150
    while client.get(f"/api/v1/sweeps/{sid}").json()["counts"]["succeeded"] < 12:
        assert time.monotonic() < deadline, client.get(f"/api/v1/sweeps/{sid}").json()["counts"]
        time.sleep(0.3)
    jobs = _jobs(client, sid)
    doc = client.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method:spectral"}).json()
    _check_against_hand(doc, _by_hand(jobs, "error", "method", "spectral", ratio=True), ratio=True)
    for row in doc["rows"]:
        assert row["n"] == 3 and row["n_unpaired"] == 0 and row["ratio_ci_high"] < 1, row


def test_baseline_mistakes_are_422s_that_name_them(idle_client, unique_tag, finish_job):
    sid, _ = controlled_sweep(idle_client, unique_tag, finish_job)
    url = f"/api/v1/sweeps/{sid}/results"
    for params, loc, start in [
        ({"baseline": "methd:nkp"}, "baseline",
         "baseline key 'methd' is not a grid key of this sweep; did you mean 'method'? (grid keys: method, rank)"),
        ({"baseline": "method:svd"}, "baseline",
         """baseline value 'svd' is not one of grid key 'method''s values ["spectral", "nkp"]"""),
        ({"baseline": "rank:3"}, "baseline", "baseline value '3' is not one of grid key 'rank''s values [2, 4]"),
        ({"baseline": "method"}, "baseline", "baseline must be KEY:VALUE, a grid key and one of its values "
                                             "(e.g. method:spectral)"),
        ({"baseline": "method:nkp", "group_by": "rank"}, "group_by", "baseline compares single grid points"),
        ({"baseline": "method:nkp", "metric": "nope"}, "metric", "metric 'nope' is not in this sweep's job results"),
        ({"comparison": "ratio"}, "comparison", "comparison applies to a baseline comparison"),
    ]:
        r = idle_client.get(url, params=params)
        assert r.status_code == 422, (params, r.text)
        (detail,) = r.json()["detail"]
        assert detail["loc"] == ["query", loc] and detail["msg"].startswith(start), (params, detail)
    one = idle_client.post("/api/v1/sweeps", json={"base": _base(unique_tag), "grid": {"rank": [2], "method": ["nkp"]}})
    r = idle_client.get(f"/api/v1/sweeps/{one.json()['id']}/results", params={"baseline": "rank:2"})
    assert r.status_code == 422 and "grid key 'rank' has one value (2): no other point" in r.text
    idle_client.post(f"/api/v1/sweeps/{one.json()['id']}/cancel")


def test_results_params_are_never_averaged_and_n1_has_no_std(idle_client, unique_tag, finish_job):
    """Approx rows carry the factors' size r (m + d); a row pooling ranks shows its range, not a mean;
    a point with one job has no std (null in JSON, empty in CSV)."""
    sid, _ = controlled_sweep(idle_client, unique_tag, finish_job)
    by_method = idle_client.get(f"/api/v1/sweeps/{sid}/results", params={"group_by": "method"}).json()["rows"]
    for row in by_method:
        assert row["params"] is None and (row["params_min"], row["params_max"]) == (2 * (M + D), 4 * (M + D))
    by_rank = idle_client.get(f"/api/v1/sweeps/{sid}/results", params={"group_by": "rank"}).json()["rows"]
    assert [(row["params"], row["params_min"], row["params_max"]) for row in by_rank] == \
           [(r * (M + D),) * 3 for r in (2, 4)]
    single = idle_client.post("/api/v1/sweeps", json={"base": _base(unique_tag), "grid": {"rank": [2, 4]},
                                                      "seeds": [7]}).json()
    for job in _jobs(idle_client, single["id"]):
        finish_job(job["id"], {"error": 0.5, "m": M, "d": D, "rank": job["sweep_point"]["rank"]})
    rows = idle_client.get(f"/api/v1/sweeps/{single['id']}/results").json()["rows"]
    assert [(row["n"], row["mean"], row["std"]) for row in rows] == [(1, 0.5, None), (1, 0.5, None)]
    text = idle_client.get(f"/api/v1/sweeps/{single['id']}/results", params={"format": "csv"}).text
    assert [row["std"] for row in csv.DictReader(io.StringIO(text))] == ["", ""]


def test_an_unknown_grid_key_is_named_first_with_a_suggestion(idle_client):
    """A train base without rank: a misspelt rank_ratio used to answer "give rank or rank_ratio"; now the
    key itself, a "did you mean", and nothing written."""
    base = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "image_size": 16, "init": "nkp"}
    r = idle_client.post("/api/v1/sweeps", json={"base": base, "grid": {"rank_raito": [0.1, 0.25]}})
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", "grid", "rank_raito"]
    assert detail["msg"].startswith("grid key 'rank_raito': 'rank_raito' is not a field of a train spec; "
                                    "did you mean 'rank_ratio'?"), detail
    r = idle_client.post("/api/v1/sweeps", json={"base": _base("x"), "grid": {"weights.dd": [8, 16]}})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"].startswith(
        "grid key 'weights.dd': 'dd' is not a field of weights; did you mean 'd'?"), r.text
    r = idle_client.post("/api/v1/sweeps", json={"base": _base("x"), "grid": {"weights.d": [8, 16]}, "seeds": [0]})
    assert r.status_code == 201, r.text  # a nested key that exists is fine
    idle_client.post(f"/api/v1/sweeps/{r.json()['id']}/cancel")


def test_short_ids_resolve_by_prefix(idle_client, insert_job, finish_job, spawn_api, unique_tag):
    """?id_prefix= lists the jobs (sweeps) whose id starts with the given hex digits: one for a unique
    prefix, several for an ambiguous one; a prefix that is not 4 to 32 hex digits is a 422. The dashboard
    pages take prefixes too (their script resolves them with the viewer's token)."""
    import secrets

    job = idle_client.post("/api/v1/jobs", json={**_base(unique_tag), "rank": 2}).json()
    finish_job(job["id"], {"error": 0.5})
    for prefix in (job["id"][:8], job["id"][:4], job["id"][:13], job["id"][:8].upper()):
        items = idle_client.get("/api/v1/jobs", params={"id_prefix": prefix, "tag": unique_tag}).json()["items"]
        assert [j["id"] for j in items] == [job["id"]], prefix
    shared = secrets.token_hex(4)
    twins = [insert_job({**_base(unique_tag), "rank": 2}, f"{shared}-0000-4000-8000-{secrets.token_hex(6)}")
             for _ in range(2)]
    for twin in twins:
        finish_job(twin, {"error": 0.5})
    both = idle_client.get("/api/v1/jobs", params={"id_prefix": shared}).json()["items"]
    assert sorted(j["id"] for j in both) == sorted(twins)
    assert idle_client.get("/api/v1/jobs", params={"id_prefix": twins[0][:13]}).json()["items"][0]["id"] in twins
    for bad in ("xyz1", "abc", "0" * 33):
        r = idle_client.get("/api/v1/jobs", params={"id_prefix": bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "id_prefix"], (bad, r.text)
        assert "4 to 32 hex digits" in r.text
    sweep = idle_client.post("/api/v1/sweeps", json={"base": _base(unique_tag), "grid": {"rank": [1]}}).json()
    found = idle_client.get("/api/v1/sweeps", params={"id_prefix": sweep["id"][:8]}).json()["items"]
    assert [s["id"] for s in found] == [sweep["id"]]
    idle_client.post(f"/api/v1/sweeps/{sweep['id']}/cancel")
    # Dashboard pages: a prefix is accepted (the page resolves it); anything else is a 422.
    for path in (f"/jobs/{job['id'][:8]}", f"/sweeps/{sweep['id'][:6]}", f"/compare?jobs={job['id'][:8]},{twins[0]}"):
        assert idle_client.get(path).status_code == 200, path
    assert idle_client.get("/jobs/xyz1").status_code == 422 and idle_client.get("/sweeps/12").status_code == 422
    # With auth on, a prefix is resolved only with a token, like any read of the jobs.
    api = spawn_api(env={"LOWRANK_AUTH": "required"})
    assert httpx.get(f"{api.url}/api/v1/jobs", params={"id_prefix": job["id"][:8]}).status_code == 401
    page = httpx.get(f"{api.url}/jobs/{job['id'][:8]}")
    assert page.status_code == 200 and job["id"] not in page.text  # the shell names only what was asked
