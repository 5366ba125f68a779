// featurewatch ui: the page. Plain JavaScript, no build step, no network but this server.
// The JSON API it uses is documented in docs/architecture.md ("The page's JSON API").
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, run: null, tokens: [], alerts: [], lastPrompt: null };

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "—" : Number(x).toFixed(digits);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new Error((data && data.error) || `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

// ---------------------------------------------------------------- colours
// A diverging scale around the threshold: blue below, white at it, red above.
function shade(diff, scale) {
  const t = Math.max(-1, Math.min(1, scale > 0 ? diff / scale : 0));
  const to = t >= 0 ? [220, 38, 38] : [37, 99, 235];
  const a = Math.abs(t);
  const c = to.map((v) => Math.round(255 + (v - 255) * a));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function detectorInfo(name) {
  return state.info.detectors.find((d) => d.name === name);
}

function thresholdFor(name, phase) {
  const d = detectorInfo(name);
  if (!d) return 0;
  return d.thresholds[phase] !== undefined ? d.thresholds[phase] : Object.values(d.thresholds)[0];
}

function paintTokens(container, tokens, detector, thresholds) {
  // scale: the largest distance from the threshold among read tokens
  let scale = 0;
  for (const t of tokens) {
    const s = t.s && t.s[detector];
    if (t.x || s === undefined) continue;
    scale = Math.max(scale, Math.abs(s - thresholds(t.ph)));
  }
  for (const el of container.querySelectorAll(".tok")) {
    const t = el._tok;
    const s = t.s && t.s[detector];
    if (t.x || s === undefined) {
      el.style.backgroundColor = "";
      el.removeAttribute("data-score");
      continue;
    }
    el.dataset.score = String(s);
    el.dataset.threshold = String(thresholds(t.ph));
    el.style.backgroundColor = shade(s - thresholds(t.ph), scale);
    el.title = `#${t.p} ${t.ph}: ${detector} ${fmt(s)} (threshold ${fmt(thresholds(t.ph))})`;
  }
  return scale;
}

function tokenElement(t, onclick) {
  const cls = ["tok", t.ph, t.x ? "excluded" : "", t.unread ? "unread" : ""].filter(Boolean).join(" ");
  const el = h("span", { class: cls, "data-pos": t.p, "data-phase": t.ph, onclick });
  el.textContent = t.t;
  el._tok = t;
  return el;
}

// ---------------------------------------------------------------- live view
function shownDetectors() {
  return [...document.querySelectorAll("#show-detectors input:checked")].map((i) => i.value);
}

function repaint() {
  const det = $("shade-detector").value;
  if (!det) return;
  const scale = paintTokens($("tokens"), state.tokens, det, (ph) => thresholdFor(det, ph));
  const thr = thresholdFor(det, "completion");
  $("legend").hidden = false;
  $("legend-detector").textContent = det;
  $("legend-thr").textContent = fmt(thr);
  $("legend-low").textContent = fmt(thr - scale, 2);
  $("legend-high").textContent = fmt(thr + scale, 2);
}

function placeMarkers() {
  const track = $("track");
  track.replaceChildren();
  const n = Math.max(state.tokens.length, 1);
  const shown = new Set(shownDetectors());
  for (const a of state.alerts) {
    if (!shown.has(a.detector)) continue;
    const m = h("span", { class: `marker ${a.severity}`, title: `${a.detector} (${a.phase}) at token ${a.position}`,
      onclick: () => a._el.scrollIntoView({ block: "nearest" }) });
    m.style.left = `${(100 * a.position) / n}%`;
    track.append(m);
  }
  for (const el of document.querySelectorAll("#alerts .alert")) {
    el.hidden = !shown.has(el.dataset.detector);
  }
}

