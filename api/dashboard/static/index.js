// `/`: sweeps and jobs with live status, filters (kept in the URL), selection for /compare.
"use strict";
(() => {
  const { api, el, fill, num, when, duration, statusBadge, progressBar, shortId, jobLink, jobProgress, pointText,
          summaryCell } = LR;
  const form = document.getElementById("filters");
  const selected = new Set();
  const FILTERS = ["status", "kind", "tag", "owner", "sweep", "limit"];

  // Filters from the URL into the form.
  for (const name of FILTERS) {
    const v = LR.params.get(name);
    if (v !== null) form.elements[name].value = v;
  }

  function query() {
    const q = new URLSearchParams();
    for (const name of FILTERS) {
      const v = form.elements[name].value.trim();
      if (v) q.set(name, v);
    }
    if (!q.has("limit")) q.set("limit", "50");
    return q;
  }

  const compareButton = document.getElementById("compare-button");
  function updateCompare() {
    compareButton.textContent = "compare selected (" + selected.size + ")";
    compareButton.disabled = selected.size < 1;
  }
  compareButton.addEventListener("click", () => {
    location.href = "/compare?jobs=" + [...selected].join(",");
  });

  function jobRow(job) {
    const box = el("input", { type: "checkbox", class: "select", "aria-label": "select " + job.id,
                              onchange: ev => { ev.target.checked ? selected.add(job.id) : selected.delete(job.id);
                                                updateCompare(); } });
    box.checked = selected.has(job.id);
    return el("tr", { dataset: { jobId: job.id, status: job.status } },
      el("td", null, box),
      el("td", { class: "mono" }, jobLink(job.id)),
      el("td", null, job.name || ""),
      el("td", null, job.kind),
      el("td", null, statusBadge(job.status, { class: "status " + job.status + " job-status" })),
      el("td", null, progressBar(jobProgress(job))),
      el("td", { class: "summary" }, summaryCell(job)),
      el("td", null, job.sweep_id ? el("a", { href: "/sweeps/" + job.sweep_id }, pointText(job.sweep_point) || shortId(job.sweep_id)) : ""),
      el("td", null, (job.tags || []).join(", ")),
      el("td", null, job.owner || ""),
      el("td", null, when(job.created_at)),
      el("td", { class: "num" }, duration(job)));
  }

  // Pages, newest first: "older" follows the API's next_cursor, "newer" walks back through the
  // cursors already seen. Polling refreshes the page shown (on the first page new jobs appear on top).
  const newer = [];          // cursors of the pages before the one shown (null: the first page)
  let cursor = null;         // the shown page's cursor (null: the newest jobs)
  let nextCursor = null;
  let request = 0;           // only the latest request may fill the table (a poll may overtake a click)
  const olderButton = document.getElementById("jobs-older");
  const newerButton = document.getElementById("jobs-newer");
  function goTo(c) { cursor = c; refreshJobs().catch(LR.showError); }
  olderButton.addEventListener("click", () => { if (nextCursor) { newer.push(cursor); goTo(nextCursor); } });
  newerButton.addEventListener("click", () => { if (newer.length) goTo(newer.pop()); });

  async function refreshJobs() {
    const q = query();
    if (cursor) q.set("cursor", cursor);
    const mine = ++request;
    const page = await api("/api/v1/jobs?" + q.toString());
    if (mine !== request) return;
    nextCursor = page.next_cursor;
    olderButton.disabled = !nextCursor;
    newerButton.disabled = newer.length === 0;
    fill(document.querySelector("#jobs-table tbody"), page.items.map(jobRow));
    document.getElementById("jobs-empty").hidden = page.items.length > 0;
    const counts = {};
    for (const j of page.items) counts[j.status] = (counts[j.status] || 0) + 1;
    document.getElementById("jobs-summary").textContent =
      page.items.length + " shown" + (newer.length ? " (page " + (newer.length + 1) + ")" : "") +
      (page.next_cursor ? " (older jobs on the next page)" : "") +
      (page.items.length ? ": " + Object.entries(counts).map(([k, v]) => v + " " + k).join(", ") : "");
  }

  let sweepsAvailable = true;
  async function refreshSweeps() {
    if (!sweepsAvailable) return;
    let sweeps;
    try {
      sweeps = await api("/api/v1/sweeps?limit=20");
    } catch (e) {
      if (e.status === 404 || e.status === 405) { sweepsAvailable = false; return; }  // server without sweeps
      throw e;
    }
    const items = sweeps.items;
    document.getElementById("sweeps-section").hidden = items.length === 0;
    fill(document.querySelector("#sweeps-table tbody"), items.map(s => el("tr", { dataset: { sweepId: s.id } },
      el("td", null, el("a", { href: "/sweeps/" + s.id }, s.name || shortId(s.id))),
      el("td", null, s.kind || ""),
      el("td", null, statusBadge(s.status)),
      el("td", null, progressBar(s.progress)),
      el("td", null, Object.entries(s.counts || {}).filter(([, v]) => v).map(([k, v]) => v + " " + k).join(", ")
                     + " of " + (s.total ?? "?")),
      el("td", null, s.owner || ""),
      el("td", null, when(s.created_at)))));
  }

  form.addEventListener("submit", ev => {
    ev.preventDefault();
    const q = query();
    if (LR.params.get("poll")) q.set("poll", LR.params.get("poll"));
    history.replaceState(null, "", "/?" + q.toString());
    newer.length = 0;
    goTo(null);
  });

  updateCompare();
  // The index never stops polling: new jobs appear and statuses change while it is open.
  LR.poll(async () => { await Promise.all([refreshJobs(), refreshSweeps()]); return true; });
})();
