// `/compare?jobs=a,b,...`: one plot per metric series, one trace per job; a table and a bar chart of results.
// Jobs are labelled by what differs between their specs (init=nkp, rank_ratio=0.25), not by id.
"use strict";
(() => {
  const { api, el, fill, num, statusBadge, shortId, pointText, color, plotText } = LR;
  const refs = LR.pageData.job_ids || [];  // ids or unique prefixes
  let ids = null;
  // Spec fields that name or file a job rather than define it.
  const NOT_IN_LABEL = new Set(["name", "tags", "priority"]);
  const MAX_LABEL_KEYS = 4;
  let labels = new Map();
  const MAX_POINTS = 300;
  const ORDER = ["train_loss_step", "train_loss", "val_loss", "train_top1", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s"];
  const SKIP = new Set(["epoch"]);
  const ROWS = ["kind", "status", "sweep point", "seed", "error", "val_top1", "best_val_top1", "val_loss",
                "params_factored", "params_dense", "rank", "rank_ratio", "method", "init", "time_s", "wall_time_s"];
  let barKey = null;

  // A spec as {dotted.path: JSON text} of its leaves.
  function flatten(obj, prefix, out) {
    for (const [k, v] of Object.entries(obj || {})) {
      const key = prefix ? prefix + "." + k : k;
      if (v !== null && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
      else out[key] = JSON.stringify(v);
    }
    return out;
  }

  // Each job's label: the spec fields whose values differ between the jobs (seed included), as
  // key=value; when nothing differs, the job's name (what its owner told them apart by) and short id;
  // the short id is added when two labels would be the same.
  function makeLabels(jobs) {
    const flat = jobs.map(j => flatten(Object.assign({}, j.spec, { seed: j.seed }), "", {}));
    const keys = [...new Set(flat.flatMap(f => Object.keys(f)))].filter(k => !NOT_IN_LABEL.has(k.split(".")[0]))
      .filter(k => new Set(flat.map(f => f[k])).size > 1).sort();
    const texts = flat.map(f => {
      const parts = keys.slice(0, MAX_LABEL_KEYS).map(k => k + "=" + (f[k] === undefined ? "\u2013" : f[k].replace(/^"|"$/g, "")));
      return parts.join(", ") + (keys.length > MAX_LABEL_KEYS ? ", \u2026" : "");
    });
    const counts = texts.reduce((m, t) => m.set(t, (m.get(t) || 0) + 1), new Map());
    labels = new Map(jobs.map((j, i) => [j.id, texts[i] && counts.get(texts[i]) === 1 ? texts[i]
                                                   : (texts[i] ? texts[i] + " (" + shortId(j.id) + ")"
                                                      : j.name ? j.name + " (" + shortId(j.id) + ")" : shortId(j.id))]));
  }

  function label(job) { return labels.get(job.id) || shortId(job.id); }

  function cell(job, row) {
    const r = job.result || {};
    const s = job.spec || {};
    switch (row) {
      case "kind": return job.kind;
      case "status": return statusBadge(job.status);
      case "sweep point": return pointText(job.sweep_point);
      case "seed": return job.seed;
      case "rank": return r.rank ?? s.rank;  // a rank, never a ratio: rank_ratio has its own row
      case "rank_ratio": return s.rank_ratio;
      case "method": return r.method ?? s.method;
      case "init": return s.init;
      default: return r[row];
    }
  }

  function renderTable(jobs) {
    const head = el("tr", null, el("th", null, "job"), jobs.map(j => el("th", null,
      el("a", { href: "/jobs/" + j.id, title: j.id }, label(j)), el("div", { class: "muted mono" }, shortId(j.id)))));
    fill(document.querySelector("#compare-table thead"), [head]);
    const rows = ROWS.filter(row => jobs.some(j => { const v = cell(j, row); return v !== undefined && v !== null && v !== ""; }))
      .map(row => el("tr", null, el("th", null, row), jobs.map(j => {
        const v = cell(j, row);
        return el("td", { class: typeof v === "number" ? "num" : "" }, v instanceof Node ? v : (typeof v === "number" ? num(v, 5) : (v ?? "\u2013")));
      })));
    fill(document.querySelector("#compare-table tbody"), rows);
  }

  async function renderCurves(jobs) {
    const metrics = await Promise.all(jobs.map(j => api("/api/v1/jobs/" + j.id + "/metrics?max_points=" + MAX_POINTS)));
    const names = new Set();
    metrics.forEach(m => m.series.forEach(s => { if (!SKIP.has(s.name)) names.add(s.name); }));
    const ordered = [...names].sort((a, b) => {
      const ia = ORDER.indexOf(a), ib = ORDER.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
    });
    document.getElementById("compare-empty").hidden = ordered.length > 0;
    const container = document.getElementById("compare-plots");
    // One div per metric, kept across refreshes (Plotly.react updates in place).
    const wanted = new Set(ordered.map(n => "cmp-" + n));
    for (const div of [...container.children]) if (!wanted.has(div.id)) div.remove();
    // Every div in place before the first plot: a div plotted while alone in the grid would keep
    // the full row's width after its siblings arrive.
    for (const name of ordered)
      if (!document.getElementById("cmp-" + name))
        container.append(el("div", { id: "cmp-" + name, class: "plot", dataset: { metric: name } }));
    for (const name of ordered) {
      const div = document.getElementById("cmp-" + name);
      const traces = [];
      jobs.forEach((job, i) => {
        const s = metrics[i].series.find(x => x.name === name);
        if (!s) return;
        traces.push({ x: s.steps, y: s.values, name: plotText(label(job)), type: "scatter",
                      mode: s.steps.length < 30 ? "lines+markers" : "lines", line: { color: color(i) } });
      });
      await LR.plot(div, traces, { title: { text: plotText(name) }, xaxis: { title: { text: "step" } } });
    }
  }

  function renderBars(jobs) {
    const keys = ["error", "val_top1", "best_val_top1", "val_loss", "mc_error", "nkp_error", "params_factored", "time_s", "wall_time_s"]
      .filter(k => jobs.some(j => j.result && typeof j.result[k] === "number"));
    document.getElementById("compare-bars-section").hidden = keys.length === 0;
    if (!keys.length) return;
    const select = document.getElementById("compare-bar-key");
    if (select.options.length !== keys.length) {
      fill(select, keys.map(k => el("option", { value: k }, k)));
      if (barKey && keys.includes(barKey)) select.value = barKey;
    }
    barKey = select.value || keys[0];
    const trace = { type: "bar", x: jobs.map(j => plotText(label(j))), y: jobs.map(j => (j.result || {})[barKey] ?? null),
                    marker: { color: jobs.map((_, i) => color(i)) }, name: barKey };
    // A categorical axis: labels such as short ids made only of digits must not become numbers.
    return LR.plot(document.getElementById("compare-bars"), [trace], { title: { text: plotText(barKey) }, showlegend: false,
                                                                       xaxis: { type: "category" } });
  }

  let lastJobs = [];
  document.getElementById("compare-bar-key").addEventListener("change", () => renderBars(lastJobs));
  document.getElementById("compare-count").textContent = "(" + refs.length + " jobs)";

  LR.poll(async () => {
    if (!ids) ids = await Promise.all(refs.map(ref => LR.resolveId("job", ref, false)));
    const jobs = await Promise.all(ids.map(id => api("/api/v1/jobs/" + id)));
    makeLabels(jobs);
    lastJobs = jobs;
    renderTable(jobs);
    await renderCurves(jobs);
    await renderBars(jobs);
    return jobs.some(j => !LR.TERMINAL.has(j.status));
  });
})();