function addAlert(a) {
  const shownAt = Date.now() / 1000;
  a.shownAt = shownAt;
  state.alerts.push(a);
  const evidence = (a.evidence || []).map((e) => h("li", {},
    h("a", { href: `/feature/${encodeURIComponent((detectorInfo(a.detector) || {}).hookpoint || "")}/${e.feature}`,
      "data-feature": e.feature }, `#${e.feature}`), " ", e.label || "(unlabelled)",
    h("span", { class: "muted" }, ` activation ${fmt(e.activation, 2)}, contribution ${fmt(e.contribution, 2)}`)));
  const el = h("li", { class: "alert", "data-detector": a.detector, "data-position": a.position,
    "data-fired-at": a.fired_at, "data-shown-at": shownAt },
    h("b", {}, a.detector), ` ${a.phase}: score ${fmt(a.score)} ≥ threshold ${fmt(a.threshold)} `,
    h("span", { class: "muted" }, `at token ${a.position} (span ${a.span[0]}–${a.span[1]}), ${a.action}, ${a.severity}; shown ${Math.round(1000 * (shownAt - a.fired_at))} ms after firing`),
    h("ul", { class: "evidence" }, evidence));
  a._el = el;
  $("alerts").append(el);
  const tokEl = document.querySelector(`#tokens .tok[data-pos="${a.position}"]`);
  if (tokEl) tokEl.classList.add("alerted");
  placeMarkers();
}

function addTokens(tokens, onclick) {
  const box = $("tokens");
  for (const t of tokens) {
    state.tokens.push(t);
    box.append(tokenElement(t, onclick));
  }
  repaint();
  placeMarkers();
}

// Stop a run still generating: the server ends it after the decode step in flight and answers once
// it has ended, so its slot is free for the next one.
async function cancelRun(run) {
  if (!run || run.done) return;
  try { await api("POST", `/api/runs/${run.id}/cancel`); } catch (e) { /* it ended, or the server is gone */ }
}

function setStreaming(on) {
  $("stop").hidden = !on;
}

async function generate(ev) {
  ev.preventDefault();
  showError("");
  const button = $("generate");
  if (button.disabled) return;
  button.disabled = true;
  try {
    // Generate again: the run still generating is cancelled first (compute stops within a step)
    const previous = state.run;
    if (previous && !previous.done) {
      previous.replaced = true;
      if (previous.es) previous.es.close();
      $("status").textContent = "stopping the previous generation…";
      await cancelRun(previous);
      previous.done = true;
    }
    await startRun();
  } finally {
    button.disabled = false;
  }
}

async function startRun() {
  const body = {
    prompt: $("prompt").value,
    chat: $("chat").checked,
    max_new_tokens: Number($("max-new-tokens").value),
    detectors: shownDetectors(),
  };
  let started;
  try {
    started = await api("POST", "/api/runs", body);
  } catch (e) {
    // 400 bad input, 429 busy, 401/403 refused: say so, and stay usable
    showError(e.message);
    $("status").textContent = e.status === 429 ? "busy: try again when a generation ends" : "";
    document.body.dataset.runState = e.status === 429 ? "busy" : "refused";
    setStreaming(false);
    return;
  }
  state.lastPrompt = body;
  try { localStorage.setItem("featurewatch.lastPrompt", JSON.stringify(body)); } catch (e) { /* private mode */ }
  state.tokens = [];
  state.alerts = [];
  $("tokens").replaceChildren();
  $("alerts").replaceChildren();
  $("track").replaceChildren();
  $("run-scores").textContent = "";
  $("inspector").hidden = true;
  const run = { id: started.run_id, done: false };
  state.run = run;
  document.body.dataset.runId = run.id;
  document.body.dataset.runState = "streaming";
  $("status").textContent = "generating…";
  setStreaming(true);
  const es = new EventSource(started.events);
  run.es = es;
  const click = (e) => inspect(run, e.currentTarget);
  es.addEventListener("tokens", (e) => addTokens(JSON.parse(e.data).tokens, click));
  es.addEventListener("alert", (e) => addAlert(JSON.parse(e.data)));
  es.addEventListener("done", (e) => {
    const d = JSON.parse(e.data);
    es.close();
    run.done = true;
    if (run.replaced) return;
    setStreaming(false);
    addTokens(d.unread.map((t) => Object.assign(t, { unread: true })), click);
    const scores = Object.entries(d.scores).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ");
    $("run-scores").textContent = `${d.cancelled ? "stopped" : d.outcome}${d.degraded ? " (degraded)" : ""} — pooled scores: ${scores || "—"}`;
    $("status").textContent = `${d.cancelled ? "stopped" : "done"}: ${state.tokens.length} tokens, ${state.alerts.length} alert(s)`;
    document.body.dataset.runState = d.cancelled ? "stopped" : "done";
  });
  es.addEventListener("failed", (e) => {
    es.close();
    run.done = true;
    if (run.replaced) return;
    setStreaming(false);
    showError(JSON.parse(e.data).error);
    $("status").textContent = "";
    document.body.dataset.runState = "failed";
  });
  es.onerror = () => {
    if (!run.done && !run.replaced && es.readyState === EventSource.CLOSED) {
      setStreaming(false);
      showError("lost the connection to the server");
    }
  };
}

