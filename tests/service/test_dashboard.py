"""The dashboard in a real headless browser (Debian's chromium driven by Playwright) against the
session's live API, Celery worker, Postgres and Redis.

Checked: every page opens without a JavaScript error; plots carry the expected traces (read from the
Plotly div's `data`) with the API's numbers; a train job's status and curves change on screen while
it runs (no reload); the index lists new jobs live and selects jobs for /compare; the sweep page's
CSV download equals the API's CSV; a server with LOWRANK_AUTH=required makes the pages ask for a token
once (kept in sessionStorage). A screenshot of the sweep page is written under the test's tmp dir, and
to docs/screenshots/sweep.png when that file is missing or LOWRANK_UPDATE_SCREENSHOTS=1.

Chromium missing is a FAILURE with the fix (`make browser`), never a skip.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.service, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("LOWRANK_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "docs" / "screenshots" / "sweep.png"
POLL = "poll=250"  # the pages' refresh interval for these tests (default 2 s)

# A few seconds of factored training: two small layers of ResNet-18 (NKP init), 16 px synthetic images,
# 2 epochs of 2 steps, step-level metrics at every step.
TRAIN_LAYERS = ["layer1.0.conv1", "layer2.0.conv2"]
TRAIN = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "image_size": 16, "init": "nkp",
         "include": TRAIN_LAYERS, "epochs": 2, "batch_size": 16, "synthetic_train_size": 32,
         "synthetic_val_size": 16, "lr": 0.05, "log_every": 1}
APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 48, "d": 32}, "rank": 2, "method": "spectral"}

# Plotly div -> [{name, n, x, y, role, fill}] (null while the div has no plot yet).
TRACES_JS = """id => { const d = document.getElementById(id);
  if (!d || !d.data) return null;
  return d.data.map(t => ({name: t.name, n: t.x ? t.x.length : 0, x: Array.from(t.x || []), y: Array.from(t.y || []),
                           role: t.meta ? t.meta.role : null, fill: t.fill || null})); }"""


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM}: run `make browser` "
                    "(apt-get install chromium), or set LOWRANK_TEST_CHROMIUM", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def new_context(browser, base_url: str):
    return browser.new_context(base_url=base_url, accept_downloads=True, viewport={"width": 1280, "height": 1000})


class Page:
    """A Playwright page (a browser tab) collecting JavaScript errors (checked at teardown)."""

    def __init__(self, context) -> None:
        self.context = context
        self.page = context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        # Content-Security-Policy violations and script failures show up as console errors; failed
        # API calls the page expects (404 of a missing object) are the only ones allowed, by test.
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))

    def traces(self, div: str) -> list[dict] | None:
        return self.page.evaluate(TRACES_JS, div)

    def wait_traces(self, div: str, count: int, timeout: float = 30_000) -> list[dict]:
        """Wait until the Plotly div `div` holds exactly `count` traces; return them."""
        self.page.wait_for_function("([id, n]) => { const d = document.getElementById(id); "
                                    "return !!(d && d.data && d.data.length === n); }", arg=[div, count],
                                    timeout=timeout)
        return self.traces(div)


@pytest.fixture(scope="module")
def context(browser, api_server) -> Iterator:
    """One browser context for the module (its HTTP cache keeps Plotly.js after the first page)."""
    ctx = new_context(browser, api_server.url)
    yield ctx
    ctx.close()


@pytest.fixture
def web(context) -> Iterator[Page]:
    p = Page(context)
    yield p
    p.page.close()
    assert p.errors == [], p.errors


# Keeps the module's one-slot worker busy until a test cancels it: see start_blocker.
BLOCKER = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "image_size": 16, "init": "dense",
           "epochs": 1000, "batch_size": 16, "synthetic_train_size": 32, "synthetic_val_size": 16, "lr": 0.01,
           "tags": ["dash-blocker"]}


def start_blocker(client: httpx.Client) -> str:
    """Submit BLOCKER and wait until the worker runs it (after whatever was queued before it): jobs
    submitted next are certainly queued until `client.post(f"/api/v1/jobs/{blocker}/cancel")`."""
    blocker = client.post("/api/v1/jobs", json=BLOCKER).json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/api/v1/jobs/{blocker}").json()["status"] != "running":
        if time.monotonic() > deadline:
            client.post(f"/api/v1/jobs/{blocker}/cancel")
            pytest.fail("the blocker job did not start within 120 s", pytrace=False)
        time.sleep(0.1)
    return blocker


@pytest.fixture(scope="module")
def train_sweep(api_server, worker_process) -> Iterator[dict]:
    """A train sweep over rank (2 points, 1 seed): the sweep test (accuracy versus parameters) and the
    compare test use both jobs.

    Its jobs are created while the worker runs a long blocker job; `release(train_sweep)` cancels the
    blocker and lets them run (each test that uses it releases it first, so any order works)."""
    body = {"name": "dash-train", "base": {**TRAIN, "tags": ["dash-train"]}, "grid": {"rank": [2, 4]}, "seeds": [0]}
    with httpx.Client(base_url=api_server.url, timeout=30) as c:
        blocker = start_blocker(c)
        try:
            r = c.post("/api/v1/sweeps", json=body)
            assert r.status_code == 201, r.text
            yield {**r.json(), "blocker": blocker}
        finally:
            c.post(f"/api/v1/jobs/{blocker}/cancel")


def release(client: httpx.Client, sweep: dict) -> None:
    """Cancel train_sweep's blocker job (again is harmless): the sweep's jobs run next."""
    r = client.post(f"/api/v1/jobs/{sweep['blocker']}/cancel")
    assert r.status_code in (200, 409), r.text


def wait_sweep(client: httpx.Client, sweep_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    sweep: dict = {}
    while time.monotonic() < deadline:
        sweep = client.get(f"/api/v1/sweeps/{sweep_id}").json()
        if sweep["counts"]["queued"] + sweep["counts"]["running"] == 0:
            return sweep
        time.sleep(0.2)
    pytest.fail(f"sweep {sweep_id} unfinished after {timeout} s: {sweep.get('counts')}", pytrace=False)


def sweep_job_ids(client: httpx.Client, sweep_id: str) -> list[str]:
    return [j["id"] for j in client.get("/api/v1/jobs", params={"sweep": sweep_id, "limit": 1000}).json()["items"]]


# ------------------------------------------------------------------------------------------ no browser

def test_plotly_and_static_files_come_from_this_server(client):
    """Plotly.js is the installed package's bundle (no CDN); pages reference only same-origin scripts."""
    from api.dashboard import plotly_js_path

    bundle = plotly_js_path().read_bytes()
    r = client.get("/", headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    import re

    srcs = re.findall(r'<script src="([^"]+)"', r.text)
    assert len(srcs) == 3 and all(s.startswith("/dashboard/static/") for s in srcs), srcs
    plotly_url = next(s for s in srcs if "plotly.min.js" in s).replace("&amp;", "&")
    plain = client.get(plotly_url, headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and plain.content == bundle
    zipped = client.get(plotly_url, headers={"Accept-Encoding": "gzip"})  # httpx decodes it
    assert zipped.headers["content-encoding"] == "gzip" and zipped.content == bundle
    for src in srcs:
        assert client.get(src.replace("&amp;", "&")).status_code == 200
    assert client.get("/dashboard/static/__init__.py").status_code == 404
    assert client.get("/dashboard/static/..%2Fapi.py").status_code == 404


def test_page_arguments_are_validated(client):
    r = client.get("/compare", params={"jobs": "not-a-uuid"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "jobs"]
    assert "UUID" in r.json()["detail"][0]["msg"]
    r = client.get("/compare", params={"jobs": ",".join([f"00000000-0000-0000-0000-{i:012d}" for i in range(21)])})
    assert r.status_code == 422 and "1 to 20" in r.json()["detail"][0]["msg"]
    assert client.get("/jobs/nope").status_code == 422
    assert client.get("/sweeps/nope").status_code == 422


# ------------------------------------------------------------------------------------------ browser

@pytest.mark.timeout(120)
def test_index_lists_jobs_live_and_selects_for_compare(web, client, worker_process, wait_job, unique_tag):
    page = web.page
    first = client.post("/api/v1/jobs", json={**APPROX, "tags": [unique_tag], "name": "dash-a"}).json()
    page.goto(f"/?tag={unique_tag}&{POLL}")
    page.wait_for_selector(f'#jobs-table tr[data-job-id="{first["id"]}"]')
    page.evaluate("window.__noReload = 1")
    # A job submitted while the page is open appears, and its status reaches succeeded, without a reload.
    second = client.post("/api/v1/jobs", json={**APPROX, "rank": 3, "tags": [unique_tag], "name": "dash-b"}).json()
    page.wait_for_selector(f'#jobs-table tr[data-job-id="{second["id"]}"][data-status="succeeded"]')
    page.wait_for_selector(f'#jobs-table tr[data-job-id="{first["id"]}"][data-status="succeeded"]')
    assert page.evaluate("window.__noReload") == 1
    assert len(page.query_selector_all("#jobs-table tbody tr")) == 2  # the tag filter
    for job in (first, second):
        done = wait_job(client, job["id"])
        summary = page.inner_text(f'#jobs-table tr[data-job-id="{job["id"]}"] td.summary')
        assert summary.startswith("error ") and "(spectral, r=" in summary
        assert float(summary.split()[1]) == pytest.approx(done["result"]["error"], rel=1e-3)  # 4 digits shown
    # Filters reach the API: no approx job of this tag is failed.
    page.select_option("#filters select[name=status]", "failed")
    page.click("#filters button[type=submit]")
    page.wait_for_selector("#jobs-empty:not([hidden])")
    assert "status=failed" in page.url and "poll=250" in page.url
    page.select_option("#filters select[name=status]", "")
    page.click("#filters button[type=submit]")
    page.wait_for_selector(f'#jobs-table tr[data-job-id="{second["id"]}"]')
    # Select both -> /compare with their ids -> a result bar chart with the two errors.
    for job in (first, second):
        page.check(f'#jobs-table tr[data-job-id="{job["id"]}"] input.select')
    assert page.inner_text("#compare-button") == "compare selected (2)"
    page.click("#compare-button")
    page.wait_for_url("**/compare?jobs=*")
    assert set(page.url.split("jobs=")[1].split("&")[0].split(",")) == {first["id"], second["id"]}
    (bars,) = web.wait_traces("compare-bars", 1)
    errors = [wait_job(client, j["id"])["result"]["error"] for j in (first, second)]
    assert sorted(bars["y"]) == pytest.approx(sorted(errors))
    assert page.is_visible("#compare-empty")  # approx jobs record no curves


@pytest.mark.timeout(120)
def test_index_pages_through_older_jobs(web, idle_client, unique_tag):
    """55 jobs under one tag (queued on the idle API: the same database, no worker takes them): the
    first page shows the newest 50, "older" the other 5 and keeps them while it polls, "newer" goes
    back to the first 50."""
    ids = []
    for i in range(55):
        r = idle_client.post("/api/v1/jobs", json={**APPROX, "tags": [unique_tag], "name": f"page-{i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    newest_first = ids[::-1]
    page = web.page

    def shown(n: int) -> list[str]:
        page.wait_for_function(f"() => document.querySelectorAll('#jobs-table tbody tr').length === {n}")
        return [row.get_attribute("data-job-id") for row in page.query_selector_all("#jobs-table tbody tr")]

    try:
        page.goto(f"/?tag={unique_tag}&{POLL}")
        assert shown(50) == newest_first[:50]
        assert page.is_disabled("#jobs-newer") and page.is_enabled("#jobs-older")
        assert "older jobs on the next page" in page.inner_text("#jobs-summary")
        page.click("#jobs-older")
        assert shown(5) == newest_first[50:]
        assert page.is_enabled("#jobs-newer") and page.is_disabled("#jobs-older")
        assert page.inner_text("#jobs-summary").startswith("5 shown (page 2)")
        time.sleep(0.8)  # a few polls (every 250 ms here) later, still the older page
        assert shown(5) == newest_first[50:]
        page.click("#jobs-newer")
        assert shown(50) == newest_first[:50] and page.is_disabled("#jobs-newer")
    finally:
        for job_id in ids:
            idle_client.post(f"/api/v1/jobs/{job_id}/cancel")


@pytest.mark.timeout(60)
def test_long_series_are_downsampled_on_the_server(web, client, worker_process, wait_job, unique_tag):
    """2,000 points of a series (written through the worker's store call) reach the page as at most
    300 (the page's max_points): first and last step kept, the note says so; an approx job's result
    and its factors artifact are shown."""
    import math

    from jobs import store

    t0 = time.monotonic()
    job = wait_job(client, client.post("/api/v1/jobs", json={**APPROX, "tags": [unique_tag]}).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    t1 = time.monotonic()
    store.record_metrics(job["id"], [("train_loss", step, 2.0 + math.sin(step / 50)) for step in range(1, 2001)])
    t2 = time.monotonic()
    page = web.page
    page.goto(f"/jobs/{job['id']}?{POLL}")
    (trace,) = web.wait_traces("plot-loss", 1)
    print(f"\njob {t1 - t0:.1f} s, 2000 metric rows {t2 - t1:.1f} s, page {time.monotonic() - t2:.1f} s")
    assert trace["name"] == "train_loss" and trace["n"] <= 300 and trace["x"][0] == 1 and trace["x"][-1] == 2000
    assert max(trace["y"]) == pytest.approx(3.0, abs=1e-3) and min(trace["y"]) == pytest.approx(1.0, abs=1e-3)
    assert f"{trace['n']} of 2000 points" in page.inner_text("#curves-note")
    assert page.is_hidden("#plot-accuracy") and page.is_hidden("#plot-lr")
    assert page.inner_text("#job-status") == "succeeded"
    assert "factors.safetensors" in page.inner_text("#artifacts-table")
    assert page.is_hidden("#init-section")  # approx jobs have no per-layer report
    result = page.inner_text("#result-table")
    assert "method\tspectral" in result and "error" in result


# The job page's own train job: 3 epochs of 6 steps, so the page has two epoch ends (metrics are
# written at each) to show a partial curve while the job still runs.
WATCHED = {**TRAIN, "rank": 2, "epochs": 3, "synthetic_train_size": 96}
WATCHED_STEPS = 3 * 6


@pytest.mark.timeout(240)
def test_job_page_follows_a_running_train_job(web, client, worker_process, unique_tag):
    """The page opened while the job is queued shows the status go queued -> running -> succeeded and
    the step curve grow while it runs, without a reload; at the end: result, 3 curve plots with the
    API's series, the init-error table, artifacts."""
    page = web.page
    blocker = start_blocker(client)
    try:
        r = client.post("/api/v1/jobs", json={**WATCHED, "tags": [unique_tag]})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        page.goto(f"/jobs/{job_id}?{POLL}")
        page.evaluate("window.__noReload = 1")
        page.wait_for_function("() => document.getElementById('job-status').textContent === 'queued'",
                               timeout=30_000)
    finally:
        client.post(f"/api/v1/jobs/{blocker}/cancel")
    seen: list[tuple[str, int]] = []  # distinct (status on screen, train_loss_step points on screen)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status, points = page.evaluate("""() => {
            const d = document.getElementById('plot-loss');
            const t = d && d.data ? d.data.find(t => t.name === 'train_loss_step') : null;
            return [document.getElementById('job-status').textContent, t ? t.x.length : 0]; }""")
        if not seen or seen[-1] != (status, points):
            seen.append((status, points))
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.05)
    statuses = [s for s, _ in seen]
    assert statuses[-1] == "succeeded", (seen, client.get(f"/api/v1/jobs/{job_id}").json()["error"])
    # Status changed on screen, in order: queued (seen above, before the blocker was cancelled), running, succeeded.
    assert "running" in statuses, seen
    assert statuses.index("running") < statuses.index("succeeded"), seen
    assert all(s in ("queued", "running", "succeeded") for s in statuses), seen
    assert page.evaluate("window.__noReload") == 1
    # The curve grew on screen while the job ran: a partial curve was shown, and counts never shrank.
    counts = [n for _, n in seen]
    assert counts == sorted(counts), seen
    assert any(0 < n < WATCHED_STEPS for s, n in seen if s == "running"), seen
    print(f"\non screen (status, train_loss_step points): {seen}")

    job = client.get(f"/api/v1/jobs/{job_id}").json()
    series = {s["name"]: s for s in client.get(f"/api/v1/jobs/{job_id}/metrics").json()["series"]}
    # Curves: loss (train per step, train per epoch, val), accuracy (train, val top-1, val top-5), lr;
    # the API's points.
    page.wait_for_function("() => document.getElementById('plot-loss').data.find(t => t.name === 'train_loss_step')"
                           f".x.length === {len(series['train_loss_step']['steps'])}")
    loss = {t["name"]: t for t in web.wait_traces("plot-loss", 3)}
    assert set(loss) == {"train_loss_step", "train_loss", "val_loss"}
    steps = loss["train_loss_step"]["x"]
    assert steps == series["train_loss_step"]["steps"] == list(range(1, WATCHED_STEPS + 1))  # 6 steps x 3 epochs
    assert loss["train_loss_step"]["y"] == pytest.approx(series["train_loss_step"]["values"])
    assert loss["train_loss"]["x"] == [6, 12, 18]
    assert loss["train_loss"]["y"] == pytest.approx(series["train_loss"]["values"])
    assert loss["val_loss"]["n"] == 3
    assert {t["name"] for t in web.wait_traces("plot-accuracy", 3)} == {"train_top1", "val_top1", "val_top5"}
    (lr,) = web.wait_traces("plot-lr", 1)
    assert lr["name"] == "lr" and lr["y"] == pytest.approx(series["lr"]["values"])
    # Result, error, init table, artifacts.
    page.wait_for_selector("#init-table tbody tr")
    result_text = page.inner_text("#result-table")
    assert "val_top1" in result_text and "params_factored" in result_text
    assert page.is_hidden("#job-error")
    rows = page.query_selector_all("#init-table tbody tr")
    report = client.get(f"/api/v1/jobs/{job_id}/artifacts/init_report.json").json()
    assert len(rows) == len(report["layers"])
    n_factored = sum(row["status"] == "factored" for row in report["layers"])
    assert len([r for r in rows if r.is_visible()]) == n_factored == 2  # unchanged layers behind a toggle
    page.check("#init-all")
    assert len([r for r in rows if r.is_visible()]) == len(report["layers"])
    for row in report["layers"]:
        if row["status"] != "factored":
            continue
        tr = page.query_selector(f'#init-table tbody tr[data-layer="{row["layer"]}"]')
        chosen = float(tr.query_selector("td.chosen").inner_text())
        spectral = float(tr.query_selector("td.spectral").inner_text())
        assert chosen == pytest.approx(row["error"], rel=1e-3)
        assert spectral == pytest.approx(row["spectral_error"], rel=1e-3)
    assert sorted(r["layer"] for r in report["layers"] if r["status"] == "factored") == TRAIN_LAYERS
    artifacts = page.inner_text("#artifacts-table")
    assert "init_report.json" in artifacts and "checkpoints/last.pt" in artifacts
    # An artifact link downloads through the API (with the token when there is one).
    with page.expect_download() as dl:
        page.locator("#artifacts-table a", has_text="init_report.json").click()
    downloaded = Path(dl.value.path()).read_bytes()
    assert downloaded == client.get(f"/api/v1/jobs/{job_id}/artifacts/init_report.json").content
    assert page.inner_text("#job-status") == "succeeded" and job["status"] == "succeeded"
    if os.environ.get("LOWRANK_TEST_SHOTS"):  # look at the pages: LOWRANK_TEST_SHOTS=<folder>
        page.screenshot(path=str(Path(os.environ["LOWRANK_TEST_SHOTS"]) / "job.png"), full_page=True)


@pytest.mark.timeout(150)
def test_sweep_page_plots_table_csv_and_screenshot(web, client, worker_process, train_sweep, unique_tag,
                                                   tmp_path):
    """An approx sweep (rank x method, 3 seeds) opened while it runs: lines per method with a band,
    the numbers of the results API, band and log toggles, the table, the CSV download, a screenshot."""
    release(client, train_sweep)
    body = {"name": "rank-vs-method", "base": {**APPROX, "tags": [unique_tag]},
            "grid": {"rank": [1, 2, 4, 8], "method": ["spectral", "nkp"]}, "seeds": [0, 1, 2]}
    r = client.post("/api/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sweep = r.json()
    page = web.page
    page.goto(f"/sweeps/{sweep['id']}?{POLL}")
    page.evaluate("window.__noReload = 1")
    done = wait_sweep(client, sweep["id"])
    assert done["counts"]["succeeded"] == 24, done
    page.wait_for_selector("#sweep-status[data-status='succeeded']")
    assert page.evaluate("window.__noReload") == 1
    keys = list(done["grid"])  # the page groups by every grid key, in the API's order
    results = client.get(f"/api/v1/sweeps/{sweep['id']}/results",
                         params={"metric": "error", "group_by": ",".join(keys)}).json()
    # Wait for the page's plot to hold the final numbers (n = 3 seeds everywhere).
    page.wait_for_function("() => { const d = document.getElementById('plot-metric'); return d.data && "
                           "d.data.length === 4 && d.data.filter(t => t.meta.role === 'mean')"
                           ".every(t => t.customdata.every(c => c[0] === 3)); }")
    traces = web.traces("plot-metric")
    means = {t["name"]: t for t in traces if t["role"] == "mean"}
    bands = [t for t in traces if t["role"] == "band"]
    # Legend entries carry their key.
    assert set(means) == {"method=spectral", "method=nkp"} and len(bands) == 2 and all(b["fill"] == "toself" for b in bands)
    means = {name.removeprefix("method="): t for name, t in means.items()}
    for method, trace in means.items():
        rows = sorted((r for r in results["rows"] if r["point"]["method"] == method), key=lambda r: r["point"]["rank"])
        assert trace["x"] == [1, 2, 4, 8]
        assert trace["y"] == pytest.approx([r["mean"] for r in rows])
    # The band is mean +- std (default): its upper edge is mean + std.
    spectral_band = bands[[t["name"] for t in traces if t["role"] == "mean"].index("method=spectral")]
    rows = sorted((r for r in results["rows"] if r["point"]["method"] == "spectral"), key=lambda r: r["point"]["rank"])
    assert spectral_band["y"][:4] == pytest.approx([r["mean"] + r["std"] for r in rows])
    # NKP's function error is never above spectral's at the same rank (same matrices, same seeds).
    assert all(n <= s + 1e-9 for n, s in zip(means["nkp"]["y"], means["spectral"]["y"]))
    # Toggles: log y; min/max band; no band.
    page.check("#logy")
    page.wait_for_function("() => document.getElementById('plot-metric').layout.yaxis.type === 'log'")
    page.select_option("#band-select", "minmax")
    first_line = [t for t in web.traces("plot-metric") if t["role"] == "mean"][0]["name"].removeprefix("method=")
    rows = sorted((r for r in results["rows"] if r["point"]["method"] == first_line), key=lambda r: r["point"]["rank"])
    edges = [r["max"] for r in rows] + [r["min"] for r in rows][::-1]
    page.wait_for_function("edges => { const y = document.getElementById('plot-metric').data[0].y; "
                           "return y.every((v, i) => Math.abs(v - edges[i]) <= 1e-9 * Math.abs(edges[i])); }", arg=edges)
    page.select_option("#band-select", "none")
    assert [t["role"] for t in web.wait_traces("plot-metric", 2)] == ["mean", "mean"]
    page.select_option("#band-select", "std")
    web.wait_traces("plot-metric", 4)
    assert "band=std" in page.url and "logy=1" in page.url
    # Results table: one row per grid point.
    assert len(page.query_selector_all("#results-table tbody tr")) == 8
    assert len(page.query_selector_all("#sweep-jobs tbody tr")) == 24
    # CSV download (through fetch with the token) equals the API's CSV.
    with page.expect_download() as dl:
        page.click("#csv-button")
    download = dl.value
    assert download.suggested_filename == "rank-vs-method-error.csv"
    text = Path(download.path()).read_text()
    api_csv = client.get(f"/api/v1/sweeps/{sweep['id']}/results",
                         params={"metric": "error", "group_by": ",".join(keys), "format": "csv"}).text
    assert text == api_csv
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == 8
    by_point = {(int(r["rank"]), r["method"]): float(r["mean"]) for r in parsed}
    for row in results["rows"]:
        assert by_point[(row["point"]["rank"], row["point"]["method"])] == pytest.approx(row["mean"], rel=1e-12)
    page.uncheck("#logy")
    page.wait_for_function("() => document.getElementById('plot-metric').layout.yaxis.type === 'linear'")
    shot = tmp_path / "sweep.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    if os.environ.get("LOWRANK_UPDATE_SCREENSHOTS") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


@pytest.mark.timeout(200)
def test_train_sweep_accuracy_versus_parameters_and_compare(web, client, train_sweep):
    release(client, train_sweep)
    done = wait_sweep(client, train_sweep["id"], timeout=180)
    assert done["counts"]["succeeded"] == 2, done
    page = web.page
    page.goto(f"/sweeps/{train_sweep['id']}?{POLL}")
    results = client.get(f"/api/v1/sweeps/{train_sweep['id']}/results",
                         params={"metric": "val_top1", "group_by": "rank"}).json()
    assert page.input_value("#metric-select") == "val_top1"
    (trade,) = web.wait_traces("plot-tradeoff", 1)
    rows = sorted(results["rows"], key=lambda r: r["params"])
    assert trade["x"] == pytest.approx([r["params"] for r in rows])
    assert trade["y"] == pytest.approx([r["mean"] for r in rows])
    assert rows[0]["point"]["rank"] == 2 and rows[0]["params"] < rows[1]["params"]  # rank 2 is smaller
    assert [t["role"] for t in web.wait_traces("plot-metric", 2)] == ["band", "mean"]
    # Another metric from the jobs' results: the plot follows.
    page.select_option("#metric-select", "val_loss")
    page.wait_for_function("() => document.getElementById('plot-metric').layout.yaxis.title.text === 'val_loss'")
    assert "params" in page.inner_text("#results-table thead")
    # Compare the sweep's two train jobs: one plot per metric series, a trace per job.
    ids = sweep_job_ids(client, train_sweep["id"])
    page.goto(f"/compare?jobs={','.join(ids)}&{POLL}")
    for name in ("train_loss", "val_top1", "lr"):
        traces = web.wait_traces(f"cmp-{name}", 2)
        series = client.get(f"/api/v1/jobs/{ids[0]}/metrics", params={"name": name}).json()["series"][0]
        assert traces[0]["x"] == series["steps"] and traces[0]["y"] == pytest.approx(series["values"])
    assert page.query_selector("#cmp-epoch") is None
    if os.environ.get("LOWRANK_TEST_SHOTS"):
        page.screenshot(path=str(Path(os.environ["LOWRANK_TEST_SHOTS"]) / "compare.png"), full_page=True)
    assert "val_top1" in page.inner_text("#compare-table")


@pytest.mark.timeout(120)
def test_pages_ask_for_a_token_when_auth_is_required(browser, spawn_api, database_url):
    """LOWRANK_AUTH=required: the page's API call gets 401 -> token prompt; the token entered once is
    kept in sessionStorage and sent as Bearer by every page of the tab."""
    from jobs import auth

    _, token = auth.create_token("dash-viewer", url=database_url)
    api = spawn_api(env={"LOWRANK_AUTH": "required"})
    assert httpx.get(f"{api.url}/api/v1/jobs").status_code == 401
    assert httpx.get(f"{api.url}/").status_code == 200  # page shells are open; data is not
    web = Page(new_context(browser, api.url))
    try:
        page = web.page
        page.goto(f"/?{POLL}")
        page.wait_for_selector("#auth-panel:not([hidden])")
        assert "requires an API token" in page.inner_text("#auth-message")
        page.fill("#auth-token", "lrk_wrong")
        page.click("#auth-form button[type=submit]")
        page.wait_for_selector("#auth-panel:not([hidden])")
        page.wait_for_function("() => document.getElementById('auth-message').textContent.includes('refused')")
        page.fill("#auth-token", token)
        page.click("#auth-form button[type=submit]")
        page.wait_for_selector("#jobs-table")
        page.wait_for_function("() => document.getElementById('jobs-summary').textContent.includes('shown')")
        assert page.is_hidden("#auth-panel")
        assert page.evaluate("sessionStorage.getItem('lowrank.token')") == token
        # Another page of the same tab uses the stored token: no prompt.
        page.goto(f"/compare?jobs=00000000-0000-0000-0000-000000000000&{POLL}")
        page.wait_for_function("() => document.getElementById('error-banner').textContent.includes('not found')")
        assert page.is_hidden("#auth-panel")
        # The expected failures: the 401s before the token and the unknown job's 404.
        assert all("401" in e or "404" in e or "ApiError" in e for e in web.errors), web.errors
    finally:
        web.context.close()
