// `/jobs/{id}`: status, progress, error, result, live training curves, per-layer init errors, artifacts, spec;
// a compress job's accuracy steps and per-layer table are compress.js's, a latency job's tables and bars latency.js's.
"use strict";
(() => {
  const { api, el, fill, kv, num, bytes, when, duration, statusBadge, setProgress, jobProgress, renderHeader,
          pointText } = LR;
  let jobId = null;
  const MAX_POINTS = 300;  // per series, downsampled by the server
  // Series per plot; a plot shows those the job recorded. `logToggle`: a checkbox for a log y axis
  // (one diverged epoch would flatten every other loss on a linear axis).
  const PLOTS = [
    { div: "plot-loss", title: "loss", names: ["train_loss_step", "train_loss", "val_loss"], ytitle: "loss",
      logToggle: "loss-logy" },
    { div: "plot-accuracy", title: "accuracy", names: ["train_top1", "val_top1", "val_top5"], ytitle: "accuracy" },
    { div: "plot-lr", title: "learning rate", names: ["lr"], ytitle: "lr" },
  ];
  const MAX_EPOCH_TICKS = 12;
  let lastJob = null;
  let lastSeries = null;
  let artifactsShown = "";
  let initShown = false;

  function renderJob(job) {
    renderHeader(job, "job", "job-title", "job-status");
    setProgress(document.getElementById("job-progress"), jobProgress(job));
    document.getElementById("cancel-button").hidden = LR.TERMINAL.has(job.status) || job.cancel_requested;
    document.getElementById("retry-button").hidden = !(job.status === "failed" || job.status === "cancelled");
    const sweepLink = document.getElementById("sweep-link");
    if (job.sweep_id) {
      sweepLink.href = "/sweeps/" + job.sweep_id;
      sweepLink.textContent = "sweep " + job.sweep_id.slice(0, 8) + (job.sweep_point ? ": " + pointText(job.sweep_point) : "");
      sweepLink.hidden = false;
    }
    kv(document.querySelector("#job-info tbody"), [
      ["id", el("span", { class: "mono" }, job.id)],
      ["queue", job.queue + " (" + job.priority + " priority)"],
      ["tags", (job.tags || []).join(", ") || null],
      ["owner", job.owner],
      ["seed", job.seed],
      ["worker", job.worker],
      ["attempts", job.attempts],
      ["progress", job.progress === null ? null : Math.round(100 * job.progress) + "%"],
      ["cancel requested", job.cancel_requested ? "yes" : undefined],
      ["created", when(job.created_at)],
      ["started", when(job.started_at)],
      ["finished", when(job.finished_at)],
      ["duration", duration(job)],
    ]);
    const err = document.getElementById("job-error");
    err.hidden = !job.error;
    err.textContent = job.error || "";
    const warnings = LR.warningsOf(job);
    document.getElementById("job-warnings").hidden = warnings.length === 0;
    fill(document.querySelector("#job-warnings ul"), warnings.map(w => el("li", null, w)));
    document.getElementById("job-spec").textContent = JSON.stringify(job.spec, null, 2);
    renderResult(job.result);
  }

  function renderResult(result) {
    const section = document.getElementById("result-section");
    section.hidden = !result;
    if (!result) return;
    const skip = new Set(["history", "config", "init_report", "init_totals", "info", "warnings", "layers", "calibration",
                          "finetune", "latency", "factorize", "ranks", "kept_dense", "latency_policy"]);
    const pairs = [];
    for (const [k, v] of Object.entries(result)) {
      if (skip.has(k)) continue;
      pairs.push([k, v !== null && typeof v === "object" ? JSON.stringify(v) : (typeof v === "number" ? num(v, 5) : v)]);
    }
    if (result.params_dense && result.params_factored)
      pairs.push(["params factored / dense", num(result.params_factored / result.params_dense, 4)]);
    if (result.info && typeof result.info === "object")
      for (const [k, v] of Object.entries(result.info))
        pairs.push(["info." + k, typeof v === "number" ? num(v, 5) : JSON.stringify(v)]);
    kv(document.querySelector("#result-table tbody"), pairs);
  }

  // Epoch ends (from the epochs the API gives with each series): x stays the step, so step-level and
  // epoch-level points share one axis, and the axis is labelled in epochs at the steps where they end.
  function epochTicks(seriesList) {
    const endStep = new Map();
    for (const s of seriesList) {
      if (!s.epochs || !EPOCH_LEVEL.has(s.name)) continue;
      s.steps.forEach((st, i) => { if (s.epochs[i] !== null) endStep.set(s.epochs[i], Math.max(endStep.get(s.epochs[i]) || 0, st)); });
    }
    const epochs = [...endStep.keys()].sort((a, b) => a - b);
    const every = Math.max(1, Math.ceil(epochs.length / MAX_EPOCH_TICKS));
    const shown = epochs.filter((e, i) => i % every === every - 1 || i === epochs.length - 1);
    return { tickvals: shown.map(e => endStep.get(e)), ticktext: shown.map(e => String(e)) };
  }
  const EPOCH_LEVEL = new Set(["train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "epoch_time_s",
                               "images_per_s"]);

  async function renderCurves() {
    const data = await api("/api/v1/jobs/" + jobId + "/metrics?max_points=" + MAX_POINTS);
    lastSeries = data.series;
    await drawCurves();
  }

  async function drawCurves() {
    const seriesList = lastSeries || [];
    const series = Object.fromEntries(seriesList.map(s => [s.name, s]));
    const section = document.getElementById("curves-section");
    // Only series some plot draws (a compress job's top-1 steps are compress.js's; without fine-tuning it has none).
    section.hidden = !PLOTS.some(spec => spec.names.some(n => series[n]));
    if (section.hidden) return;
    const ticks = epochTicks(seriesList);
    const byEpoch = ticks.tickvals.length > 0;
    const shown = [];
    for (const spec of PLOTS) {
      const present = spec.names.filter(n => series[n]);
      const div = document.getElementById(spec.div);
      div.hidden = present.length === 0;
      if (spec.logToggle) document.getElementById(spec.logToggle).parentElement.hidden = present.length === 0;
      if (!present.length) continue;
      const traces = present.map((name, i) => {
        const s = series[name];
        if (s.downsampled) shown.push(name + ": " + s.steps.length + " of " + s.total + " points");
        const epochLevel = EPOCH_LEVEL.has(name);
        const epochs = s.epochs || s.steps.map(() => null);
        return { x: s.steps, y: s.values, name, type: "scatter", mode: epochLevel || s.steps.length < 30 ? "lines+markers" : "lines",
                 line: { color: LR.PALETTE[i] }, customdata: epochs,
                 hovertemplate: (byEpoch ? "epoch %{customdata}, " : "") + "step %{x}<br>%{y:.5g}<extra>" + name + "</extra>" };
      });
      const logy = spec.logToggle && document.getElementById(spec.logToggle).checked;
      await LR.plot(div, traces, {
        title: { text: spec.title },
        xaxis: byEpoch ? { title: { text: "epoch" }, tickvals: ticks.tickvals, ticktext: ticks.ticktext }
                       : { title: { text: "step" } },
        yaxis: { title: { text: spec.ytitle }, type: logy ? "log" : "linear" } });
    }
    document.getElementById("curves-note").textContent =
      shown.length ? "(downsampled on the server: " + shown.join("; ") + ")" : "";
  }

  async function renderArtifacts() {
    const list = await api("/api/v1/jobs/" + jobId + "/artifacts");
    const key = JSON.stringify(list.map(a => [a.name, a.sha256]));
    if (key === artifactsShown) return list;
    artifactsShown = key;
    document.getElementById("artifacts-section").hidden = list.length === 0;
    fill(document.querySelector("#artifacts-table tbody"), list.map(a => el("tr", null,
      el("td", null, el("a", { href: a.url, class: "artifact",
                               onclick: ev => { ev.preventDefault(); LR.download(a.url, a.name.split("/").pop()).catch(LR.showError); } },
                       a.name)),
      el("td", { class: "num" }, bytes(a.size)),
      el("td", { class: "mono", title: a.sha256 }, a.sha256.slice(0, 16) + "\u2026"),
      el("td", null, when(a.created_at)))));
    return list;
  }

  async function renderInitReport(job, artifacts) {
    if (initShown || !job.result || !job.result.init_report_artifact) return;
    const entry = artifacts.find(a => a.name === job.result.init_report_artifact);
    if (!entry) return;
    const report = await api(entry.url);
    initShown = true;
    const rows = report.layers || [];
    document.getElementById("init-section").hidden = false;
    const method = (job.spec && job.spec.init) || "chosen";
    document.getElementById("init-note").textContent = "(" + method + " init versus spectral init at the same rank; " +
      "normalized function error L(UV)/L(0))";
    // Factored layers first; the layers left unchanged are listed behind the "all layers" toggle.
    const order = { factored: 0, full_rank: 1, skipped: 2 };
    rows.sort((a, b) => (order[a.status] ?? 3) - (order[b.status] ?? 3));
    const unchanged = rows.filter(r => r.status !== "factored").length;
    const toggle = document.getElementById("init-all");
    toggle.parentElement.hidden = unchanged === 0;
    document.getElementById("init-all-count").textContent = unchanged;
    fill(document.querySelector("#init-table tbody"), rows.map(r => {
      const ratio = (r.error !== null && r.spectral_error) ? r.error / r.spectral_error : null;
      const cls = r.status !== "factored" || ratio === null ? "" : (ratio < 1 - 1e-9 ? "better" : (ratio > 1 + 1e-9 ? "worse" : ""));
      return el("tr", { class: cls + (r.status === "factored" ? "" : " unchanged"), dataset: { layer: r.layer } },
        el("td", { class: "mono" }, r.layer),
        el("td", null, r.kind),
        el("td", null, (r.shape || []).join("\u00d7")),
        el("td", null, r.m + "\u00d7" + r.d),
        el("td", { class: "num" }, r.rank),
        el("td", { title: r.reason || "" }, r.status + (r.reason ? " (" + r.reason + ")" : "")),
        el("td", { class: "num chosen" }, num(r.error, 4)),
        el("td", { class: "num spectral" }, num(r.spectral_error, 4)),
        el("td", { class: "num ratio" }, ratio === null ? "\u2013" : num(ratio, 4)),
        el("td", { class: "num" }, num(r.params_dense)),
        el("td", { class: "num" }, num(r.params_factored)),
        el("td", { class: "num" }, num(r.time_s, 3)));
    }));
    const t = report.totals || {};
    fill(document.querySelector("#init-table tfoot"), [el("tr", null,
      el("th", { colspan: 6 }, "mean over " + (t.layers_factored ?? "?") + " factored of " + (t.layers ?? "?") + " layers"),
      el("th", { class: "num" }, num(t.mean_error, 4)),
      el("th", { class: "num" }, num(t.mean_spectral_error, 4)),
      el("th", { class: "num" }, (t.mean_error != null && t.mean_spectral_error) ? num(t.mean_error / t.mean_spectral_error, 4) : "\u2013"),
      el("th", { class: "num" }, num(t.params_dense)),
      el("th", { class: "num" }, num(t.params_factored)),
      el("th", { class: "num" }, num(t.time_s, 3)))]);
  }

  async function action(which) {
    try {
      const job = await api("/api/v1/jobs/" + jobId + "/" + which, { method: "POST" });
      renderJob(job);
      if (which === "retry") location.reload();  // restart polling from the top
    } catch (e) { LR.showError(e); }
  }
  document.getElementById("init-all").addEventListener("change", ev =>
    document.getElementById("init-table").classList.toggle("all", ev.target.checked));
  document.getElementById("loss-logy").addEventListener("change", () => drawCurves().catch(LR.showError));
  document.getElementById("cancel-button").addEventListener("click", () => action("cancel"));
  document.getElementById("retry-button").addEventListener("click", () => action("retry"));

  const documentReady = new Promise(resolve => document.readyState === "loading"
    ? document.addEventListener("DOMContentLoaded", resolve) : resolve());

  // Poll the job (and its metrics) until it is finished, then one last full refresh.
  LR.poll(async () => {
    if (!jobId) jobId = await LR.resolveId("job", LR.pageData.job_id, true);
    const job = await api("/api/v1/jobs/" + jobId);
    const finished = LR.TERMINAL.has(job.status);
    renderJob(job);
    const changed = !lastJob || lastJob.status !== job.status || lastJob.progress !== job.progress;
    if (changed || job.status === "running" || finished) await renderCurves();
    const artifacts = await renderArtifacts();
    await renderInitReport(job, artifacts);
    if (job.kind === "compress" && job.status === "succeeded") {
      await documentReady;  // compress.js (deferred, after this file) has run
      await LR.compress.render(job);
    }
    if (job.kind === "latency" && job.status === "succeeded") {
      await documentReady;  // latency.js (deferred, after this file) has run
      await LR.latency.render(job);
    }
    lastJob = job;
    return !finished;
  });
})();