async function inspect(run, el) {
  for (const s of document.querySelectorAll(".tok.selected")) s.classList.remove("selected");
  el.classList.add("selected");
  const box = $("inspector");
  box.hidden = false;
  const t = el._tok;
  const close = h("button", { class: "close", onclick: () => { box.hidden = true; } }, "×");
  if (!run.done) {
    box.replaceChildren(close, h("p", {}, "Inspect tokens when the generation ends."));
    return;
  }
  if (t.unread) {
    box.replaceChildren(close, h("p", {}, `“${t.t}” was generated last: the model never read it, so it has no features.`));
    return;
  }
  let d;
  try {
    d = await api("GET", `/api/runs/${run.id}/tokens/${t.p}`);
  } catch (e) {
    box.replaceChildren(close, h("p", { class: "error" }, e.message));
    return;
  }
  const scores = Object.entries(d.scores).map(([k, v]) => h("li", {}, `${k}: ${fmt(v)}`));
  const parts = [close, h("h3", {}, `token #${d.position} “${d.token}”`),
    h("p", { class: "muted" }, `${d.phase}${d.excluded ? ", not read by detectors" : ""}`),
    h("ul", {}, scores)];
  for (const hp of d.hookpoints) {
    const rows = hp.features.map((f) => h("tr", { "data-feature": f.feature },
      h("td", {}, h("a", { href: `/feature/${encodeURIComponent(hp.hookpoint)}/${f.feature}` }, `#${f.feature}`)),
      h("td", {}, f.label || "(unlabelled)"),
      h("td", {}, fmt(f.activation, 2) + (f.max_activation ? ` (${Math.round(100 * f.activation / f.max_activation)}%)` : "")),
      h("td", {}, Object.entries(f.contributions).map(([k, c]) =>
        h("div", {}, `${k} ${c >= 0 ? "+" : ""}${fmt(c, 2)}` + (f.shares[k] !== null ? ` (${Math.round(100 * f.shares[k])}%)` : ""))))));
    parts.push(h("h4", {}, `strongest features at ${hp.hookpoint}`),
      h("table", {}, h("tr", {}, h("th", {}, "feature"), h("th", {}, "label"), h("th", {}, "activation"),
        h("th", {}, "share of detector score")), rows));
  }
  box.replaceChildren(...parts);
}

async function showLive() {
  $("view-live").hidden = false;
  const shade = $("shade-detector");
  const checks = $("show-detectors");
  shade.replaceChildren(...state.info.detectors.map((d) => h("option", { value: d.name }, d.name)));
  checks.replaceChildren(...state.info.detectors.map((d) =>
    h("label", {}, h("input", { type: "checkbox", value: d.name, checked: true, onchange: placeMarkers }), d.name)));
  shade.addEventListener("change", repaint);
  $("max-new-tokens").max = state.info.max_new_tokens;
  if (!state.info.chat_template) { $("chat").checked = false; $("chat").disabled = true; }
  $("prompt-form").addEventListener("submit", generate);
  $("stop").addEventListener("click", async () => {
    $("status").textContent = "stopping…";
    await cancelRun(state.run);
  });
}

// ---------------------------------------------------------------- feature card
function contextElement(text) {
  // stored contexts mark the activating token as «token»
  const out = h("li", {});
  const re = /«([^»]*)»/g;
  let last = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    out.append(text.slice(last, m.index), h("mark", {}, m[1]));
    last = m.index + m[0].length;
  }
  out.append(text.slice(last));
  return out;
}

