"""Plotly markup injection (issue 18, defect 4), in a real headless chromium against the live stack.

The probe: a job name `<a href="https://evil.example/">CLICK</a>` became a live link on /compare (bar
labels) and, as a grid value, in the /sweeps/{id} legend; `<b style=...>` was styled: Plotly draws a
subset of HTML in every text. The pages now pass user text through LR.plotText (common.js), so it
shows literally and nothing of it becomes an element. Fixtures: tests/service/test_dashboard.py.
"""
from __future__ import annotations

import pytest
from test_dashboard import POLL, browser, context, wait_sweep, web  # noqa: F401 - fixtures (same folder)

pytestmark = [pytest.mark.service, pytest.mark.browser]

LINK = '<a href="https://evil.example/">CLICK</a>'
STYLED = '<b style="color:#c0ffee">BOLD</b> & <i>more</i>'
APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 48, "d": 32}, "rank": 2, "method": "spectral"}

# Whatever of the markup became a node: links (any *href attribute), styled text, bold/italic tspans.
INJECTED_JS = """root => { const out = [];
  for (const e of document.querySelectorAll(root + ' *')) {
    for (const a of e.attributes) {
      if (a.name.endsWith('href') && a.value.includes('evil')) out.push(e.tagName + ' ' + a.name + '=' + a.value);
      if (a.name === 'style' && /c0ffee|font-weight: ?bold|font-style: ?italic/.test(a.value))
        out.push(e.tagName + ' style=' + a.value);
    }
    if (e.tagName.toLowerCase() === 'a' && e.closest('svg')) out.push('a in svg: ' + e.textContent);
  }
  return out; }"""


def texts(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")


@pytest.mark.timeout(180)
def test_grid_values_show_literally_on_the_sweep_page(web, client, worker_process):
    body = {"name": "inject", "base": APPROX, "grid": {"name": [LINK, STYLED], "rank": [1, 2]}, "seeds": [0]}
    r = client.post("/api/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sweep = wait_sweep(client, r.json()["id"])
    assert sweep["counts"]["succeeded"] == 4, sweep["counts"]
    page = web.page
    page.goto(f"/sweeps/{sweep['id']}?{POLL}")
    web.wait_traces("plot-metric", 4)  # a mean line and a band per name
    page.wait_for_selector("#plot-metric .legendtext")
    assert sorted(texts(page, "#plot-metric .legendtext")) == sorted([f"name={LINK}", f"name={STYLED}"])
    cells = texts(page, "#results-table tbody td")
    assert LINK in cells and STYLED in cells
    assert all(a.startswith("compare ") for a in texts(page, "#results-table a"))
    assert page.evaluate(INJECTED_JS, "body") == []
    # The names on the x axis (a category axis): tick labels read as typed, still nothing live.
    page.goto(f"/sweeps/{sweep['id']}?x=name&{POLL}")
    web.wait_traces("plot-metric", 4)
    page.wait_for_function("() => document.querySelectorAll('#plot-metric .xtick text').length === 2")
    assert sorted(texts(page, "#plot-metric .xtick text")) == sorted([LINK, STYLED])
    assert page.evaluate(INJECTED_JS, "body") == []


@pytest.mark.timeout(120)
def test_job_names_show_literally_on_compare(web, client, worker_process, wait_job):
    jobs = [wait_job(client, client.post("/api/v1/jobs", json={**APPROX, "name": name}).json()["id"])
            for name in (LINK, STYLED)]
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    labels = [f"{j['name']} ({j['id'][:8]})" for j in jobs]
    page = web.page
    page.goto(f"/compare?jobs={jobs[0]['id']},{jobs[1]['id']}&{POLL}")
    web.wait_traces("compare-bars", 1)
    page.wait_for_function("() => document.querySelectorAll('#compare-bars .xtick text').length === 2")
    assert sorted(texts(page, "#compare-bars .xtick text")) == sorted(labels)
    # The table's column heads link to the jobs' pages, with the names as text.
    heads = page.eval_on_selector_all("#compare-table thead a", "els => els.map(e => [e.textContent, e.getAttribute('href')])")
    assert sorted(heads) == sorted([label, f"/jobs/{j['id']}"] for label, j in zip(labels, jobs))
    assert page.evaluate(INJECTED_JS, "body") == []
