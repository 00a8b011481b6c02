// `/sweeps/{id}` of a search sweep (sweep.js hands it over): the complete trials in the plane of two
// objectives with the Pareto front highlighted and joined (one objective: value per trial and the best
// so far), parameters versus objective as parallel coordinates, the trials table, CSV downloads.
// Point values are the user's text: they go into Plotly strings through LR.plotText.
"use strict";
LR.search = (() => {
  const { api, el, fill, num, plotText, statusBadge, jobLink, shortId } = LR;
  const TRIAL = "trial number";
  const controls = { x: document.getElementById("front-x"), y: document.getElementById("front-y") };
  let sweep = null;
  let doc = null;
  let controlsSet = false;

  function objectiveNames() { return doc.objectives.map(o => o.metric); }
  function arrow(o) { return o.metric + (o.direction === "minimize" ? " \u2193" : " \u2191"); }

  function infoRows(sw) {
    const s = sw.search, t = sw.trials;
    return [
      ["search", s.sampler + " sampler (seed " + s.seed + "), " + s.n_trials + " trials, " + s.parallelism + " at once"],
      ["objectives", s.objectives.map(o => o.metric + " " + (o.direction === "minimize" ? "min" : "max")).join(", ")],
      ["trials", t.told + " of " + t.n_trials + " told: " + t.complete + " complete, " + t.pruned + " pruned, " +
                 t.failed + " failed; " + t.running + " running"],
      ...Object.entries(s.space).map(([k, d]) => ["space " + k, d.type === "categorical" ? JSON.stringify(d.choices)
        : d.type + " [" + d.low + ", " + d.high + "]" + (d.log ? " log" : "") + (d.step && d.step !== 1 ? " step " + d.step : "")]),
      ...(s.pruner ? [["pruner", JSON.stringify(s.pruner)]] : []),
    ];
  }

  function setupControls() {
    if (controlsSet) return;
    controlsSet = true;
    const names = objectiveNames();
    const q = LR.params;
    fill(controls.x, [TRIAL, ...names].map(k => el("option", { value: k }, k)));
    fill(controls.y, names.map(k => el("option", { value: k }, k)));
    controls.y.value = names.includes(q.get("fy")) ? q.get("fy") : names[0];
    controls.x.value = [TRIAL, ...names].includes(q.get("fx")) ? q.get("fx") : (names[1] || TRIAL);
    for (const c of [controls.x, controls.y]) c.addEventListener("change", () => {
      const u = new URLSearchParams(location.search);
      u.set("fx", controls.x.value);
      u.set("fy", controls.y.value);
      history.replaceState(null, "", location.pathname + "?" + u.toString());
      renderFront().catch(LR.showError);
    });
  }

  function pointHover(r) {
    const lines = ["trial " + r.number];
    for (const [k, v] of Object.entries(r.point)) lines.push(plotText(k + "=" + (typeof v === "string" ? v : JSON.stringify(v))));
    for (const [k, v] of Object.entries(r.values || {})) lines.push(plotText(k) + " " + num(v, 5));
    return lines.join("<br>");
  }

  function coord(r, key) { return key === TRIAL ? r.number : r.values[key]; }

  async function renderFront() {
    const xKey = controls.x.value, yKey = controls.y.value;
    const complete = doc.rows.filter(r => r.state === "complete");
    const front = complete.filter(r => r.on_front).sort((a, b) => coord(a, xKey) - coord(b, xKey));
    const traces = [{ x: complete.map(r => coord(r, xKey)), y: complete.map(r => coord(r, yKey)), type: "scatter",
                      mode: "markers", name: "trials", marker: { size: 8, color: LR.rgba(LR.color(0), 0.55) },
                      customdata: complete.map(r => r.number), meta: { role: "trials" },
                      hovertext: complete.map(pointHover), hovertemplate: "%{hovertext}<extra></extra>" }];
    if (xKey === TRIAL && objectiveNames().length === 1) {  // one objective: the best value so far
      const sign = doc.objectives[0].direction === "minimize" ? 1 : -1;
      let best = null;
      const sorted = complete.slice().sort((a, b) => a.number - b.number);
      const bestSoFar = sorted.map(r => (best = best === null || sign * r.values[yKey] < sign * best ? r.values[yKey] : best));
      traces.push({ x: sorted.map(r => r.number), y: bestSoFar, type: "scatter", mode: "lines", name: "best so far",
                    line: { color: "#888", shape: "hv", dash: "dot" }, hoverinfo: "skip", meta: { role: "best" } });
    }
    traces.push({ x: front.map(r => coord(r, xKey)), y: front.map(r => coord(r, yKey)), type: "scatter",
                  mode: xKey === TRIAL ? "markers" : "lines+markers",
                  name: objectiveNames().length > 1 ? "Pareto front" : "best", customdata: front.map(r => r.number),
                  marker: { size: 11, color: LR.color(1), symbol: "diamond" }, line: { color: LR.color(1), width: 2 },
                  meta: { role: "front" }, hovertext: front.map(pointHover), hovertemplate: "%{hovertext}<extra></extra>" });
    const other = doc.rows.length - complete.length;
    await LR.plot(document.getElementById("plot-front"), traces, {
      title: { text: plotText(doc.objectives.length > 1 ? "Pareto front of " + objectiveNames().join(", ")
                                                        : "best " + objectiveNames()[0]) +
                     " (" + complete.length + " complete trials" + (other ? ", " + other + " others not shown" : "") + ")" },
      xaxis: { title: { text: plotText(xKey === TRIAL ? TRIAL : arrow(doc.objectives.find(o => o.metric === xKey))) } },
      yaxis: { title: { text: plotText(arrow(doc.objectives.find(o => o.metric === yKey))) } },
      legend: { orientation: "h", y: -0.2 }, margin: { l: 70, r: 20, t: 40, b: 80 },
    });
  }

  // Parallel coordinates: one vertical axis per space key (categorical: its choices, in order; log
  // scales: log10) and per objective, a line per complete trial across them, coloured by the first
  // objective. Drawn as SVG lines: Plotly's parcoords trace renders through regl, which compiles code
  // with new Function, and the dashboard's Content-Security-Policy allows no 'unsafe-eval'.
  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
                   "#b5de2b", "#fde725"];

  function viridis(t) {
    const x = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const a = parseInt(VIRIDIS[i].slice(1), 16), b = parseInt(VIRIDIS[i + 1].slice(1), 16), f = x - i;
    const mix = shift => Math.round(((a >> shift) & 255) * (1 - f) + ((b >> shift) & 255) * f);
    return "rgb(" + mix(16) + "," + mix(8) + "," + mix(0) + ")";
  }

  function axesOf(complete) {
    const space = sweep.search.space;
    const axes = doc.space_keys.map(k => {
      const d = space[k];
      if (d.type === "categorical") {
        const labels = d.choices.map(c => typeof c === "string" ? c : JSON.stringify(c));
        const index = v => labels.indexOf(typeof v === "string" ? v : JSON.stringify(v));
        return { label: k, values: complete.map(r => index(r.point[k])), lo: 0, hi: labels.length - 1,
                 ticks: labels.map((text, i) => [i, text]) };
      }
      const f = d.log ? Math.log10 : (v => v);
      return { label: d.log ? "log10 " + k : k, values: complete.map(r => f(r.point[k])), lo: f(d.low), hi: f(d.high),
               ticks: [[f(d.low), num(d.low)], [f(d.high), num(d.high)]] };
    });
    for (const o of doc.objectives) {
      const vs = complete.map(r => r.values[o.metric]);
      const lo = Math.min(...vs), hi = Math.max(...vs);
      axes.push({ label: arrow(o), values: vs, lo, hi, ticks: [[lo, num(lo, 4)], [hi, num(hi, 4)]] });
    }
    for (const a of axes) a.norm = v => a.hi > a.lo ? (v - a.lo) / (a.hi - a.lo) : 0.5;
    return axes;
  }

  async function renderParcoords() {
    const complete = doc.rows.filter(r => r.state === "complete");
    const axes = axesOf(complete);
    const first = doc.objectives[0];
    const colors = axes[doc.space_keys.length].values;  // the first objective's axis
    const lo = Math.min(...colors), hi = Math.max(...colors);
    const better = v => hi > lo ? (first.direction === "minimize" ? (hi - v) : (v - lo)) / (hi - lo) : 1;
    const xs = axes.map((_, i) => i);
    const traces = complete.map((r, j) => ({
      x: xs, y: axes.map(a => a.norm(a.values[j])), type: "scatter", mode: "lines+markers", showlegend: false,
      line: { color: viridis(better(colors[j])), width: r.on_front ? 3 : 1.5 }, marker: { size: 4 },
      opacity: r.on_front ? 1 : 0.6, name: "trial " + r.number, customdata: xs.map(() => r.number),
      meta: { role: "trial" }, hovertext: xs.map(() => pointHover(r)), hovertemplate: "%{hovertext}<extra></extra>" }));
    traces.push({ x: [null], y: [null], type: "scatter", mode: "markers", showlegend: false, hoverinfo: "skip",
                  meta: { role: "colorbar" },
                  marker: { color: [lo, hi], cmin: lo, cmax: hi, showscale: true, reversescale: first.direction === "minimize",
                            colorscale: VIRIDIS.map((c, i) => [i / (VIRIDIS.length - 1), c]),
                            colorbar: { title: { text: plotText(first.metric) }, thickness: 12 } } });
    const annotations = axes.flatMap((a, i) => a.ticks.map(([v, text]) => ({
      x: i, y: a.norm(v), text: plotText(text), showarrow: false, xanchor: "left", xshift: 4, font: { size: 10 } })));
    await LR.plot(document.getElementById("plot-parcoords"), traces, {
      xaxis: { tickvals: xs, ticktext: axes.map(a => plotText(a.label)), side: "top", range: [-0.2, axes.length - 0.5],
               showgrid: false, zeroline: false },
      yaxis: { range: [-0.06, 1.06], visible: false, fixedrange: true },
      shapes: xs.map(i => ({ type: "line", x0: i, x1: i, y0: 0, y1: 1, line: { color: "#999", width: 1 } })),
      annotations, hovermode: "closest", margin: { l: 30, r: 20, t: 50, b: 20 },
    });
  }

  function cell(v) { return v === null || v === undefined ? "\u2013" : typeof v === "number" ? num(v, 5)
                                                                        : typeof v === "string" ? v : JSON.stringify(v); }

  function renderTable() {
    const names = objectiveNames();
    fill(document.querySelector("#trials-table thead"), [el("tr", null, el("th", { class: "num" }, "trial"),
      el("th", null, "state"), doc.space_keys.map(k => el("th", null, k)), names.map(k => el("th", { class: "num" }, k)),
      el("th", null, "front"), el("th", null, "jobs"), el("th", null, "note"))]);
    fill(document.querySelector("#trials-table tbody"), doc.rows.map(r => el("tr",
      { class: r.on_front ? "on-front" : "", dataset: { trial: r.number, state: r.state } },
      el("td", { class: "num" }, r.number), el("td", null, statusBadge(r.state)),
      doc.space_keys.map(k => el("td", null, cell(r.point[k]))),
      names.map(k => el("td", { class: "num" }, cell((r.values || {})[k]))),
      el("td", null, r.on_front ? "\u2605" : ""),
      el("td", null, r.job_ids.flatMap(id => [jobLink(id), " "])),
      el("td", { class: "muted" }, r.reason || ""))));
  }

  async function render(sw) {
    sweep = sw;
    document.getElementById("grid-results").hidden = true;
    document.getElementById("search-results").hidden = false;
    doc = await api("/api/v1/sweeps/" + sw.id + "/results");
    setupControls();
    document.getElementById("search-summary").textContent = "(" + sw.trials.told + " of " + sw.trials.n_trials +
      " told; " + doc.front.length + " on the " + (doc.objectives.length > 1 ? "front" : "best") + ")";
    renderTable();
    await renderFront();
    await renderParcoords();
  }

  function csv(front) {
    const name = (sweep.name || "sweep-" + shortId(sweep.id)).replace(/[^A-Za-z0-9._-]+/g, "_");
    LR.download("/api/v1/sweeps/" + sweep.id + "/results?format=csv" + (front ? "&front=true" : ""),
                name + (front ? "-front" : "-trials") + ".csv").catch(LR.showError);
  }
  document.getElementById("trials-csv-button").addEventListener("click", () => csv(false));
  document.getElementById("front-csv-button").addEventListener("click", () => csv(true));

  return { render, infoRows };
})();