async function showFeature(hookpoint, id) {
  const view = $("view-feature");
  view.hidden = false;
  let f;
  try {
    f = await api("GET", `/api/features/${encodeURIComponent(hookpoint)}/${encodeURIComponent(id)}`);
  } catch (e) {
    showError(e.message);
    return;
  }
  const usedBy = f.used_by.length ? h("table", {}, h("tr", {}, h("th", {}, "detector"), h("th", {}, "weight")),
    f.used_by.map((u) => h("tr", {}, h("td", {}, h("a", { href: `/detector/${u.detector}` }, u.detector)),
      h("td", {}, fmt(u.weight))))) : h("p", { class: "muted" }, "no detector reads it");
  let last = null;
  try { last = JSON.parse(localStorage.getItem("featurewatch.lastPrompt") || "null"); } catch (e) { last = null; }
  const prompt = h("textarea", { id: "steer-prompt", rows: 2 });
  prompt.value = last && typeof last.prompt === "string" ? last.prompt : "";
  const strength = h("input", { id: "steer-strength", type: "number", step: "0.5", value: "4" });
  const result = h("div", { id: "steer-result" });
  const button = h("button", { id: "steer", type: "submit" }, "Steer");
  const form = h("form", { id: "steer-form" }, prompt, h("div", { class: "controls" },
    h("label", {}, "clamp at ", strength, f.max_activation ? " × max activation" : " (raw activation)"), button));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("");
    result.textContent = "generating twice…";
    try {
      const d = await api("POST", "/api/steer", { prompt: prompt.value, chat: last ? last.chat !== false : true,
        max_new_tokens: last && last.max_new_tokens ? last.max_new_tokens : 32, hookpoint: f.hookpoint,
        feature: f.feature, value: Number(strength.value) });
      result.replaceChildren(h("div", { class: "side" },
        h("div", { id: "unsteered" }, h("b", {}, "unsteered"), "\n", d.unsteered.text),
        h("div", { id: "steered" }, h("b", {}, `clamped at ${strength.value}`), "\n", d.steered.text)));
    } catch (e) {
      result.textContent = "";
      showError(e.message);
    }
  });
  view.replaceChildren(
    h("h2", {}, `#${f.feature} ${f.label || "(unlabelled)"}`),
    h("p", { class: "muted" }, `SAE at ${f.hookpoint} (${f.d_sae} features) · density ${fmt(f.density, 5)} · max activation ${fmt(f.max_activation, 3)}`),
    h("h3", {}, "Top contexts (the activating token highlighted)"),
    f.top_contexts.length ? h("ol", { class: "contexts", id: "contexts" }, f.top_contexts.map(contextElement))
      : h("p", { class: "muted", id: "contexts" }, "the pack stores no contexts for this feature"),
    h("h3", {}, "Detectors that read it"), usedBy,
    h("h3", {}, "Steer"), h("p", { class: "muted" }, "Regenerate a prompt with this feature clamped (the Intervention API), next to the unsteered reply."),
    form, result);
}

// ---------------------------------------------------------------- detector card
async function showDetector(name) {
  const view = $("view-detector");
  view.hidden = false;
  let d;
  try {
    d = await api("GET", `/api/detectors/${encodeURIComponent(name)}`);
  } catch (e) {
    showError(e.message);
    return;
  }
  const thr = Object.entries(d.thresholds).map(([p, t]) => h("tr", {}, h("td", {}, p), h("td", {}, fmt(t))));
  const feats = d.features.map((f) => h("tr", {},
    h("td", {}, h("a", { href: `/feature/${encodeURIComponent(d.hookpoint)}/${f.id}` }, `#${f.id}`)),
    h("td", {}, fmt(f.weight)), h("td", {}, f.share === null ? "—" : `${Math.round(100 * f.share)}%`),
    h("td", {}, f.label || "(unlabelled)"),
    h("td", {}, h("ol", { class: "contexts" }, f.top_contexts.map(contextElement)))));
  const cal = d.calibration;
  const calRows = cal ? ["auroc", "tpr_at_fpr", "fpr", "target_fpr", "n_pos", "n_neg", "held_out", "date", "notes"]
    .filter((k) => cal[k] !== null && cal[k] !== undefined)
    .map((k) => h("tr", {}, h("td", {}, k), h("td", {}, typeof cal[k] === "number" ? String(cal[k]) : cal[k]))) : [];
  view.replaceChildren(
    h("h2", {}, d.detector), h("p", {}, d.description),
    h("p", { class: "muted" }, `${d.kind} detector at ${d.hookpoint} · action ${d.action} · severity ${d.severity}` +
      (d.active ? "" : " · not active in this monitor")),
    h("p", {}, `score per token = ${fmt(d.bias)} + Σ wᵢ·aᵢ, pooled ${d.pooling.method} over each watched phase's content tokens (at least ${d.min_tokens} tokens)` +
      (d.prior_score !== null ? `, shrunk toward ${fmt(d.prior_score)} by ${d.prior_tokens} tokens` : "") + `; re-arms ${fmt(d.hysteresis)} below`),
    h("h3", {}, "Thresholds"), h("table", { id: "thresholds" }, thr),
    h("h3", {}, "Held-out figures (calibration)"),
    cal ? h("table", { id: "calibration" }, calRows) : h("p", { class: "muted" }, "no calibration block"),
    h("h3", {}, "Features"),
    d.kind === "probe" ? h("p", {}, "a dense probe over the raw residual: no features to list")
      : h("table", { id: "detector-features" }, h("tr", {}, h("th", {}, "feature"), h("th", {}, "weight"),
        h("th", {}, "share"), h("th", {}, "label"), h("th", {}, "top contexts")), feats));
}

