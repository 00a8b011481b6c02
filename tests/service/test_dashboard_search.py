"""The sweep page of a search sweep in headless chromium (the fixtures of test_dashboard.py): the complete
trials in the plane of two objectives with the Pareto front highlighted (the API's numbers), parallel
coordinates of the parameters and objectives, the trials table, the CSV downloads, user text escaped in
Plotly's strings; and a single-objective search's "best so far" line.

The search runs on the idle API (no worker takes its jobs); its jobs' results are written through the
store, as a worker would, and told with jobs.search.advance, so every number on screen is known."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from test_dashboard import POLL, browser, context, web  # noqa: F401 - fixtures
from test_search import _search, brute_front, db_jobs

pytestmark = [pytest.mark.service, pytest.mark.browser]

NAMES = ["<b>bold</b> & co", "plain"]  # a free-text spec field as a categorical dimension


def _finished_search(client, finish_job, tag: str, objectives: list, n: int) -> tuple[str, dict]:
    from jobs import search

    space = {"rank": {"type": "int", "low": 1, "high": 16}, "method": {"type": "categorical",
                                                                      "choices": ["spectral", "nkp"]},
             "name": {"type": "categorical", "choices": NAMES}}
    base = {"kind": "approx", "weights": {"source": "gaussian", "m": 32, "d": 16}, "rank": 1, "tags": [tag]}
    r = client.post("/api/v1/sweeps", json={"name": "search page", "base": base, "strategy": "search",
                                            "search": _search(space, objectives, n, n)})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    for j in db_jobs(sid):
        p = j["point"]
        err = 1.0 / (1 + p["rank"]) + (0.02 if p["method"] == "spectral" else 0.0)
        finish_job(j["id"], {"error": err, "rank": p["rank"], "m": 32, "d": 16, "time_s": 0.01 * p["rank"]})
    search.advance(sid)
    return sid, client.get(f"/api/v1/sweeps/{sid}/results").json()


def _plot(page, div: str) -> dict:
    return page.evaluate("""id => { const d = document.getElementById(id);
      return { layout: { x: d.layout.xaxis?.title?.text ?? null, y: d.layout.yaxis?.title?.text ?? null,
                         title: d.layout.title?.text ?? null },
               traces: d.data.map(t => ({ type: t.type, name: t.name, role: t.meta ? t.meta.role : null,
                                          x: t.x ? Array.from(t.x) : null, y: t.y ? Array.from(t.y) : null,
                                          custom: t.customdata ? Array.from(t.customdata) : null,
                                          hovertext: t.hovertext || null,
                                          dims: t.dimensions ? t.dimensions.map(d => ({ label: d.label,
                                            values: Array.from(d.values), ticktext: d.ticktext || null })) : null })) }; }""",
                         div)


@pytest.mark.timeout(120)
def test_search_page_front_parcoords_table_and_csv(web, idle_client, finish_job, unique_tag, tmp_path):
    sid, doc = _finished_search(idle_client, finish_job, unique_tag, [("error", "minimize"), ("params", "minimize")], 8)
    page = web.page
    page.goto(f"/sweeps/{sid}?{POLL}")
    web.wait_traces("plot-front", 2)
    assert page.is_hidden("#grid-results") and page.is_visible("#search-results")
    plot = _plot(page, "plot-front")
    trials, front = plot["traces"]
    assert trials["role"] == "trials" and front["role"] == "front" and front["name"] == "Pareto front"
    values = {r["number"]: r["values"] for r in doc["rows"]}
    # x = params (the second objective), y = error: every complete trial, and the front the API reports,
    # which is the brute-force non-dominated set, joined in order of x.
    assert sorted(zip(trials["custom"], trials["x"], trials["y"])) == sorted(
        (n, v["params"], v["error"]) for n, v in values.items())
    assert set(front["custom"]) == set(doc["front"]) == brute_front(
        {n: [v["error"], v["params"]] for n, v in values.items()}, ["minimize", "minimize"])
    assert front["x"] == sorted(front["x"])
    assert plot["layout"]["x"] == "params \u2193" and plot["layout"]["y"] == "error \u2193"
    hover = " ".join(trials["hovertext"])
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in hover and "<b>bold" not in hover  # escaped for Plotly
    pc = page.evaluate("""() => { const d = document.getElementById('plot-parcoords');
      return { ticktext: d.layout.xaxis.ticktext, notes: d.layout.annotations.map(a => a.text),
               lines: d.data.filter(t => t.meta && t.meta.role === 'trial').map(t => ({ n: t.customdata[0],
                 y: Array.from(t.y), hover: t.hovertext[0] })),
               webgl: document.querySelectorAll('.no-webgl, #plot-parcoords canvas').length }; }""")
    assert pc["webgl"] == 0  # SVG: nothing that needs WebGL (or 'unsafe-eval', which the page's CSP refuses)
    assert pc["ticktext"] == ["method", "name", "rank", "error \u2193", "params \u2193"]
    by_number = {r["number"]: r for r in doc["rows"]}
    assert sorted(line["n"] for line in pc["lines"]) == sorted(values)  # one line per complete trial
    errors = [v["error"] for v in values.values()]
    for line in pc["lines"]:
        r = by_number[line["n"]]
        method, name, rank, err, _ = line["y"]
        assert method == ["spectral", "nkp"].index(r["point"]["method"])
        assert name == NAMES.index(r["point"]["name"])
        assert rank == pytest.approx((r["point"]["rank"] - 1) / 15)
        assert err == pytest.approx((values[line["n"]]["error"] - min(errors)) / (max(errors) - min(errors)))
        assert f"trial {line['n']}<br>" in line["hover"]
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in pc["notes"] and not any("<b>" in t for t in pc["notes"])
    rows = page.eval_on_selector_all("#trials-table tbody tr", "rs => rs.map(r => [r.dataset.trial, "
                                     "r.classList.contains('on-front'), r.cells[3].textContent])")
    assert [int(t) for t, _, _ in rows] == list(range(8))
    assert {int(t) for t, f, _ in rows if f} == set(doc["front"])
    assert {name for _, _, name in rows} <= set(NAMES)  # table cells: text, never HTML
    assert "8 of 8 told" in page.text_content("#search-summary")
    for button, params in (("#trials-csv-button", {"format": "csv"}),
                           ("#front-csv-button", {"format": "csv", "front": "true"})):
        with page.expect_download() as dl:
            page.click(button)
        text = Path(dl.value.path()).read_text()
        assert text == idle_client.get(f"/api/v1/sweeps/{sid}/results", params=params).text
    assert len(list(csv.DictReader(io.StringIO(text)))) == len(doc["front"])
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
    idle_client.post(f"/api/v1/sweeps/{sid}/cancel")


@pytest.mark.timeout(120)
def test_single_objective_search_page_shows_the_best_so_far(web, idle_client, finish_job, unique_tag):
    sid, doc = _finished_search(idle_client, finish_job, unique_tag, [("error", "minimize")], 6)
    page = web.page
    page.goto(f"/sweeps/{sid}?{POLL}")
    web.wait_traces("plot-front", 3)
    trials, best, front = _plot(page, "plot-front")["traces"]
    assert best["role"] == "best" and front["name"] == "best"
    ordered = sorted((r["number"], r["values"]["error"]) for r in doc["rows"])
    assert trials["x"] == [n for n, _ in ordered] and best["x"] == [n for n, _ in ordered]
    running = []
    for _, v in ordered:
        running.append(min(running[-1], v) if running else v)
    assert best["y"] == pytest.approx(running)
    assert front["custom"] == doc["front"] and front["y"] == [min(v for _, v in ordered)] * len(doc["front"])
    idle_client.post(f"/api/v1/sweeps/{sid}/cancel")
