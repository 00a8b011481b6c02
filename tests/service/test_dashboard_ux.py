"""The dashboard on what the first-use study tripped over, in headless chromium (the fixtures of
test_dashboard.py) against the live API: the sweep page's defaults (a numeric x axis, log for ranks,
legend entries with their key, result metrics only, no std for n = 1, "error" defined on the axis),
the "relative to" control (paired differences and their 95% intervals, the API's numbers), the
accuracy-versus-parameters plot without overlapping labels, the job page (epochs on the x axis, a log
toggle for the loss, result warnings), the compare page (labels by what differs, short ids of digits
on a categorical axis, rank and rank_ratio apart), and short ids in page URLs.

Jobs are created on the idle API (no worker takes them) and their results and metrics written
through the store, as a worker would, so every number on screen is known."""
from __future__ import annotations

import csv
import io
import os
import random
import secrets
from pathlib import Path

import pytest
from test_dashboard import POLL, browser, context, web  # noqa: F401 - fixtures
from test_sweep_compare import controlled_sweep

pytestmark = [pytest.mark.service, pytest.mark.browser]

TRAIN = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "image_size": 16, "epochs": 2,
         "batch_size": 16, "synthetic_train_size": 32, "synthetic_val_size": 16}
APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 32, "d": 16}, "rank": 2, "method": "spectral"}
WARNING = "val_top1 0.100 is at chance level (0.100 for 10 classes)"


def _jobs(client, sweep_id: str) -> list[dict]:
    return client.get("/api/v1/jobs", params={"sweep": sweep_id, "limit": 1000}).json()["items"]


def _plot(page, div: str) -> dict:
    """The Plotly div's layout and traces (mode, names, x, y, error bars, hover text)."""
    return page.evaluate("""id => { const d = document.getElementById(id);
      return { layout: { x: d.layout.xaxis, y: d.layout.yaxis, title: d.layout.title.text, shapes: d.layout.shapes },
               traces: d.data.map(t => ({ name: t.name, mode: t.mode, x: Array.from(t.x), y: Array.from(t.y),
                                          role: t.meta ? t.meta.role : null, text: t.text || null,
                                          hovertext: t.hovertext || null, error_y: t.error_y || null })) }; }""", div)


@pytest.mark.timeout(120)
def test_sweep_page_defaults_and_relative_to_a_baseline(web, idle_client, finish_job, unique_tag):
    """grid {method, rank} (method sorts first): x = rank on a log axis, lines method=spectral and
    method=nkp, the y axis says what "error" is, the metric menu has no m/d/rank. Relative to
    method=spectral: one line (method=nkp) of the API's paired ratios with their 95% intervals as error
    bars and a reference line at 1; its table and CSV are the API's."""
    sid, _ = controlled_sweep(idle_client, unique_tag, finish_job)
    page = web.page
    page.goto(f"/sweeps/{sid}?{POLL}")
    web.wait_traces("plot-metric", 4)  # 2 lines + their bands
    assert page.input_value("#x-select") == "rank" and page.is_checked("#logx")
    plot = _plot(page, "plot-metric")
    assert plot["layout"]["x"]["type"] == "log" and plot["layout"]["x"]["title"]["text"] == "rank"
    assert {t["name"] for t in plot["traces"] if t["role"] == "mean"} == {"method=spectral", "method=nkp"}
    assert plot["layout"]["y"]["title"]["text"] == "error: normalized function error L(W')/L(0)"
    options = page.eval_on_selector_all("#metric-select option", "os => os.map(o => o.value)")
    assert options == ["error", "time_s", "iterations"]  # result metrics; m, d, rank are spec echoes
    # x = method (categorical) by choice: log x is not the default there.
    page.select_option("#x-select", "method")
    page.wait_for_function("() => document.getElementById('plot-metric').layout.xaxis.type === 'category'")
    assert not page.is_checked("#logx")
    page.select_option("#x-select", "rank")

    api_doc = idle_client.get(f"/api/v1/sweeps/{sid}/results", params={"baseline": "method:spectral"}).json()
    page.select_option("#baseline-select", "method:spectral")
    web.wait_traces("plot-metric", 1)
    plot = _plot(page, "plot-metric")
    (trace,) = plot["traces"]
    assert trace["role"] == "paired" and trace["name"] == "method=nkp" and trace["x"] == [2, 4]
    assert trace["y"] == pytest.approx([r["ratio"] for r in api_doc["rows"]], rel=1e-12)
    assert trace["error_y"]["array"] == pytest.approx([r["ratio_ci_high"] - r["ratio"] for r in api_doc["rows"]])
    assert trace["error_y"]["arrayminus"] == pytest.approx([r["ratio"] - r["ratio_ci_low"] for r in api_doc["rows"]])
    assert "ratio to method=spectral" in plot["layout"]["title"] and plot["layout"]["shapes"][0]["y0"] == 1
    assert "baseline=method%3Aspectral" in page.url
    cells = page.eval_on_selector_all("#paired-table tbody tr", "rs => rs.map(r => [r.querySelector('td.n').textContent, "
                                      "r.querySelector('td.ci').textContent])")
    assert cells == [[str(r["n"]), f"[{r['ratio_ci_low']:.4g}, {r['ratio_ci_high']:.4g}] *"] for r in api_doc["rows"]]
    with page.expect_download() as dl:
        page.click("#csv-button")
    text = Path(dl.value.path()).read_text()
    assert text == idle_client.get(f"/api/v1/sweeps/{sid}/results",
                                   params={"metric": "error", "group_by": "method,rank", "baseline": "method:spectral",
                                           "format": "csv"}).text
    assert len(list(csv.DictReader(io.StringIO(text)))) == 2
    if os.environ.get("LOWRANK_TEST_SHOTS"):  # look at the page: LOWRANK_TEST_SHOTS=<folder>
        page.screenshot(path=str(Path(os.environ["LOWRANK_TEST_SHOTS"]) / "sweep-relative.png"), full_page=True)
    # Back to absolute values: the lines come back.
    page.select_option("#baseline-select", "")
    web.wait_traces("plot-metric", 4)
    assert page.is_hidden("#paired-section")