// ---------------------------------------------------------------- offline scores
function renderScores(data) {
  const sort = $("score-sort");
  const chosen = sort.value || data.detectors[0];
  sort.replaceChildren(...data.detectors.map((d) => h("option", { value: d, selected: d === chosen }, d)));
  const det = sort.value;
  const rows = [...data.rows].sort((a, b) => (b.scores[det] ?? -Infinity) - (a.scores[det] ?? -Infinity));
  $("score-count").textContent = `${rows.length} records`;
  const thr = (ph) => (data.thresholds[det] || {})[ph] ?? 0;
  $("score-rows").replaceChildren(...rows.map((r) => {
    const alerts = r.alerts.filter((a) => a.detector === det);
    const li = h("li", { class: "score-row", "data-id": r.id },
      h("b", {}, r.id), ` ${det} ${fmt(r.scores[det])}`,
      alerts.length ? h("span", { class: "error" }, ` ⚠ ${alerts.map((a) => a.phase).join(", ")}`) : null);
    if (r.tokens) {
      const box = h("div", { class: "tokens" }, r.tokens.map((t) => tokenElement(t, null)));
      paintTokens(box, r.tokens, det, thr);
      li.append(box);
    } else {
      li.append(...alerts.filter((a) => a.text).map((a) => h("div", { class: "muted" }, a.text)));
    }
    return li;
  }));
}

async function loadScores(text) {
  showError("");
  try {
    const data = await api("POST", "/api/scores", { text });
    $("score-sort").onchange = () => renderScores(data);
    renderScores(data);
  } catch (e) {
    showError(e.message);
  }
}

function showScores() {
  $("view-scores").hidden = false;
  const zone = $("dropzone");
  $("score-file").addEventListener("change", async (e) => {
    if (e.target.files.length) loadScores(await e.target.files[0].text());
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) loadScores(await e.dataTransfer.files[0].text());
  });
}

// ---------------------------------------------------------------- start
async function main() {
  try {
    state.info = await api("GET", "/api/info");
  } catch (e) {
    showError(e.status ? e.message : `cannot reach the featurewatch server: ${e.message}`);
    document.body.dataset.ready = "1";
    return;
  }
  $("model-info").textContent = `${state.info.model} · pack ${state.info.pack || "none"} · ${state.info.hookpoints.join(", ")}`;
  $("detector-links").replaceChildren(...state.info.detectors.map((d) =>
    h("a", { href: `/detector/${d.name}` }, d.name)));
  let parts;
  try {
    parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  } catch (e) {
    // a malformed %-escape in the address: say so instead of a blank page, and show the live view
    showError(`this address is not valid (${e.message}: a malformed %-escape in ${location.pathname}); showing the live page`);
    parts = [];
  }
  if (parts[0] === "feature" && parts.length === 3) await showFeature(parts[1], parts[2]);
  else if (parts[0] === "detector" && parts.length === 2) await showDetector(parts[1]);
  else if (parts[0] === "scores") showScores();
  else await showLive();
  document.body.dataset.ready = "1";
}

main().catch((e) => {
  showError(`the page failed to start: ${e.message}`);
  document.body.dataset.ready = "1";
});
