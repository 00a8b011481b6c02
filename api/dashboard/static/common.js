// Shared helpers of every dashboard page: API calls with the stored token, the token prompt,
// polling, DOM building (text only: user data never goes through innerHTML), formatting, plots.
"use strict";

const LR = (() => {
  const TOKEN_KEY = "lowrank.token";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const params = new URLSearchParams(location.search);
  // ?poll=<ms> overrides the refresh interval (tests use a short one); never below 200 ms.
  const POLL_MS = Math.max(200, Number(params.get("poll")) || 2000);
  const pageData = JSON.parse(document.body.dataset.pageData || "{}");

  class ApiError extends Error {
    constructor(status, message, body) { super(message); this.status = status; this.body = body; }
  }

  function getToken() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    const t = getToken();
    if (t) h["Authorization"] = "Bearer " + t;
    return h;
  }

  function detailText(body, status) {
    if (!body) return "HTTP " + status;
    const d = body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map(e => (e.loc || []).join(".") + ": " + e.msg).join("; ");
    return "HTTP " + status;
  }

  // fetch() with the token; 401 opens the token prompt. Returns parsed JSON, or the Response with {raw: true}.
  async function api(path, opts) {
    opts = opts || {};
    const init = { method: opts.method || "GET", headers: authHeaders({ Accept: "application/json" }) };
    if (opts.body !== undefined) {
      init.body = JSON.stringify(opts.body);
      init.headers["Content-Type"] = "application/json";
    }
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "cannot reach the API: " + e.message, null);
    }
    if (r.status === 401) {
      let body = null;
      try { body = await r.json(); } catch (e) { /* not JSON */ }
      showTokenPrompt(getToken() ? "The stored token was refused: " + detailText(body, 401)
                                 : "This server requires an API token.");
      throw new ApiError(401, "authentication required", body);
    }
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (e) { /* not JSON */ }
      throw new ApiError(r.status, detailText(body, r.status), body);
    }
    if (opts.raw) return r;
    return r.json();
  }

  function showTokenPrompt(message) {
    const panel = document.getElementById("auth-panel");
    document.getElementById("auth-message").textContent = message;
    panel.hidden = false;
    setLive(false);
    document.getElementById("auth-token").focus();
  }

  function setupTokenForm() {
    const form = document.getElementById("auth-form");
    form.addEventListener("submit", ev => {
      ev.preventDefault();
      const value = document.getElementById("auth-token").value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      location.reload();
    });
    document.getElementById("auth-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      document.getElementById("auth-token").value = "";
    });
    document.getElementById("token-button").addEventListener("click", () =>
      showTokenPrompt(getToken() ? "A token is stored for this tab; paste another to replace it." :
                                   "No token stored (fine when the server runs with LOWRANK_AUTH=off)."));
  }

  function showError(err) {
    const banner = document.getElementById("error-banner");
    if (!err) { banner.hidden = true; banner.textContent = ""; return; }
    if (err.status === 401) return;  // the token prompt says it
    banner.textContent = err.message || String(err);
    banner.hidden = false;
  }

  // on: polling; "done": everything shown is final (finished job/sweep); false: stopped (error, token).
  function setLive(on) {
    const live = document.getElementById("live");
    live.classList.toggle("paused", on !== true);
    live.textContent = on === true ? "\u25CF live" : on === "done" ? "\u25CF final" : "\u25CB paused";
    live.title = on === true ? "updates by polling the API every " + POLL_MS + " ms" :
                 on === "done" ? "finished: nothing more to update" : "not updating (see the message above)";
  }

  // Run `fn` now and every POLL_MS until it returns false (done) or a 401 (waits for a token).
  function poll(fn) {
    let stopped = false;
    async function tick() {
      if (stopped) return;
      let again = true;
      let failed = false;
      try {
        again = (await fn()) !== false;
        showError(null);
      } catch (e) {
        failed = true;
        showError(e);
        // 401 waits for a token; 404/409/422 (an unknown or ambiguous id) will not change by asking again.
        if (e.status === 401 || e.status === 404 || e.status === 409 || e.status === 422) again = false;
        else console.error(e);
      }
      if (again) setTimeout(tick, POLL_MS); else { stopped = true; setLive(failed ? false : "done"); }
    }
    setLive(true);
    tick();
    return { stop() { stopped = true; } };
  }

  // el("td", {class: "num", title: "x"}, "text", childNode, ...): text children become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function fill(tbody, rows) { tbody.replaceChildren(...rows); }

  function num(v, digits) {
    if (v === null || v === undefined) return "\u2013";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(digits || 3);
    return v.toPrecision(digits || 4);
  }

  function bytes(n) {
    if (n < 1024) return n + " B";
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let i = -1;
    do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
    return n.toFixed(1) + " " + units[i];
  }

  function when(iso) {
    if (!iso) return "\u2013";
    const d = new Date(iso);
    return d.toLocaleString("sv-SE").replace("T", " ");  // YYYY-MM-DD HH:MM:SS, local time
  }

  function duration(job) {
    if (!job.started_at) return "\u2013";
    const end = job.finished_at ? new Date(job.finished_at) : new Date();
    const s = (end - new Date(job.started_at)) / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(2) + " h";
  }

  function statusBadge(status, attrs) {
    return el("span", Object.assign({ class: "status " + status }, attrs || {}), status);
  }

  function progressBar(frac) {
    const pct = Math.round(100 * Math.max(0, Math.min(1, frac || 0)));
    return el("div", { class: "progress", title: pct + "%" }, el("div", { class: "bar", style: "width:" + pct + "%" }));
  }

  function setProgress(bar, frac) {
    const pct = Math.round(100 * Math.max(0, Math.min(1, frac || 0)));
    bar.style.width = pct + "%";
    bar.parentElement.title = pct + "%";
  }

  function shortId(id) { return String(id).slice(0, 8); }

  // A job's id as a link to its page (the first 8 characters shown).
  function jobLink(id) { return el("a", { href: "/jobs/" + id }, shortId(id)); }

  // A job's progress for display: a succeeded job is complete whatever it last reported.
  function jobProgress(job) { return job.status === "succeeded" ? 1 : job.progress; }

  // A two-column table (th: name, td: value) of [name, value] pairs; undefined values are left out,
  // null shows as a dash.
  function kv(tbody, pairs) {
    fill(tbody, pairs.filter(([, v]) => v !== undefined).map(([k, v]) =>
      el("tr", null, el("th", null, k), el("td", null, v instanceof Node ? v : (v === null ? "\u2013" : String(v))))));
  }

  // The page title, heading and status badge of a job or sweep (`noun` names it when it has no name).
  function renderHeader(obj, noun, titleId, badgeId) {
    const name = obj.name || noun + " " + shortId(obj.id);
    document.title = name + " \u2013 " + obj.status;
    document.getElementById(titleId).textContent = name + " (" + obj.kind + ")";
    const badge = document.getElementById(badgeId);
    badge.textContent = obj.status;
    badge.className = "status " + obj.status;
    badge.dataset.status = obj.status;
  }

  function pointText(point) {
    if (!point) return "";
    return Object.entries(point).map(([k, v]) => k + "=" + v).join(", ");
  }

  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  // The full id of a job or sweep (`what`) from its id or a unique prefix (the page URL may carry the
  // 8 characters tables show). Resolved through the API with the viewer's token, so it finds exactly
  // the ids the viewer may read; the URL is rewritten to the full id.
  async function resolveId(what, ref, rewriteUrl) {
    if (UUID_RE.test(ref)) return ref.toLowerCase();
    const page = await api("/api/v1/" + what + "s?limit=2&id_prefix=" + encodeURIComponent(ref));
    if (!page.items.length) throw new ApiError(404, "no " + what + " id starts with " + ref, null);
    if (page.items.length > 1)
      throw new ApiError(409, what + " id " + ref + " is ambiguous: it starts " + page.items.map(i => i.id).join(", ") +
                              (page.next_cursor ? " and more" : "") + "; give more digits", null);
    const id = page.items[0].id;
    if (rewriteUrl) history.replaceState(null, "", location.pathname.replace(ref, id) + location.search);
    return id;
  }

  // result.warnings of a job (e.g. accuracy at chance level) as a list of strings.
  function warningsOf(job) {
    const w = job && job.result ? job.result.warnings : null;
    if (!w) return [];
    return (Array.isArray(w) ? w : [w]).map(String);
  }

  // What a metric means, for axis titles (MATH.md Section 1 for the function error).
  const METRIC_DOCS = {
    error: "normalized function error L(W')/L(0)",
    mc_error: "Monte Carlo estimate of L(W')/L(0)",
    nkp_error: "NKP's L(W')/L(0) on the teacher",
    val_top1: "validation top-1 accuracy",
    top1_compressed: "top-1 of the compressed model before fine-tuning (BN re-estimated)",
    params_compressed: "parameters of the compressed model",
    speedup: "dense p50 / factored p50 at the first batch size",
    latency_ms: "factored network's p50 ms at the first batch size",
  };
  function metricTitle(name) { return METRIC_DOCS[name] ? name + ": " + METRIC_DOCS[name] : name; }

  // A grid key that sets a rank (rank, rank_ratio, weights.rank ...): log axis by default.
  function isRankKey(key) { return /(^|\.|_)rank(_ratio)?$/.test(key); }

  // One-line summary of a job's result for tables.
  function resultSummary(job) {
    const r = job.result;
    if (job.status === "failed") return (job.error || "").split("\n")[0].slice(0, 120);
    if (!r) return "";
    if (job.kind === "train") {
      const parts = [];
      if (r.val_top1 !== undefined) parts.push("val top-1 " + num(r.val_top1, 3));
      if (r.params_factored !== undefined) parts.push(num(r.params_factored) + " params");
      return parts.join(", ");
    }
    if (job.kind === "compress")  // accuracy steps: dense -> compressed (after BN re-estimation) -> fine-tuned
      return "top-1 " + [r.top1_dense, r.top1_compressed, ...(r.top1_finetuned || []).slice(-1)].map(v => num(v, 3))
        .join(" \u2192 ") + ", " + num(r.params_compressed) + " params (" + (r.method || "?") + ")";
    if (job.kind === "latency")  // at the first batch size
      return "speed-up " + num(r.speedup, 3) + "\u00d7 at batch " + ((r.batches || [])[0] ?? "?") + ", p50 " +
        num(r.dense_latency_ms, 3) + " \u2192 " + num(r.latency_ms, 3) + " ms" +
        (r.slower_layers !== undefined ? ", " + r.slower_layers + " slower layer(s)" : "");
    return "error " + num(r.error, 4) + (r.method ? " (" + r.method + ", r=" + r.rank + ")" : "");
  }

  // The summary of a job for tables, with a warning sign when its result carries warnings.
  function summaryCell(job) {
    const w = warningsOf(job);
    const text = resultSummary(job);
    return w.length ? el("span", { class: "has-warning", title: w.join("\n") }, "\u26A0 ", text) : text;
  }

  // Fetch a file with the token and hand it to the browser as a download.
  async function download(path, filename) {
    const r = await api(path, { raw: true });
    const blob = await r.blob();
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: filename, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                   "#7f7f7f", "#bcbd22"];

  // The i-th color of PALETTE, cycling.
  function color(i) { return PALETTE[i % PALETTE.length]; }

  function rgba(hex, alpha) {
    const n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }

  // User text for a Plotly plot (names, legends, hover text, category values, tick labels, titles,
  // annotations). Plotly draws a subset of HTML in all of these (a name `<a href=...>` becomes a live
  // link, `<b style=...>` styled text), so `&`, `<` and `>` become entities, which Plotly draws as the
  // characters themselves. Numbers pass unchanged (numeric axes stay numeric), null stays a gap.
  function plotText(v) {
    if (v === null || v === undefined || typeof v === "number") return v;
    return String(v).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  const PLOT_CONFIG = { responsive: true, displaylogo: false };

  function plot(div, traces, layout) {
    // Legend at the right (default): below the plot it would cover the x-axis title of small plots.
    const base = { margin: { l: 60, r: 20, t: 40, b: 50 }, hovermode: "closest", font: { size: 12 } };
    return Plotly.react(div, traces, Object.assign(base, layout), PLOT_CONFIG);
  }

  document.addEventListener("DOMContentLoaded", setupTokenForm);

  return { api, poll, el, fill, kv, num, bytes, when, duration, statusBadge, progressBar, setProgress,
           shortId, jobLink, jobProgress, renderHeader, pointText, resultSummary, summaryCell, download, plot, plotText, rgba,
           color, resolveId, warningsOf, metricTitle, isRankKey, ApiError, PALETTE, TERMINAL, pageData, params,
           showError };
})();