@pytest.mark.timeout(120)
def test_one_seed_shows_no_std(web, idle_client, finish_job, unique_tag):
    r = idle_client.post("/api/v1/sweeps", json={"base": {**APPROX, "tags": [unique_tag]}, "grid": {"rank": [1, 2, 4]},
                                                 "seeds": [0]})
    sid = r.json()["id"]
    for job in _jobs(idle_client, sid):
        finish_job(job["id"], {"error": 1.0 / job["sweep_point"]["rank"], "m": 32, "d": 16,
                               "rank": job["sweep_point"]["rank"]})
    page = web.page
    page.goto(f"/sweeps/{sid}?{POLL}")
    page.wait_for_function("() => { const d = document.getElementById('plot-metric'); return d.data && "
                           "d.data.some(t => t.meta.role === 'mean' && t.x.length === 3); }")
    mean = next(t for t in _plot(page, "plot-metric")["traces"] if t["role"] == "mean")
    assert all("n = 1: no std" in h for h in mean["hovertext"]) and mean["name"] == "all"
    std_cells = page.eval_on_selector_all("#results-table tbody tr", "rs => rs.map(r => r.children[2].textContent)")
    assert std_cells == ["\u2013"] * 3
    params = page.eval_on_selector_all("#results-table td.params", "cs => cs.map(c => c.textContent)")
    assert params == ["48", "96", "192"]  # r (m + d)


