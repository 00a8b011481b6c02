// `/sweeps/{id}`: metric versus rank (or another grid key), one line per remaining grid combination
// (e.g. per method), mean over seeds with a band (std or min/max); log toggles; results table; CSV;
// for train sweeps accuracy versus parameters. Updates while the sweep's jobs run.
"use strict";
(() => {
  const { api, el, fill, kv, num, statusBadge, setProgress, shortId, jobLink, jobProgress, renderHeader, pointText,
          resultSummary, duration, color } = LR;
  const sweepId = LR.pageData.sweep_id;
  const METRICS = {
    approx: ["error", "mc_error", "time_s", "iterations"],
    learn: ["error", "nkp_error", "samples", "time_s"],
    train: ["val_top1", "best_val_top1", "val_top5", "val_loss", "train_loss", "wall_time_s", "params_factored"],
  };
  const ACCURACY = "val_top1";
  const controls = {
    metric: document.getElementById("metric-select"),
    x: document.getElementById("x-select"),
    band: document.getElementById("band-select"),
    logy: document.getElementById("logy"),
    logx: document.getElementById("logx"),
  };
  let sweep = null;
  let results = null;
  let tradeoff = null;
  let keysSet = false;

  function gridKeys() { return Object.keys((sweep && sweep.grid) || {}); }

  function setupControls() {
    if (keysSet) return;
    keysSet = true;
    const keys = gridKeys();
    fill(controls.x, keys.map(k => el("option", { value: k }, k)));
    const q = LR.params;
    controls.x.value = keys.includes(q.get("x")) ? q.get("x") : (keys.includes("rank") ? "rank" : keys[0] || "");
    if (["std", "minmax", "none"].includes(q.get("band"))) controls.band.value = q.get("band");
    controls.logy.checked = q.get("logy") === "1";
    controls.logx.checked = q.get("logx") === "1";
    document.getElementById("tradeoff-section").hidden = sweep.kind !== "train";
    setMetricOptions([]);
  }

  // Metric choices: the usual ones for the kind first, then any other numeric result key a
  // succeeded job of this sweep has (offered only once some job reports it: the API 422s otherwise).
  let metricOptions = "";
  function setMetricOptions(jobs) {
    const usual = METRICS[sweep.kind] || ["error"];
    const seen = new Set();
    for (const j of jobs)
      if (j.status === "succeeded" && j.result)
        for (const [k, v] of Object.entries(j.result)) if (typeof v === "number") seen.add(k);
    const names = seen.size ? usual.filter(m => seen.has(m)).concat([...seen].filter(k => !usual.includes(k)).sort())
                            : [usual[0]];
    const key = names.join(",");
    if (key === metricOptions) return;
    metricOptions = key;
    const current = controls.metric.value || LR.params.get("metric");
    fill(controls.metric, names.map(m => el("option", { value: m }, m)));
    controls.metric.value = names.includes(current) ? current : names[0];
  }

  function rememberControls() {
    const q = new URLSearchParams(location.search);
    q.set("metric", controls.metric.value);
    q.set("x", controls.x.value);
    q.set("band", controls.band.value);
    controls.logy.checked ? q.set("logy", "1") : q.delete("logy");
    controls.logx.checked ? q.set("logx", "1") : q.delete("logx");
    history.replaceState(null, "", location.pathname + "?" + q.toString());
  }

  function resultsPath(metric, format) {
    const q = new URLSearchParams({ metric, group_by: gridKeys().join(",") });
    if (format) q.set("format", format);
    return "/api/v1/sweeps/" + sweepId + "/results?" + q.toString();
  }

  function renderSweep() {
    renderHeader(sweep, "sweep", "sweep-title", "sweep-status");
    setProgress(document.getElementById("sweep-progress"), sweep.progress);
    const c = sweep.counts || {};
    document.getElementById("sweep-counts").textContent = ["queued", "running", "succeeded", "failed", "cancelled"]
      .map(k => (c[k] || 0) + " " + k).join(" \u00b7 ") + " of " + sweep.total + " jobs";
    const rows = [["id", sweep.id], ["owner", sweep.owner || "\u2013"], ["created", LR.when(sweep.created_at)],
                  ["seeds", JSON.stringify(sweep.seeds)]];
    for (const [k, v] of Object.entries(sweep.grid || {})) rows.push(["grid " + k, JSON.stringify(v)]);
    if (sweep.early_stopping) rows.push(["early stopping", JSON.stringify(sweep.early_stopping)]);
    kv(document.querySelector("#sweep-info tbody"), rows);
  }

  // Rows grouped into lines: x = the chosen key, a line per combination of the other grid keys.
  function lines(rows, xKey) {
    const others = gridKeys().filter(k => k !== xKey);
    const byLine = new Map();
    for (const row of rows) {
      const label = others.length ? others.map(k => (others.length > 1 ? k + "=" : "") + row.point[k]).join(", ") : "all";
      if (!byLine.has(label)) byLine.set(label, []);
      byLine.get(label).push(row);
    }
    const numericX = rows.every(r => typeof r.point[xKey] === "number");
    for (const pts of byLine.values())
      pts.sort((a, b) => numericX ? a.point[xKey] - b.point[xKey] : String(a.point[xKey]).localeCompare(String(b.point[xKey])));
    return { byLine, numericX };
  }

  function bandOf(row, how, logy) {
    if (row.mean === null || row.mean === undefined) return [null, null];
    let lo, hi;
    if (how === "minmax") { lo = row.min; hi = row.max; }
    else { const s = row.std || 0; lo = row.mean - s; hi = row.mean + s; }
    if (logy && !(lo > 0)) lo = row.min > 0 ? row.min : row.mean;
    return [lo, hi];
  }

  async function renderMetricPlot() {
    if (!results) return;
    const xKey = controls.x.value;
    const how = controls.band.value;
    const logy = controls.logy.checked;
    const { byLine, numericX } = lines(results.rows.filter(r => r.n > 0), xKey);
    const xValues = [...new Set(results.rows.map(r => r.point[xKey]))];
    const traces = [];
    let i = 0;
    for (const [label, pts] of byLine) {
      const lineColor = color(i++);
      const xs = pts.map(r => r.point[xKey]);
      if (how !== "none") {
        const bands = pts.map(r => bandOf(r, how, logy));
        traces.push({ x: xs.concat(xs.slice().reverse()), y: bands.map(b => b[1]).concat(bands.map(b => b[0]).reverse()),
                      type: "scatter", mode: "lines", fill: "toself", fillcolor: LR.rgba(lineColor, 0.18),
                      line: { width: 0, color: lineColor }, hoverinfo: "skip", showlegend: false, name: label + " spread",
                      legendgroup: label, meta: { role: "band" } });
      }
      traces.push({ x: xs, y: pts.map(r => r.mean), type: "scatter", mode: "lines+markers", name: label, legendgroup: label,
                    line: { color: lineColor, width: 2 }, marker: { size: 7 }, meta: { role: "mean" },
                    customdata: pts.map(r => [r.n, r.std, r.min, r.max]),
                    hovertemplate: xKey + "=%{x}<br>mean %{y:.5g}<br>std %{customdata[1]:.3g}, min %{customdata[2]:.5g}, " +
                                   "max %{customdata[3]:.5g}<br>n=%{customdata[0]}<extra>%{fullData.name}</extra>" });
    }
    const spread = how === "std" ? "mean \u00b1 std" : how === "minmax" ? "mean, min\u2013max" : "mean";
    await LR.plot(document.getElementById("plot-metric"), traces, {
      title: { text: results.metric + " versus " + xKey + " (" + spread + " over " + (sweep.seeds || []).length + " seeds)" },
      xaxis: { title: { text: xKey }, type: controls.logx.checked && numericX ? "log" : (numericX ? "linear" : "category"),
               // ticks at the grid's values (ranks 1, 2, 4, 8 rather than 1..8)
               tickvals: numericX && xValues.length <= 24 ? xValues : undefined },
      yaxis: { title: { text: results.metric }, type: logy ? "log" : "linear" },
      legend: { orientation: "h", y: -0.2 }, margin: { l: 60, r: 20, t: 40, b: 80 },
    });
  }

  async function renderTradeoff() {
    if (sweep.kind !== "train" || !tradeoff) return;
    const xKey = controls.x.value;
    const { byLine } = lines(tradeoff.rows.filter(r => r.n > 0 && r.params !== null && r.params !== undefined), xKey);
    const traces = [];
    let i = 0;
    for (const [label, pts] of byLine) {
      const sorted = pts.slice().sort((a, b) => a.params - b.params);
      traces.push({ x: sorted.map(r => r.params), y: sorted.map(r => r.mean), type: "scatter", mode: "lines+markers+text",
                    name: label, text: sorted.map(r => xKey + "=" + r.point[xKey]), textposition: "top center",
                    error_y: { type: "data", array: sorted.map(r => r.std || 0), visible: true },
                    line: { color: color(i++) } });
    }
    await LR.plot(document.getElementById("plot-tradeoff"), traces, {
      title: { text: tradeoff.metric + " versus parameters (mean \u00b1 std over seeds)" },
      xaxis: { title: { text: "parameters (factored model)" }, type: controls.logx.checked ? "log" : "linear" },
      yaxis: { title: { text: tradeoff.metric } },
      legend: { orientation: "h", y: -0.2 }, margin: { l: 60, r: 20, t: 40, b: 80 },
    });
  }

  function renderTable() {
    if (!results) return;
    const keys = gridKeys();
    const hasParams = results.rows.some(r => r.params !== null && r.params !== undefined);
    const head = el("tr", null, keys.map(k => el("th", null, k)),
      ["mean", "std", "min", "max", "n"].map(h => el("th", { class: "num" }, h)),
      hasParams ? el("th", { class: "num" }, "params") : null, el("th", null, "jobs"));
    fill(document.querySelector("#results-table thead"), [head]);
    fill(document.querySelector("#results-table tbody"), results.rows.map(r => el("tr", null,
      keys.map(k => el("td", null, String(r.point[k]))),
      [r.mean, r.std, r.min, r.max].map(v => el("td", { class: "num" }, num(v, 5))),
      el("td", { class: "num" }, r.n),
      hasParams ? el("td", { class: "num" }, num(r.params)) : null,
      el("td", null, (r.job_ids || []).length
        ? el("a", { href: "/compare?jobs=" + r.job_ids.join(",") }, "compare " + r.job_ids.length) : ""))));
  }

  async function renderJobs() {
    const page = await api("/api/v1/jobs?sweep=" + sweepId + "&limit=200");
    const items = page.items.slice().sort((a, b) => (a.sweep_point_index ?? 0) - (b.sweep_point_index ?? 0) || a.seed - b.seed);
    document.getElementById("sweep-jobs-summary").textContent =
      "(" + items.length + (page.next_cursor ? " shown of " + sweep.total : "") + ")";
    fill(document.querySelector("#sweep-jobs tbody"), items.map(j => el("tr", { dataset: { jobId: j.id, status: j.status } },
      el("td", { class: "mono" }, jobLink(j.id)),
      el("td", null, pointText(j.sweep_point)),
      el("td", { class: "num" }, j.seed),
      el("td", null, statusBadge(j.status)),
      el("td", null, LR.progressBar(jobProgress(j))),
      el("td", null, resultSummary(j)),
      el("td", { class: "num" }, duration(j)))));
    return items;
  }

  async function fetchResults() {
    const metric = controls.metric.value;
    results = await api(resultsPath(metric));
    if (sweep.kind === "train")
      tradeoff = metric === ACCURACY ? results : await api(resultsPath(ACCURACY));
  }

  async function redraw() {
    rememberControls();
    renderTable();
    await renderMetricPlot();
    await renderTradeoff();
  }

  controls.metric.addEventListener("change", async () => {
    try { await fetchResults(); await redraw(); } catch (e) { LR.showError(e); }
  });
  for (const c of [controls.x, controls.band, controls.logy, controls.logx])
    c.addEventListener("change", () => redraw().catch(LR.showError));
  document.getElementById("csv-button").addEventListener("click", () => {
    const metric = controls.metric.value;
    const name = (sweep.name || "sweep-" + shortId(sweep.id)).replace(/[^A-Za-z0-9._-]+/g, "_");
    LR.download(resultsPath(metric, "csv"), name + "-" + metric + ".csv").catch(LR.showError);
  });

  LR.poll(async () => {
    sweep = await api("/api/v1/sweeps/" + sweepId);
    setupControls();
    renderSweep();
    const jobs = await renderJobs();
    setMetricOptions(jobs);
    await fetchResults();
    await redraw();
    const c = sweep.counts || {};
    return (c.queued || 0) + (c.running || 0) > 0;
  });
})();
