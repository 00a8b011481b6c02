// `/jobs/{id}` of a compress job (job.js hands it over): validation top-1 step by step (dense -> compressed,
// before and after BN re-estimation -> after each fine-tuning epoch), the per-layer table (rank, parameters and
// the held-out block, linear and Gaussian-surrogate errors of MATH.md Section 8), sortable by any column, and a
// per-layer bar chart of the three errors. Layer names are the source model's (an uploaded state_dict's keys):
// they reach the DOM as text nodes and Plotly through LR.plotText.
"use strict";
LR.compress = (() => {
  const { el, fill, num, plotText, color } = LR;
  const ERRORS = [["block_error", "block (empirical)"], ["linear_error", "linear"], ["surrogate_error", "Gaussian surrogate"]];
  let rows = [];
  let sort = { key: "order", dir: 1 };
  let shown = "";

  // The accuracy steps of a result: [label, top-1] in order.
  function steps(r) {
    const out = [["dense", r.top1_dense], ["compressed, BN as trained", r.top1_compressed_before_bn],
                 ["compressed", r.top1_compressed]];
    (r.top1_finetuned || []).forEach((v, i) => out.push(["fine-tuned, epoch " + (i + 1), v]));
    return out;
  }

  function renderSteps(r) {
    const pts = steps(r);
    return LR.plot(document.getElementById("plot-compress-steps"), [{
      x: pts.map(p => p[0]), y: pts.map(p => p[1]), type: "bar", text: pts.map(p => num(p[1], 4)),
      textposition: "outside", marker: { color: pts.map((p, i) => (i === 0 ? "#7f7f7f" : i < 3 ? color(1) : color(2))) },
      hovertemplate: "%{x}<br>top-1 %{y:.4f}<extra></extra>" }], {
      title: { text: "validation top-1, step by step" }, xaxis: { type: "category" },
      yaxis: { title: { text: "top-1" }, range: [0, 1.08] }, margin: { l: 60, r: 20, t: 40, b: 90 } });
  }

  function renderLayerChart() {
    const factored = rows.filter(r => r.status === "factored");
    const names = factored.map(r => plotText(r.layer));
    const traces = ERRORS.map(([key, label], i) => ({
      x: names, y: factored.map(r => r[key]), name: label, type: "bar", marker: { color: color(i) },
      customdata: factored.map(r => r.rank),
      hovertemplate: "%{x}<br>rank %{customdata}<br>" + label + " error %{y:.4g}<extra></extra>" }));
    return LR.plot(document.getElementById("plot-compress-layers"), traces, {
      title: { text: "held-out errors per factored layer (normalized; 0 is exact)" }, barmode: "group",
      xaxis: { type: "category", tickangle: -45, automargin: true }, yaxis: { title: { text: "error" } },
      legend: { orientation: "h", y: 1.08 }, margin: { l: 60, r: 20, t: 60, b: 120 } });
  }

  function value(r, key) {
    if (key === "shape") return r.shape.reduce((a, b) => a * b, 1);
    return r[key];
  }

  function compare(a, b) {
    const x = value(a, sort.key), y = value(b, sort.key);
    if (x === null || x === undefined) return (y === null || y === undefined) ? a.order - b.order : 1;  // gaps last
    if (y === null || y === undefined) return -1;
    const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return c === 0 ? a.order - b.order : sort.dir * c;
  }

  function renderTable() {
    const table = document.getElementById("compress-table");
    for (const th of table.querySelectorAll("th[data-key]")) {
      th.classList.toggle("sorted-asc", th.dataset.key === sort.key && sort.dir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === sort.key && sort.dir < 0);
    }
    fill(table.querySelector("tbody"), rows.slice().sort(compare).map(r => el("tr",
      { class: r.status === "factored" ? null : "unchanged", dataset: { layer: r.layer } },
      el("td", { class: "num" }, r.order + 1),
      el("td", { class: "mono" }, r.layer),
      el("td", null, r.shape.join("\u00d7")),
      el("td", { title: r.reason || "" }, r.status + (r.reason ? " (" + r.reason + ")" : "")),
      el("td", { class: "num rank" }, r.rank === null ? "\u2013" : r.rank),
      el("td", { class: "num" }, num(r.params_dense)),
      el("td", { class: "num" }, num(r.params_compressed)),
      ...ERRORS.map(([key]) => el("td", { class: "num " + key }, num(r[key], 4))))));
  }

  function setup() {
    const table = document.getElementById("compress-table");
    for (const th of table.querySelectorAll("th[data-key]"))
      th.addEventListener("click", () => {
        sort = { key: th.dataset.key, dir: sort.key === th.dataset.key ? -sort.dir : (th.classList.contains("num") ? -1 : 1) };
        renderTable();
      });
    document.getElementById("compress-all").addEventListener("change", ev => table.classList.toggle("all", ev.target.checked));
  }

  // Draw a succeeded compress job's result (once per result).
  async function render(job) {
    const r = job.result;
    if (!r || !r.layers) return;
    const key = job.id + ":" + job.finished_at;
    if (key === shown) return;
    if (!shown) setup();
    shown = key;
    rows = r.layers.map((row, i) => Object.assign({ order: i }, row));
    document.getElementById("compress-section").hidden = false;
    const unchanged = rows.filter(x => x.status !== "factored").length;
    document.getElementById("compress-all-count").textContent = unchanged;
    document.getElementById("compress-all").parentElement.hidden = unchanged === 0;
    const size = r.budget !== null ? "budget " + r.budget + " (" + r.allocation + ")" :
      r.rank !== null ? "rank " + r.rank : "rank ratio " + r.rank_ratio;
    document.getElementById("compress-note").textContent = "(" + r.method + ", " + size + ", refine " + r.refine +
      "; " + num(r.params_dense) + " \u2192 " + num(r.params_compressed) + " parameters, MACs " + num(r.macs_dense) +
      " \u2192 " + num(r.macs_compressed) + "; errors on " + ((r.data || {}).heldout_images ?? "?") + " held-out images)";
    renderTable();
    await renderSteps(r);
    await renderLayerChart();
  }

  return { render, steps };
})();
