// `/jobs/{id}` of a latency job (job.js hands it over): the end-to-end table (batch, network, p50, p90, images/s,
// speed-up over dense), per-layer grouped bars of dense against factored p50 at a chosen batch size, with the
// layers whose factored form is slower in their own colour and marked "slower" in the hover and the table, and,
// for a latency-aware job, the layers it kept dense with both times. Layer names reach the DOM as text nodes and
// Plotly through LR.plotText (Plotly renders HTML in text).
"use strict";
LR.latency = (() => {
  const { el, fill, num, plotText, color } = LR;
  const DENSE = "#7f7f7f";
  const FACTORED = color(0);  // blue
  const SLOWER = color(1);  // red: a factored layer slower than its dense original
  let result = null;
  let shown = "";

  function variantLabel(v) {
    return v === "dense" ? "dense" : v === "factored" ? "factored" : v;
  }

  function renderEndToEnd(r) {
    const rows = (r.latency.end_to_end || []).map(e => el("tr",
      { class: e.variant !== "dense" && e.speedup < 1 ? "slower" : null, dataset: { batch: e.batch, variant: e.variant } },
      el("td", { class: "num" }, e.batch),
      el("td", null, variantLabel(e.variant)),
      el("td", { class: "num p50" }, num(e.timing.p50_ms, 4)),
      el("td", { class: "num p90" }, num(e.timing.p90_ms, 4)),
      el("td", { class: "num" }, num(e.throughput, 4)),
      el("td", { class: "num speedup" }, num(e.speedup, 3) + "\u00d7")));
    fill(document.querySelector("#latency-e2e tbody"), rows);
  }

  function layerRows(batch) {
    return ((result.latency.layers || {})[String(batch)] || []);
  }

  function renderLayerChart(batch) {
    const rows = layerRows(batch);
    const names = rows.map(x => plotText(x.layer));
    const marks = rows.map(x => (x.slower ? "slower than dense" : "faster than dense"));
    const custom = rows.map((x, i) => [x.rank, num(x.speedup, 3), marks[i]]);
    const traces = [
      { x: names, y: rows.map(x => x.dense.p50_ms), name: "dense", type: "bar", marker: { color: DENSE },
        customdata: custom, hovertemplate: "%{x}<br>dense p50 %{y:.4g} ms<extra></extra>" },
      { x: names, y: rows.map(x => x.factored.p50_ms), name: "factored", type: "bar",
        marker: { color: rows.map(x => (x.slower ? SLOWER : FACTORED)) }, customdata: custom,
        hovertemplate: "%{x}<br>factored (rank %{customdata[0]}) p50 %{y:.4g} ms<br>speed-up %{customdata[1]}\u00d7: " +
          "%{customdata[2]}<extra></extra>" },
    ];
    const slower = rows.filter(x => x.slower).length;
    return LR.plot(document.getElementById("plot-latency-layers"), traces, {
      title: { text: "p50 per factored layer at batch " + batch + " (" + slower + " of " + rows.length +
               " slower than dense, in red)" },
      barmode: "group", xaxis: { type: "category", tickangle: -45, automargin: true },
      yaxis: { title: { text: "ms (p50)" } }, legend: { orientation: "h", y: 1.08 },
      margin: { l: 60, r: 20, t: 60, b: 120 } });
  }

  function renderLayerTable(batch) {
    fill(document.querySelector("#latency-layers-table tbody"), layerRows(batch).map(x => el("tr",
      { class: x.slower ? "slower" : null, dataset: { layer: x.layer } },
      el("td", { class: "mono" }, x.layer),
      el("td", null, (x.input_shape || []).join("\u00d7")),
      el("td", { class: "num" }, x.rank),
      el("td", { class: "num" }, num(x.dense.p50_ms, 4)),
      el("td", { class: "num" }, num(x.factored.p50_ms, 4)),
      el("td", { class: "num" }, num(x.speedup, 3) + "\u00d7"),
      el("td", { class: "flag" }, x.slower ? "slower" : ""))));
  }

  function renderKept(r) {
    const kept = r.kept_dense;
    const box = document.getElementById("latency-kept");
    box.hidden = !Array.isArray(kept);
    if (box.hidden) return;
    const policy = r.latency_policy || {};
    document.getElementById("latency-kept-note").textContent = "latency-aware (timed at batch " +
      (policy.batch ?? "?") + "): " + kept.length + " layer(s) kept dense";
    fill(box.querySelector("ul"), kept.map(k => el("li", { dataset: { layer: k.layer } },
      el("span", { class: "mono" }, k.layer), ": dense " + num(k.dense_ms, 4) + " ms, factored " +
      num(k.factored_ms, 4) + " ms" + (k.reason ? " (" + k.reason + ")" : ""))));
  }

  async function drawBatch(batch) {
    renderLayerTable(batch);
    await renderLayerChart(batch);
  }

  // Draw a succeeded latency job's result (once per result).
  async function render(job) {
    const r = job.result;
    if (!r || !r.latency) return;
    const key = job.id + ":" + job.finished_at;
    if (key === shown) return;
    shown = key;
    result = r;
    const lat = r.latency;
    document.getElementById("latency-section").hidden = false;
    const how = r.rank ? "rank " + r.rank : r.rank_ratio ? "rank ratio " + r.rank_ratio :
      "the per-layer ranks of compress job " + ((r.source || {}).job || "?");
    document.getElementById("latency-note").textContent = "(" + r.model + " at " + r.image_size + " px, factored at " +
      how + "; " + lat.device + ", " + lat.threads + " CPU thread(s), channels-last " + (lat.channels_last ? "on" : "off") + ")";
    renderEndToEnd(r);
    renderKept(r);
    const batches = Object.keys(lat.layers || {});
    document.getElementById("latency-layers").hidden = batches.length === 0;
    if (!batches.length) return;
    const select = document.getElementById("latency-batch");
    fill(select, batches.map(b => el("option", { value: b }, b)));
    select.onchange = () => drawBatch(select.value).catch(LR.showError);
    await drawBatch(batches[0]);
  }

  return { render };
})();
