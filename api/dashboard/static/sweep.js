// `/sweeps/{id}`: metric versus rank (or another grid key), one line per remaining grid combination
// (e.g. per method), mean over seeds with a band (std or min/max); log toggles (log x by default for
// ranks); results table; CSV; for train sweeps accuracy versus parameters (compress sweeps: each method's points
// and its frontier, the points no other of the method beats with fewer parameters). "relative to" re-plots every
// point against a baseline point (same other grid values, paired by seed) with its 95% interval.
// Updates while the sweep's jobs run. A search sweep's trials, front and parameters are search.js's.
"use strict";
(() => {
  const { api, el, fill, kv, num, statusBadge, setProgress, shortId, jobLink, jobProgress, renderHeader, pointText,
          summaryCell, duration, color, metricTitle, isRankKey, plotText } = LR;
  const METRICS = {
    approx: ["error", "mc_error", "time_s", "iterations"],
    learn: ["error", "nkp_error", "samples", "time_s"],
    train: ["val_top1", "best_val_top1", "val_top5", "val_loss", "train_loss", "wall_time_s", "params_factored"],
    compress: ["val_top1", "top1_compressed", "top1_compressed_before_bn", "top1_dense", "params_compressed",
               "param_ratio", "budget_used", "mean_block_error", "mean_linear_error", "mean_surrogate_error", "run_time_s"],
    latency: ["speedup", "latency_ms", "dense_latency_ms", "slower_layers", "params_factored"],
  };
  const TRADEOFF_KINDS = new Set(["train", "compress"]);
  // Numeric result keys that describe the job rather than measure it: never offered as metrics.
  const NOT_METRICS = new Set(["m", "d", "rank", "eps", "delta", "noise", "mc_samples", "seed", "epochs",
                               "world_size", "resumed_from_epoch", "params_dense", "macs_dense", "budget", "rank_ratio",
                               "num_classes", "budget_requested", "weights_compressible_dense", "layers_compressible",
                               "image_size", "repeats", "layers_factored"]);
  const ACCURACY = "val_top1";
  const controls = {
    metric: document.getElementById("metric-select"),
    x: document.getElementById("x-select"),
    band: document.getElementById("band-select"),
    baseline: document.getElementById("baseline-select"),
    logy: document.getElementById("logy"),
    logx: document.getElementById("logx"),
  };
  let sweepId = null;
  let sweep = null;
  let results = null;
  let tradeoff = null;
  let paired = null;
  let keysSet = false;
  let logxTouched = LR.params.has("logx");  // an explicit choice (URL or click) beats the default

  function gridKeys() { return Object.keys((sweep && sweep.grid) || {}); }
  function numericKey(k) { return (sweep.grid[k] || []).every(v => typeof v === "number"); }

  // Default x axis: a rank key, else any numeric grid key, never a categorical one (init, method)
  // while a numeric one exists.
  function defaultX(keys) {
    const numeric = keys.filter(numericKey);
    return numeric.find(isRankKey) || numeric[0] || keys[0] || "";
  }

  function defaultLogx(key) { return isRankKey(key) && numericKey(key); }

  function setupControls() {
    if (keysSet) return;
    keysSet = true;
    const keys = gridKeys();
    fill(controls.x, keys.map(k => el("option", { value: k }, k)));
    const q = LR.params;
    controls.x.value = keys.includes(q.get("x")) ? q.get("x") : defaultX(keys);
    if (["std", "minmax", "none"].includes(q.get("band"))) controls.band.value = q.get("band");
    controls.logy.checked = q.get("logy") === "1";
    controls.logx.checked = logxTouched ? q.get("logx") === "1" : defaultLogx(controls.x.value);
    const choices = [];
    for (const k of keys)
      if (sweep.grid[k].length > 1)
        for (const v of sweep.grid[k]) choices.push(k + ":" + (typeof v === "string" ? v : JSON.stringify(v)));
    fill(controls.baseline, [el("option", { value: "" }, "(absolute values)"),
                             ...choices.map(c => el("option", { value: c }, c.replace(":", "="))) ]);
    controls.baseline.value = choices.includes(q.get("baseline")) ? q.get("baseline") : "";
    document.getElementById("tradeoff-section").hidden = !TRADEOFF_KINDS.has(sweep.kind);
    setMetricOptions([]);
  }

  // Metric choices: the usual ones for the kind first, then any other numeric result key a succeeded
  // job of this sweep has (offered only once some job reports it: the API 422s otherwise), never a
  // key that echoes the spec (m, d, rank, ...).
  let metricOptions = "";
  function setMetricOptions(jobs) {
    const usual = METRICS[sweep.kind] || ["error"];
    const seen = new Set();
    for (const j of jobs)
      if (j.status === "succeeded" && j.result)
        for (const [k, v] of Object.entries(j.result)) if (typeof v === "number" && !NOT_METRICS.has(k)) seen.add(k);
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
    if (logxTouched) q.set("logx", controls.logx.checked ? "1" : "0"); else q.delete("logx");
    controls.baseline.value ? q.set("baseline", controls.baseline.value) : q.delete("baseline");
    history.replaceState(null, "", location.pathname + "?" + q.toString());
  }

  function resultsPath(metric, format, baseline) {
    const q = new URLSearchParams({ metric, group_by: gridKeys().join(",") });
    if (baseline) q.set("baseline", baseline);
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
    if (sweep.strategy === "search") rows.push(...LR.search.infoRows(sweep));
    for (const [k, v] of Object.entries(sweep.grid || {})) rows.push(["grid " + k, JSON.stringify(v)]);
    if (sweep.early_stopping) rows.push(["early stopping", JSON.stringify(sweep.early_stopping)]);
    kv(document.querySelector("#sweep-info tbody"), rows);
  }

  // Rows grouped into lines: x = the chosen key, a line per combination of the other grid keys,
  // labelled key=value (the legend says what each line is).
  function lines(rows, xKey) {
    const others = gridKeys().filter(k => k !== xKey);
    const byLine = new Map();
    for (const row of rows) {
      const label = others.length ? others.map(k => k + "=" + row.point[k]).join(", ") : "all";
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
    else { const s = row.std || 0; lo = row.mean - s; hi = row.mean + s; }  // n = 1: no std, no band
    if (logy && !(lo > 0)) lo = row.min > 0 ? row.min : row.mean;
    return [lo, hi];
  }

  function xAxis(xKey, numericX, xValues) {
    return { title: { text: plotText(xKey) }, type: controls.logx.checked && numericX ? "log" : (numericX ? "linear" : "category"),
             // ticks at the grid's values (ranks 1, 2, 4, 8 rather than 1..8)
             tickvals: numericX && xValues.length <= 24 ? xValues : undefined };
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
      const xs = pts.map(r => plotText(r.point[xKey]));
      if (how !== "none") {
        const bands = pts.map(r => bandOf(r, how, logy));
        traces.push({ x: xs.concat(xs.slice().reverse()), y: bands.map(b => b[1]).concat(bands.map(b => b[0]).reverse()),
                      type: "scatter", mode: "lines", fill: "toself", fillcolor: LR.rgba(lineColor, 0.18),
                      line: { width: 0, color: lineColor }, hoverinfo: "skip", showlegend: false, name: plotText(label + " spread"),
                      legendgroup: label, meta: { role: "band" } });
      }
      traces.push({ x: xs, y: pts.map(r => r.mean), type: "scatter", mode: "lines+markers", name: plotText(label), legendgroup: label,
                    line: { color: lineColor, width: 2 }, marker: { size: 7 }, meta: { role: "mean" },
                    customdata: pts.map(r => [r.n, r.std, r.min, r.max]),
                    hovertext: pts.map(r => plotText(xKey + "=" + r.point[xKey]) + "<br>mean " + num(r.mean, 5) +
                                            (r.std === null ? " (n = 1: no std)" : "<br>std " + num(r.std, 3)) +
                                            ", min " + num(r.min, 5) + ", max " + num(r.max, 5) + "<br>n=" + r.n),
                    hovertemplate: "%{hovertext}<extra>%{fullData.name}</extra>" });
    }
    const spread = how === "std" ? "mean \u00b1 std" : how === "minmax" ? "mean, min\u2013max" : "mean";
    await LR.plot(document.getElementById("plot-metric"), traces, {
      title: { text: plotText(results.metric + " versus " + xKey) + " (" + spread + " over " + (sweep.seeds || []).length + " seeds)" },
      xaxis: xAxis(xKey, numericX, xValues),
      yaxis: { title: { text: plotText(metricTitle(results.metric)) }, type: logy ? "log" : "linear" },
      legend: { orientation: "h", y: -0.2 }, margin: { l: 60, r: 20, t: 40, b: 80 },
    });
  }

  // The paired comparison: per line (the other grid keys, the compared value included), the estimate
  // (difference, or ratio) with its 95% interval as error bars, and the "no change" line (0 or 1).
  async function renderPairedPlot() {
    const ratio = paired.comparison === "ratio";
    const key = paired.baseline.key;
    const keys = gridKeys();
    let xKey = controls.x.value;
    if (xKey === key && keys.length > 1) xKey = keys.find(k => k !== key && numericKey(k)) || keys.find(k => k !== key);
    const rows = paired.rows.filter(r => r.n > 0);
    const { byLine, numericX } = lines(rows, xKey);
    const xValues = [...new Set(paired.rows.map(r => r.point[xKey]))];
    const traces = [];
    let i = 0;
    for (const [label, pts] of byLine) {
      const est = pts.map(r => ratio ? r.ratio : r.mean);
      const lo = pts.map(r => ratio ? r.ratio_ci_low : r.ci_low);
      const hi = pts.map(r => ratio ? r.ratio_ci_high : r.ci_high);
      traces.push({ x: pts.map(r => plotText(r.point[xKey])), y: est, type: "scatter", mode: "lines+markers", name: plotText(label),
                    line: { color: color(i++), width: 2 }, marker: { size: 7 }, meta: { role: "paired" },
                    error_y: { type: "data", symmetric: false, visible: true,
                               array: hi.map((h, j) => h === null ? null : h - est[j]),
                               arrayminus: lo.map((l, j) => l === null ? null : est[j] - l) },
                    customdata: pts.map(r => [r.n, r.n_unpaired, ratio ? r.ratio_ci_low : r.ci_low,
                                              ratio ? r.ratio_ci_high : r.ci_high]),
                    hovertext: pts.map((r, j) => plotText(xKey + "=" + r.point[xKey]) + "<br>" + (ratio ? "ratio " : "difference ") +
                                       num(est[j], 4) + (lo[j] === null ? " (n = " + r.n + ": no interval)" :
                                       "<br>95% CI [" + num(lo[j], 4) + ", " + num(hi[j], 4) + "]" +
                                       (r.significant ? " *" : "")) + "<br>n=" + r.n +
                                       (r.n_unpaired ? ", " + r.n_unpaired + " unpaired left out" : "")),
                    hovertemplate: "%{hovertext}<extra>%{fullData.name}</extra>" });
    }
    // user text (grid keys and values) escaped for Plotly's HTML subset
    const metric = plotText(paired.metric);
    const base = plotText(key + "=" + paired.baseline.value);
    const logy = controls.logy.checked;
    await LR.plot(document.getElementById("plot-metric"), traces, {
      title: { text: metric + (ratio ? ": ratio to " : ": difference to ") + base +
                     " (paired by seed; mean and 95% CI)" },
      xaxis: xAxis(xKey, numericX, xValues),
      yaxis: { title: { text: ratio ? metric + " / " + metric + " at " + base : metric + " \u2212 " + metric + " at " + base },
               type: ratio && logy ? "log" : "linear" },
      shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: ratio ? 1 : 0, y1: ratio ? 1 : 0,
                 line: { color: "#888", width: 1, dash: "dash" } }],
      legend: { orientation: "h", y: -0.2 }, margin: { l: 70, r: 20, t: 40, b: 80 },
    });
  }

  // Accuracy versus parameters: one line per combination of the keys other than x; the x key's value
  // of each point is in its hover text (labels on the points overlapped).
  async function renderTradeoff() {
    if (!TRADEOFF_KINDS.has(sweep.kind) || !tradeoff) return;
    if (sweep.kind === "compress") return renderFrontiers();
    const xKey = controls.x.value;
    const { byLine } = lines(tradeoff.rows.filter(r => r.n > 0 && r.params !== null && r.params !== undefined), xKey);
    const traces = [];
    let i = 0;
    for (const [label, pts] of byLine) {
      const sorted = pts.slice().sort((a, b) => a.params - b.params);
      traces.push({ x: sorted.map(r => r.params), y: sorted.map(r => r.mean), type: "scatter", mode: "lines+markers",
                    name: plotText(label), marker: { size: 8 },
                    hovertext: sorted.map(r => plotText(xKey + "=" + r.point[xKey]) + "<br>" + num(r.params) + " params<br>" +
                                               plotText(tradeoff.metric) + " " + num(r.mean, 4) +
                                               (r.std === null ? " (n = 1)" : " \u00b1 " + num(r.std, 3) + " (n=" + r.n + ")")),
                    hovertemplate: "%{hovertext}<extra>%{fullData.name}</extra>",
                    error_y: { type: "data", array: sorted.map(r => r.std || 0), visible: true },
                    line: { color: color(i++) } });
    }
    await LR.plot(document.getElementById("plot-tradeoff"), traces, {
      title: { text: plotText(tradeoff.metric + " versus parameters (mean \u00b1 std over seeds; hover for " + xKey + ")") },
      xaxis: { title: { text: "parameters (factored model)" }, type: controls.logx.checked ? "log" : "linear" },
      yaxis: { title: { text: plotText(metricTitle(tradeoff.metric)) } },
      legend: { orientation: "h", y: -0.2 }, margin: { l: 60, r: 20, t: 40, b: 80 },
    });
  }

  // The points of `pts` (grid rows with params and a mean) that no other point beats: fewer or equal parameters
  // and a higher or equal mean, one of them strictly. Sorted by parameters: the mean rises along it.
  function frontier(pts) {
    return pts.filter(p => !pts.some(q => q !== p && q.params <= p.params && q.mean >= p.mean &&
                                          (q.params < p.params || q.mean > p.mean)))
      .sort((a, b) => a.params - b.params);
  }

  LR.frontier = frontier;  // tests/service/test_compress_service.py checks it on rows of its own

  // Compress sweeps: accuracy versus the compressed model's parameters, a colour per method (the grid's
  // `method`, else one group), every grid point as a marker and the method's frontier as a line.
  async function renderFrontiers() {
    const rows = tradeoff.rows.filter(r => r.n > 0 && r.params !== null && r.params !== undefined && r.mean !== null);
    const byMethod = new Map();
    for (const r of rows) {
      const m = r.point.method !== undefined ? String(r.point.method) : (sweep.base.method || "all");
      if (!byMethod.has(m)) byMethod.set(m, []);
      byMethod.get(m).push(r);
    }
    const hover = r => plotText(pointText(r.point)) + "<br>" + num(r.params) + " params<br>" + plotText(tradeoff.metric) +
      " " + num(r.mean, 4) + (r.std === null ? " (n = 1)" : " \u00b1 " + num(r.std, 3) + " (n=" + r.n + ")");
    const traces = [];
    let i = 0;
    for (const [method, pts] of byMethod) {
      const c = color(i++), front = frontier(pts);
      traces.push({ x: pts.map(r => r.params), y: pts.map(r => r.mean), type: "scatter", mode: "markers",
                    name: plotText(method + " (points)"), legendgroup: plotText(method), showlegend: false,
                    marker: { size: 8, color: LR.rgba(c, 0.45) }, meta: { role: "points", method },
                    hovertext: pts.map(hover), hovertemplate: "%{hovertext}<extra>" + plotText(method) + "</extra>" });
      traces.push({ x: front.map(r => r.params), y: front.map(r => r.mean), type: "scatter", mode: "lines+markers",
                    name: plotText(method), legendgroup: plotText(method), meta: { role: "frontier", method },
                    marker: { size: 9, color: c }, line: { color: c },
                    error_y: { type: "data", array: front.map(r => r.std || 0), visible: true },
                    hovertext: front.map(hover), hovertemplate: "%{hovertext}<extra>" + plotText(method) + " frontier</extra>" });
    }
    await LR.plot(document.getElementById("plot-tradeoff"), traces, {
      title: { text: plotText(tradeoff.metric + " versus parameters: every point, and each method's frontier") },
      xaxis: { title: { text: "parameters (compressed model)" }, type: controls.logx.checked ? "log" : "linear" },
      yaxis: { title: { text: plotText(metricTitle(tradeoff.metric)) } },
      legend: { orientation: "h", y: -0.2 }, margin: { l: 60, r: 20, t: 40, b: 80 },
    });
  }

  // A group's parameter count: one size, or its range when the group pools points of different sizes.
  function paramsText(r) {
    if (r.params !== null && r.params !== undefined) return num(r.params);
    if (r.params_min !== null && r.params_min !== undefined) return num(r.params_min) + "\u2013" + num(r.params_max);
    return "\u2013";
  }

  function renderTable() {
    if (!results) return;
    const keys = gridKeys();
    const hasParams = results.rows.some(r => r.params_min !== null && r.params_min !== undefined);
    const head = el("tr", null, keys.map(k => el("th", null, k)),
      ["mean", "std", "min", "max", "n"].map(h => el("th", { class: "num" }, h)),
      hasParams ? el("th", { class: "num" }, "params") : null, el("th", null, "jobs"));
    fill(document.querySelector("#results-table thead"), [head]);
    fill(document.querySelector("#results-table tbody"), results.rows.map(r => el("tr", null,
      keys.map(k => el("td", null, String(r.point[k]))),
      [r.mean, r.std, r.min, r.max].map(v => el("td", { class: "num" }, num(v, 5))),
      el("td", { class: "num" }, r.n),
      hasParams ? el("td", { class: "num params" }, paramsText(r)) : null,
      el("td", null, (r.job_ids || []).length
        ? el("a", { href: "/compare?jobs=" + r.job_ids.join(",") }, "compare " + r.job_ids.length) : ""))));
  }

  function renderPairedTable() {
    const section = document.getElementById("paired-section");
    section.hidden = !paired;
    if (!paired) return;
    const ratio = paired.comparison === "ratio";
    const base = paired.baseline.key + "=" + paired.baseline.value;
    document.getElementById("paired-note").textContent = "(" + paired.metric + " of each point " +
      (ratio ? "divided by" : "minus") + " that of its " + base + " partner with the same other grid values, " +
      "paired by seed; " + (ratio ? "geometric mean ratio, 95% CI from Student t on the log ratios" :
                                    "mean difference, 95% CI from Student t") + "; * = the CI excludes " +
      (ratio ? "1" : "0") + ")";
    const keys = gridKeys();
    fill(document.querySelector("#paired-table thead"), [el("tr", null, keys.map(k => el("th", null, k)),
      ["n", "unpaired", ratio ? "ratio" : "difference", "95% CI", "std" + (ratio ? " (log)" : ""), "mean",
       "baseline mean"].map(h => el("th", { class: "num" }, h)), el("th", null, "jobs"))]);
    fill(document.querySelector("#paired-table tbody"), paired.rows.map(r => {
      const est = ratio ? r.ratio : r.mean;
      const lo = ratio ? r.ratio_ci_low : r.ci_low, hi = ratio ? r.ratio_ci_high : r.ci_high;
      return el("tr", { class: r.significant ? "significant" : "" },
        keys.map(k => el("td", null, String(r.point[k]))),
        el("td", { class: "num n" }, r.n),
        el("td", { class: "num" }, r.n_unpaired + r.n_nonpositive),
        el("td", { class: "num estimate" }, num(est, 4)),
        el("td", { class: "num ci", title: r.note || "" }, lo === null ? (r.note ? "\u2013 (" + r.note.split(":")[0] + ")" : "\u2013")
                                                        : "[" + num(lo, 4) + ", " + num(hi, 4) + "]" + (r.significant ? " *" : "")),
        el("td", { class: "num" }, num(r.std, 3)),
        el("td", { class: "num" }, num(r.point_mean, 5)),
        el("td", { class: "num" }, num(r.baseline_mean, 5)),
        el("td", null, r.job_ids.length ? el("a", { href: "/compare?jobs=" + r.job_ids.concat(r.baseline_job_ids).join(",") },
                                               "compare " + 2 * r.job_ids.length) : ""));
    }));
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
      el("td", null, summaryCell(j)),
      el("td", { class: "num" }, duration(j)))));
    return items;
  }

  async function fetchResults() {
    const metric = controls.metric.value;
    results = await api(resultsPath(metric));
    if (TRADEOFF_KINDS.has(sweep.kind))
      tradeoff = metric === ACCURACY ? results : await api(resultsPath(ACCURACY));
    paired = controls.baseline.value ? await api(resultsPath(metric, null, controls.baseline.value)) : null;
  }

  async function redraw() {
    rememberControls();
    renderTable();
    renderPairedTable();
    if (paired) await renderPairedPlot(); else await renderMetricPlot();
    await renderTradeoff();
  }

  for (const c of [controls.metric, controls.baseline])
    c.addEventListener("change", async () => {
      try { await fetchResults(); await redraw(); } catch (e) { LR.showError(e); }
    });
  controls.x.addEventListener("change", () => {
    if (!logxTouched) controls.logx.checked = defaultLogx(controls.x.value);
    redraw().catch(LR.showError);
  });
  controls.logx.addEventListener("change", () => { logxTouched = true; redraw().catch(LR.showError); });
  for (const c of [controls.band, controls.logy])
    c.addEventListener("change", () => redraw().catch(LR.showError));
  document.getElementById("csv-button").addEventListener("click", () => {
    const metric = controls.metric.value;
    const baseline = controls.baseline.value;
    const name = (sweep.name || "sweep-" + shortId(sweep.id)).replace(/[^A-Za-z0-9._-]+/g, "_");
    const suffix = baseline ? "-vs-" + baseline.replace(/[^A-Za-z0-9._-]+/g, "_") : "";
    LR.download(resultsPath(metric, "csv", baseline), name + "-" + metric + suffix + ".csv").catch(LR.showError);
  });

  // search.js (loaded after this file, both deferred) has run once the document is parsed.
  const documentReady = new Promise(resolve => document.readyState === "loading"
    ? document.addEventListener("DOMContentLoaded", resolve) : resolve());

  LR.poll(async () => {
    if (!sweepId) sweepId = await LR.resolveId("sweep", LR.pageData.sweep_id, true);
    sweep = await api("/api/v1/sweeps/" + sweepId);
    if (sweep.strategy === "search") {
      await documentReady;
      renderSweep();
      await renderJobs();
      await LR.search.render(sweep);
      return sweep.status === "queued" || sweep.status === "running";
    }
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