@pytest.mark.timeout(120)
def test_train_sweep_tradeoff_has_no_overlapping_labels(web, idle_client, finish_job, unique_tag):
    """grid {init, rank_ratio}: x = rank_ratio (log), not the categorical init; accuracy versus
    parameters names each point's rank_ratio in its hover text, with no text labels on the plot; a job
    whose result has warnings is marked in the jobs table."""
    body = {"base": {**TRAIN, "tags": [unique_tag]}, "grid": {"init": ["spectral", "nkp"], "rank_ratio": [0.1, 0.25]},
            "seeds": [0]}
    r = idle_client.post("/api/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    warned = None
    for job in _jobs(idle_client, sid):
        p = job["sweep_point"]
        result = {"val_top1": 0.5 + p["rank_ratio"] + (0.05 if p["init"] == "nkp" else 0), "val_loss": 1.0,
                  "params_factored": int(1e6 * p["rank_ratio"]), "params_dense": 1_000_000, "epochs": 2}
        if p == {"init": "spectral", "rank_ratio": 0.1}:
            result["warnings"], warned = [WARNING], job["id"]
        finish_job(job["id"], result)
    page = web.page
    page.goto(f"/sweeps/{sid}?{POLL}")
    web.wait_traces("plot-tradeoff", 2)
    assert page.input_value("#x-select") == "rank_ratio" and page.is_checked("#logx")
    plot = _plot(page, "plot-tradeoff")
    assert {t["name"] for t in plot["traces"]} == {"init=spectral", "init=nkp"}
    for t in plot["traces"]:
        assert "text" not in t["mode"] and t["text"] is None
        assert t["x"] == [100_000, 250_000] and [h.split("<br>")[0] for h in t["hovertext"]] == \
               ["rank_ratio=0.1", "rank_ratio=0.25"]
    row = page.locator(f'#sweep-jobs tr[data-job-id="{warned}"] .has-warning')
    assert row.count() == 1 and WARNING in row.get_attribute("title")


@pytest.mark.timeout(120)
def test_job_page_epochs_log_loss_warnings_and_short_ids(web, idle_client, insert_job, finish_job,
                                                        unique_tag):
    """A train job's metrics (3 steps per epoch, 2 epochs; a diverged first validation loss): the x axis
    is labelled in epochs at the epochs' last steps, the loss can go to a log axis, the result's
    warnings are shown; /jobs/<8 characters> opens it; an unknown or ambiguous prefix says so."""
    from jobs import store

    job = idle_client.post("/api/v1/jobs", json={**TRAIN, "rank_ratio": 0.25, "init": "nkp", "tags": [unique_tag]}).json()
    finish_job(job["id"], {"val_top1": 0.102, "val_loss": 2.3, "params_factored": 10, "warnings": [WARNING]})
    rows = []
    for step in range(1, 7):
        epoch = (step - 1) // 3 + 1
        rows += [("train_loss_step", step, 2.5 - 0.1 * step), ("lr", step, 0.01), ("epoch", step, float(epoch))]
        if step % 3 == 0:
            rows += [("train_loss", step, 2.4 - 0.2 * epoch), ("val_loss", step, 4.8e6 if epoch == 1 else 2.3),
                     ("val_top1", step, 0.1)]
    store.record_metrics(job["id"], rows)
    page = web.page
    page.goto(f"/jobs/{job['id'][:8]}?{POLL}")
    web.wait_traces("plot-loss", 3)
    assert page.url.split("?")[0].endswith(f"/jobs/{job['id']}")  # the short id was resolved
    plot = _plot(page, "plot-loss")
    assert plot["layout"]["x"]["title"]["text"] == "epoch"
    assert plot["layout"]["x"]["tickvals"] == [3, 6] and plot["layout"]["x"]["ticktext"] == ["1", "2"]
    assert plot["layout"]["y"]["type"] == "linear"
    page.check("#loss-logy")
    page.wait_for_function("() => document.getElementById('plot-loss').layout.yaxis.type === 'log'")
    assert page.is_visible("#job-warnings") and WARNING in page.inner_text("#job-warnings")
    assert "warnings" not in page.inner_text("#result-table")  # shown once, in the box
    # Unknown and ambiguous prefixes: the page says which, and stops.
    page.goto(f"/jobs/ffff0000ffff?{POLL}")
    page.wait_for_function("() => document.getElementById('error-banner').textContent.includes("
                           "'no job id starts with ffff0000ffff')")
    shared = secrets.token_hex(4)
    for _ in range(2):
        twin = insert_job({**APPROX, "tags": [unique_tag]}, f"{shared}-0000-4000-8000-{secrets.token_hex(6)}")
        finish_job(twin, {"error": 0.5})
    page.goto(f"/jobs/{shared}?{POLL}")
    page.wait_for_function("() => document.getElementById('error-banner').textContent.includes('is ambiguous')")


@pytest.mark.timeout(120)
def test_compare_page_labels_and_a_categorical_bar_axis(web, idle_client, insert_job, finish_job,
                                                        unique_tag):
    """Jobs whose specs differ are labelled by the difference (init=..., rank_ratio=...), with rank_ratio
    shown as such (never under "rank"); jobs with the same spec by their short ids, which here are all
    digits: the bar chart's x axis stays categorical (a numeric axis put them at 1.2e7 and 2.3e7)."""
    a = idle_client.post("/api/v1/jobs", json={**TRAIN, "init": "nkp", "rank_ratio": 0.1, "tags": [unique_tag]}).json()
    b = idle_client.post("/api/v1/jobs", json={**TRAIN, "init": "spectral", "rank_ratio": 0.25,
                                               "tags": [unique_tag]}).json()
    finish_job(a["id"], {"val_top1": 0.9, "params_factored": 100})
    finish_job(b["id"], {"val_top1": 0.8, "params_factored": 250})
    page = web.page
    page.goto(f"/compare?jobs={a['id'][:8]},{b['id']}&{POLL}")
    (bars,) = web.wait_traces("compare-bars", 1)
    assert bars["x"] == ["init=nkp, rank_ratio=0.1", "init=spectral, rank_ratio=0.25"] and bars["y"] == [0.9, 0.8]
    table = page.inner_text("#compare-table")
    assert "rank_ratio\t0.10000\t0.25000" in table and "\nrank\t" not in table

    digits = ["".join(random.choice("123456789") for _ in range(8)) for _ in range(2)]
    ids = [insert_job({**APPROX, "tags": [unique_tag]}, f"{d}-0000-4000-8000-{secrets.token_hex(6)}") for d in digits]
    for i, job_id in enumerate(ids):
        finish_job(job_id, {"error": 0.25 * (i + 1), "rank": 2, "method": "spectral"})
    page.goto(f"/compare?jobs={','.join(ids)}&{POLL}")
    (bars,) = web.wait_traces("compare-bars", 1)
    assert bars["x"] == digits and bars["y"] == [0.25, 0.5]
    assert page.evaluate("document.getElementById('compare-bars').layout.xaxis.type") == "category"
