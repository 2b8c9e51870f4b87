// lmtune studio: data -> config -> plan -> run -> compare -> report -> try, against the studio's JSON API
// (see lmtune studio's contract). Plain JS, no dependencies, nothing from the internet. Everything that comes
// from files or runs is put on the page as text (textContent / DOM nodes), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "lmtune-studio-key";
const NOT_METRICS = new Set(["step", "epoch", "split", "loss", "num_examples", "eval_seconds", "learning_rate",
  "tokens_per_second", "grad_norm"]);
const state = { schema: null, runs: [], studies: [], view: null, timer: null, listTimer: null, chat: [] };

// ------------------------------------------------------------------------------------------ HTTP
// The API key's field, headers and ApiError (the page shows error.message) come from lmtune serve's page:
// /static/common/apikey.js, loaded first.

async function check(r) {
  if (r.ok) return r.json();
  let message = r.status + " " + r.statusText, hint = "";
  try {
    const body = await r.json();
    if (body && body.error) { message = body.error.message || message; hint = body.error.hint || ""; }
    else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  throw new ApiError(message, hint, r.status);
}

async function getJSON(path) { return check(await fetch(path, { headers: headers(false) })); }

async function postJSON(path, body) {
  return check(await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body || {}) }));
}

function setStatus(text, hint) {
  $("status").textContent = text ? text + (hint ? " (" + hint + ")" : "") : "";
}

function showError(e) {
  if (needsApiKey(e)) setStatus("This studio needs an API key: enter it above.");
  else setStatus("error: " + e.message, e.hint);
}

// Runs fn (an async click handler) with its button disabled; errors go to the status line.
function action(button, fn) {
  button.addEventListener("click", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try { setStatus(""); await fn(); } catch (e) { showError(e); } finally { button.disabled = false; }
  });
}

// ------------------------------------------------------------------------------------------ API files
// An image from the API (with the key: an <img src> cannot send headers), in a figure.
async function figure(url, name, caption) {
  const r = await fetch(url, { headers: headers(false) });
  if (!r.ok) return null;
  const img = el("img", { alt: name });
  img.src = URL.createObjectURL(await r.blob());
  return el("figure", {}, img, el("figcaption", {}, caption || name));
}

function fileUrl(base, path) {
  return base + "/files/" + path.split("/").map(encodeURIComponent).join("/");
}

// ------------------------------------------------------------------------------------------ data
function selectOptions(select, values, keep) {
  const old = select.value;
  select.replaceChildren(...values.map((v) => (typeof v === "string" ? el("option", { value: v }, v)
    : el("option", { value: v.value }, v.label))));
  if (keep && values.some((v) => (v.value ?? v) === old)) select.value = old;
}

function dataPath() { return $("data-path").value.trim() || $("data-file").value; }

async function upload() {
  const file = $("file-input").files[0];
  if (!file) throw new ApiError("Choose a file to upload first.");
  const form = new FormData();
  form.append("file", file);
  const r = await fetch("/api/files", { method: "POST", headers: headers(false), body: form });
  const body = await check(r);
  await loadWorkspace();
  $("data-file").value = body.path;
  $("data-path").value = "";
  setStatus("");
  $("inspect-result").replaceChildren(el("p", { class: "muted" }, "uploaded as " + body.path));
}

// The config the page builds: the Data tab's choices plus the Config tab's changed settings.
function buildConfig() {
  const cfg = { task: $("task").value, model: $("model").value.trim(), data: {} };
  const set = (key, value) => {
    const parts = key.split(".");
    let node = cfg;
    for (const p of parts.slice(0, -1)) node = node[p] = node[p] && typeof node[p] === "object" ? node[p] : {};
    node[parts[parts.length - 1]] = value;
  };
  if (dataPath()) set("data.train", dataPath());
  if ($("text-column").value.trim()) set("data.text_column", $("text-column").value.trim());
  if ($("label-column").value.trim()) set("data.label_column", $("label-column").value.trim());
  for (const input of document.querySelectorAll("#config-form [data-field]")) {
    const spec = state.schema.fields[input.dataset.field] || {};
    let value;
    if (input.type === "checkbox") {
      value = input.checked;
      if (value === Boolean(spec.default)) continue;
    } else {
      const raw = input.value.trim();
      if (raw === "" || raw === String(spec.default ?? "")) continue;
      value = input.type === "number" ? Number(raw) : raw;
    }
    set(input.dataset.field, value);
  }
  return cfg;
}

function factsTable(title, facts) {
  // facts: {split: {name: value}} -> one row per fact, one column per split (objects shown compactly).
  const splits = Object.keys(facts);
  const names = [...new Set(splits.flatMap((s) => Object.keys(facts[s] || {})))];
  const table = el("table", { class: "results", "data-testid": "inspect-" + title });
  fillTable(table, ["", ...splits], names.map((n) => [n, ...splits.map((s) => {
    const v = (facts[s] || {})[n];
    if (v && typeof v === "object" && !Array.isArray(v)) {
      return Object.entries(v).map(([k, x]) => k + " " + fmt(x)).join(", ");
    }
    return v;
  })]));
  return table;
}

function listBlock(title, items, cls) {
  if (!items || !items.length) return null;
  return el("div", { class: cls || "" }, el("h3", {}, title),
    el("ul", {}, ...items.map((s) => el("li", {}, typeof s === "string" ? s : (s.message || s.text || JSON.stringify(s))))));
}

// A request whose failure (a 4xx: say a body too large) also clears the box that was waiting for it.
async function failInto(box, request) {
  try {
    return await request;
  } catch (e) {
    box.dataset.state = "error";
    box.replaceChildren(el("div", { class: "finding error" }, e.message));
    throw e;
  }
}

async function inspect() {
  const box = $("inspect-result");
  box.dataset.state = "running";
  box.replaceChildren(el("p", { class: "muted" }, "inspecting (the data is prepared exactly as training will)…"));
  const body = await failInto(box, postJSON("/api/inspect", { config: buildConfig() }));
  if (!body.ok) {
    box.dataset.state = "error";
    box.replaceChildren(el("div", { class: "finding error", "data-testid": "inspect-error" },
      el("b", {}, "Pre-flight error: "), body.error.message,
      body.error.hint ? el("div", { class: "hint" }, body.error.hint) : null));
    return;
  }
  const rep = body.report;
  box.dataset.state = "ok";
  const parts = [el("div", { class: "finding ok", "data-testid": "inspect-ok" },
    el("b", {}, "Ready to train: "), `task ${rep.task}, model ${rep.model}` +
    (rep.labels ? `, ${rep.labels.length} labels (${rep.labels.join(", ")})` : ""))];
  if (rep.splits) parts.push(factsTable("splits", rep.splits));
  if (rep.facts) parts.push(factsTable("facts", rep.facts));
  if (rep.majority_class) {
    parts.push(el("p", {}, "majority class ", el("code", {}, rep.majority_class.label), ": accuracy " +
      Object.entries(rep.majority_class.rates).map(([s, r]) => s + " " + r.toFixed(3)).join(", ")));
  }
  if (rep.summary && Object.keys(rep.summary).length) {
    parts.push(el("p", {}, Object.entries(rep.summary).map(([k, v]) => k + ": " + fmt(v)).join("; ")));
  }
  parts.push(listBlock("Suggestions", rep.suggestions, "suggestions"));
  parts.push(listBlock("Warnings", rep.warnings, "warnings"));
  if (rep.examples && rep.examples.length) {
    parts.push(el("details", {}, el("summary", {}, "examples as the model sees them"),
      el("pre", { class: "output" }, rep.examples.map((e) => (typeof e === "string" ? e : JSON.stringify(e, null, 1))).join("\n\n"))));
  }
  box.replaceChildren(...parts.filter(Boolean));
}

// ------------------------------------------------------------------------------------------ config
// On the Data tab, or set by the studio itself (a launched run's output_dir is runs/NAME).
const DATA_TAB_FIELDS = new Set(["task", "model", "data.train", "data.text_column", "data.label_column", "output_dir"]);

function buildForm() {
  const form = $("config-form");
  form.replaceChildren();
  for (const [key, spec] of Object.entries(state.schema.fields || {})) {
    if (DATA_TAB_FIELDS.has(key)) continue;
    let input;
    if (spec.enum) {
      input = el("select", {});
      const values = spec.enum.map(String);
      if (spec.default === null || spec.default === undefined) values.unshift("");
      selectOptions(input, values);
      input.value = spec.default === null || spec.default === undefined ? "" : String(spec.default);
    } else if (spec.type === "boolean") {
      input = el("input", { type: "checkbox" });
      input.checked = Boolean(spec.default);
    } else {
      const numeric = spec.type === "integer" || spec.type === "number";
      input = el("input", { type: numeric ? "number" : "text" });
      if (numeric) {
        input.step = spec.type === "integer" ? "1" : "any";
        if (spec.minimum !== undefined && spec.minimum !== null) input.min = spec.minimum;
        if (spec.maximum !== undefined && spec.maximum !== null) input.max = spec.maximum;
      }
      input.value = spec.default === null || spec.default === undefined ? "" :
        (typeof spec.default === "object" ? JSON.stringify(spec.default) : String(spec.default));
    }
    input.dataset.field = key;
    input.id = "field-" + key.replace(/\./g, "-");
    const label = el("label", { class: "field", title: spec.description || "" },
      el("span", { class: "name" }, key), input,
      el("small", { class: "desc" }, spec.description || ""), el("small", { class: "field-error" }));
    form.append(label);
  }
}

function showConfigErrors(errors) {
  for (const e of document.querySelectorAll("#config-form .field-error")) e.textContent = "";
  for (const l of document.querySelectorAll("#config-form label.invalid")) l.classList.remove("invalid");
  $("config-errors").replaceChildren(...(errors || []).map((e) => el("li", {}, (e.field ? e.field + ": " : "") + e.message)));
  for (const e of errors || []) {
    const input = document.querySelector(`#config-form [data-field="${CSS.escape(e.field || "")}"]`);
    if (input) {
      input.parentElement.classList.add("invalid");
      input.parentElement.querySelector(".field-error").textContent = e.message;
    }
  }
}

async function validateConfig() {
  const body = await postJSON("/api/config", { config: buildConfig() });
  showConfigErrors(body.ok ? [] : body.errors);
  $("config-yaml").textContent = body.ok ? body.yaml : "";
  return body.ok;
}

async function planConfig() {
  if (!(await validateConfig())) return;
  const card = $("plan-card");
  card.dataset.state = "running";
  card.replaceChildren(el("p", { class: "muted" }, "planning…"));
  const body = await failInto(card, postJSON("/api/plan", { config: buildConfig() }));
  if (!body.ok) {
    card.dataset.state = "error";
    card.replaceChildren(el("div", { class: "finding error" }, body.error.message,
      body.error.hint ? el("div", { class: "hint" }, body.error.hint) : null));
    return;
  }
  const p = body.plan, mem = (p.memory || {}).per_device || {}, tok = p.tokens || {}, par = p.parameters || {};
  const fit = p.fit || {};
  card.dataset.state = "ok";
  card.replaceChildren(
    el("div", { class: "finding " + (fit.verdict === "fits" ? "ok" : "error"), id: "plan-fit" }, fit.message || fit.verdict || ""),
    el("table", { class: "results", id: "plan-table" }),
    ...[listBlock("Suggestions", p.suggestions, "suggestions"), listBlock("Notes", p.notes, "notes")].filter(Boolean));
  fillTable($("plan-table"), ["", "estimate"], [
    ["memory per device", el("b", { id: "plan-memory" }, bytes(mem.total))],
    ["weights / gradients / optimizer", [bytes(mem.weights), bytes(mem.gradients), bytes(mem.optimizer)].join(" / ")],
    ["activations", bytes(mem.activations)],
    ["tokens per step", tok.tokens_per_step_global],
    ["sequence length", tok.sequence_length],
    ["batch x accumulation x processes", [tok.batch_size, tok.gradient_accumulation, tok.processes].join(" x ")],
    ["trainable parameters", par.trainable === undefined ? "–" : fmt(par.trainable) + " of " + fmt(par.total)],
    ["method / precision", p.method + " / " + p.precision],
  ].filter(Boolean));
}

async function launch() {
  const name = $("run-name").value.trim();
  if (!name) throw new ApiError("Give the run a name first.");
  const body = await postJSON("/api/runs", { name, config: buildConfig() });
  await loadRuns();
  showTab("runs");
  await openRun(body.run.name);
}

// ------------------------------------------------------------------------------------------ runs
function runMetric(run) { return run.metric ? run.metric.name + " " + fmt(run.metric.value) : "–"; }

function renderRuns() {
  fillTable($("runs-table"), ["name", "status", "task", "model", "method", "metric", "started", "by"],
    state.runs.map((r) => {
      const link = el("a", { href: "#", class: "run-link", "data-run": r.name }, r.name);
      link.addEventListener("click", (e) => { e.preventDefault(); openRun(r.name).catch(showError); });
      return [link, el("span", { class: "st " + r.status }, r.status), r.task, r.model, r.method, runMetric(r),
        r.started_at, r.launched_by];
    }), (i) => ({ "data-run": state.runs[i].name, "data-status": state.runs[i].status }));
  const picks = $("compare-picks");
  const chosen = new Set([...picks.querySelectorAll("input:checked")].map((i) => i.value));
  picks.replaceChildren(...state.runs.map((r) => {
    const box = el("input", { type: "checkbox", value: r.name, class: "compare-pick" });
    box.checked = chosen.has(r.name);
    return el("label", { class: "inline" }, box, r.name + " (" + r.status + ")");
  }));
  const finished = state.runs.filter((r) => r.status === "complete").map((r) => r.name);
  selectOptions($("report-run"), state.runs.map((r) => r.name), true);
  selectOptions($("try-run"), finished, true);
  updateTryKind();
}

async function loadRuns() {
  state.runs = (await getJSON("/api/runs")).runs;
  renderRuns();
  // Keep the list fresh while anything runs.
  const running = state.runs.some((r) => r.status === "running");
  if (running && !state.listTimer) state.listTimer = setInterval(() => loadRuns().catch(showError), 2000);
  if (!running && state.listTimer) { clearInterval(state.listTimer); state.listTimer = null; }
}

function validationMetric(records, run) {
  if (run && run.metric && run.metric.name) {
    const name = run.metric.name.replace(/^(validation|test)[._]/, "");
    if (records.some((r) => typeof r[name] === "number")) return name;
  }
  for (const r of records) {
    const key = Object.keys(r).find((k) => !NOT_METRICS.has(k) && typeof r[k] === "number");
    if (key) return key;
  }
  return null;
}

function drawRun() {
  const v = state.view;
  const train = v.records.filter((r) => r.split === "train" && typeof r.loss === "number");
  const val = v.records.filter((r) => r.split === "validation");
  drawChart($("run-chart-loss"), [
    { name: "train loss", points: train.map((r) => [r.step, r.loss]) },
    { name: "validation loss", points: val.filter((r) => typeof r.loss === "number").map((r) => [r.step, r.loss]) },
  ]);
  const metric = validationMetric(val, v.run);
  $("run-chart-metric-caption").textContent = metric ? "validation " + metric : "validation metric";
  $("run-metric-name").textContent = metric ? "validation " + metric : "validation metric";
  drawChart($("run-chart-metric"), metric ? [{ name: metric, points: val.filter((r) => typeof r[metric] === "number")
    .map((r) => [r.step, r[metric]]) }] : []);
  const lastTrain = train[train.length - 1], lastVal = val.filter((r) => metric && typeof r[metric] === "number").pop();
  $("run-loss").textContent = lastTrain ? lastTrain.loss.toFixed(4) : "–";
  $("run-metric").textContent = lastVal ? fmt(lastVal[metric]) : "–";
  $("run-metric").dataset.value = lastVal ? String(lastVal[metric]) : "";
}

function showProgress(p) {
  const v = state.view;
  v.records.push(...(p.records || []));
  v.next = p.next ?? v.next;
  $("run-status").textContent = p.status;
  $("run-status").dataset.status = p.status;
  $("run-step").textContent = (p.step ?? "–") + " / " + (p.total_steps ?? "–");
  $("run-step").dataset.step = String(p.step ?? 0);
  $("run-epoch").textContent = typeof p.epoch === "number" ? p.epoch.toFixed(2) : "–";
  $("run-tps").textContent = typeof p.tokens_per_second === "number" ? Math.round(p.tokens_per_second).toLocaleString("en") : "–";
  $("run-eta").textContent = p.status === "running" ? duration(p.eta_seconds) : "–";
  $("run-progress").max = p.total_steps || 1;
  $("run-progress").value = p.step || 0;
  const log = $("run-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = (p.log_tail || []).join("\n");
  if (atEnd) log.scrollTop = log.scrollHeight;  // follow the log unless the user scrolled up
  $("run-stop").disabled = p.status !== "running";
  $("run-resume").disabled = p.status === "running" || p.status === "complete";
  drawRun();
}

async function pollRun() {
  const v = state.view;
  if (!v || v.polling) return;
  v.polling = true;
  try {
    const p = await getJSON(`/api/runs/${encodeURIComponent(v.name)}/progress?since=${v.next}`);
    if (state.view !== v) return;
    showProgress(p);
    if (p.status !== "running") {
      stopPolling();
      await refreshRun(v.name);
      await loadRuns();
    }
  } catch (e) { showError(e); } finally { v.polling = false; }
}

function stopPolling() { if (state.timer) { clearInterval(state.timer); state.timer = null; } }

function startPolling() {
  stopPolling();
  state.timer = setInterval(pollRun, 1000);
}

// The run's summary, config and final metrics (the progress keeps its own records).
async function refreshRun(name) {
  const body = await getJSON("/api/runs/" + encodeURIComponent(name));
  if (!state.view || state.view.name !== name) return body;
  state.view.run = body.run;
  $("run-config").textContent = body.config_yaml || "";
  // metrics.json: {split: {metric: number, ...}, ...} -> one row per metric, one column per split.
  const metrics = body.metrics || {};
  const splits = Object.keys(metrics).filter((s) => metrics[s] && typeof metrics[s] === "object" && !Array.isArray(metrics[s]));
  const names = [...new Set(splits.flatMap((s) => Object.keys(metrics[s]).filter((k) => typeof metrics[s][k] === "number")))];
  fillTable($("run-metrics"), ["metric", ...splits], names.map((n) => [n, ...splits.map((s) => metrics[s][n] ?? null)]));
  $("run-metrics").hidden = $("run-metrics-title").hidden = !names.length;
  return body;
}

async function openRun(name) {
  stopPolling();
  state.view = { name, records: [], next: 0, run: null };
  // Nothing of the run shown before stays on screen (a test or a user could read the old status).
  for (const id of ["run-step", "run-epoch", "run-loss", "run-metric", "run-tps", "run-eta"]) $(id).textContent = "–";
  $("run-status").textContent = "loading";
  $("run-status").dataset.status = "";
  $("run-step").dataset.step = "0";
  $("run-metric").dataset.value = "";
  $("run-log").textContent = "";
  fillTable($("run-metrics"), [], []);
  $("run-metrics").hidden = $("run-metrics-title").hidden = true;
  $("run-view").hidden = false;
  $("run-title").textContent = name;
  $("run-view").dataset.run = name;
  const body = await refreshRun(name);
  state.view.run = body.run;
  // The full history first (since=0), then only what is new.
  const p = await getJSON(`/api/runs/${encodeURIComponent(name)}/progress?since=0`);
  showProgress(p);
  if (p.status === "running") startPolling();
}

async function stopRun() {
  await postJSON(`/api/runs/${encodeURIComponent(state.view.name)}/stop`);
  await pollRun();
}

async function resumeRun() {
  const name = state.view.name;
  await postJSON(`/api/runs/${encodeURIComponent(name)}/resume`);
  await loadRuns();
  await openRun(name);
  startPolling();
}

// ------------------------------------------------------------------------------------------ compare
async function compare() {
  const names = [...document.querySelectorAll("#compare-picks input:checked")].map((i) => i.value);
  if (names.length < 2) throw new ApiError("Pick two or more runs to compare.");
  const c = await getJSON("/api/compare?runs=" + names.map(encodeURIComponent).join(","));
  const header = ["", ...c.runs.map((r) => r.name)];
  // Config values as written (0.0005, not a rounded 5.00e-4): the difference may be in the last digit.
  const written = (v) => (v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v));
  fillTable($("compare-diff"), header, c.config_diff.map((d) => [d.key, ...d.values.map(written)]),
    (i) => ({ "data-key": c.config_diff[i].key }));
  // The splits' scores first; the run summaries (timings, sizes, the starting point) folded away.
  const main = c.metrics.filter((d) => /^(test|validation)\./.test(d.key));
  const rest = c.metrics.filter((d) => !/^(test|validation)\./.test(d.key));
  fillTable($("compare-metrics"), header, main.map((d) => [d.key, ...d.values]), (i) => ({ "data-key": main[i].key }));
  fillTable($("compare-metrics-more"), header, rest.map((d) => [d.key, ...d.values]), (i) => ({ "data-key": rest[i].key }));
  $("compare-metrics-more-box").hidden = !rest.length;
  // Curves: the losses and the runs' headline metric first, every other validation metric folded away.
  const headline = c.runs.map((r) => r.metric && r.metric.name).find(Boolean);
  const lead = new Set(["train.loss", "validation.loss"]);
  if (headline) lead.add("validation." + headline.replace(/^(test|validation)\./, ""));
  const curves = $("compare-curves"), more = $("compare-curves-more");
  curves.replaceChildren();
  more.replaceChildren();
  const rank = (key) => (key === "train.loss" ? 0 : lead.has(key) ? 1 : 2);
  const keys = Object.keys(c.curves || {}).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  for (const key of keys) {
    const svg = svgEl("svg", { class: "chart", "data-curve": key });
    (lead.has(key) ? curves : more).append(el("figure", {}, svg, el("figcaption", {}, key)));
    drawChart(svg, c.curves[key].map((s) => ({ name: s.run, points: s.points })));
  }
  $("compare-curves-more-box").hidden = !more.children.length;
  const base = $("compare-baselines");
  base.replaceChildren();
  for (const b of c.baselines || []) {
    const rows = b.rows || [];
    const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
    const table = el("table", { class: "results", "data-run": b.run });
    fillTable(table, cols, rows.map((r) => cols.map((k) => r[k])));
    base.append(el("h4", {}, b.run + (b.split ? " (" + b.split + " split)" : "")), rows.length ? table : el("p", { class: "muted" }, "no baselines"));
  }
  $("compare-result").hidden = false;
}

// ------------------------------------------------------------------------------------------ report
async function openReport(name) {
  name = name || $("report-run").value;
  if (!name) throw new ApiError("Pick a run first.");
  $("report-run").value = name;
  const base = "/api/runs/" + encodeURIComponent(name);
  const rep = await getJSON(base + "/report");
  const shown = new Set();
  const imageFor = (path, alt) => { shown.add(path); return figure(fileUrl(base, path), path.split("/").pop(), alt); };
  const body = $("report-body");
  body.replaceChildren(renderMarkdown(rep.markdown || "", imageFor));
  body.dataset.run = name;
  const plots = $("report-plots");
  plots.replaceChildren();
  // The plots the report does not show inline.
  for (const path of (rep.plots || []).filter((p) => !shown.has(p))) {
    const fig = await figure(fileUrl(base, path), path.split("/").pop());
    if (fig) plots.append(fig);
  }
  $("report-plots-title").hidden = !plots.children.length;
}

// ------------------------------------------------------------------------------------------ try + export
function tryKind() {
  // The server says what a run takes (RunSummary.try); else its task's facts (a chat task: messages).
  const run = state.runs.find((r) => r.name === $("try-run").value);
  if (!run) return "texts";
  if (run.try) return run.try;
  const task = ((state.schema && state.schema.tasks) || []).find((t) => t.name === run.task);
  return task && task.chat ? "chat" : "texts";
}

function updateTryKind() {
  const kind = tryKind();
  $("try-kind").textContent = $("try-run").value ? kind : "";
  $("try-chat").hidden = kind !== "chat";
  $("try-texts").hidden = kind === "chat";
  $("try-contexts").hidden = kind !== "qa";
}

function resultCells(r) {
  if (r && typeof r === "object" && "label" in r) {
    const score = typeof r.score === "number" ? r.score : null;
    return [el("span", { class: "label" }, String(Array.isArray(r.label) ? r.label.join(", ") : r.label)),
      score === null ? "–" : el("span", {}, el("span", { class: "bar", style: `width:${Math.round(score * 60)}px` }),
        score.toFixed(3))];
  }
  return [el("code", {}, typeof r === "string" ? r : JSON.stringify(r)), ""];
}

async function sendTry() {
  const name = $("try-run").value;
  if (!name) throw new ApiError("Pick a finished run first.");
  const texts = $("try-input").value.split("\n").filter((t) => t.trim());
  if (!texts.length) throw new ApiError("Write a text first.");
  const body = { texts };
  if (tryKind() === "qa") body.contexts = $("try-contexts").value.split("\n").filter((t) => t.trim());
  const out = await postJSON(`/api/runs/${encodeURIComponent(name)}/try`, body);
  fillTable($("try-results"), ["text", "prediction", "score"], out.results.map((r, i) => [texts[i], ...resultCells(r)]),
    () => ({ class: "prediction" }));
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  $("chat-log").append(el("div", { class: "msg user" }, text));
  try {
    const out = await postJSON(`/api/runs/${encodeURIComponent($("try-run").value)}/try`, { messages: state.chat });
    const res = Array.isArray(out.results) ? out.results[0] : out.results;
    const answer = typeof res === "string" ? res : (res && (res.text ?? res.content)) || JSON.stringify(res);
    state.chat.push({ role: "assistant", content: answer });
    $("chat-log").append(el("div", { class: "msg assistant done" }, answer));
  } catch (e) {
    state.chat.pop();
    $("chat-log").append(el("div", { class: "msg error" }, e.message));
  }
}

async function exportRun() {
  const name = $("try-run").value;
  if (!name) throw new ApiError("Pick a finished run first.");
  const body = { format: $("export-format").value };
  if ($("export-quantize").value.trim()) body.quantize = $("export-quantize").value.trim();
  const { job } = await postJSON(`/api/runs/${encodeURIComponent(name)}/export`, body);
  const status = $("export-status");
  status.dataset.state = "running";
  status.textContent = "exporting…";
  for (;;) {
    const j = await getJSON("/api/jobs/" + encodeURIComponent(job));
    $("export-log").textContent = (j.log_tail || []).join("\n");
    if (j.status !== "running") {
      status.dataset.state = j.status;
      status.textContent = j.status === "done" ? "exported to " + j.output : "export failed (see the log)";
      return;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ------------------------------------------------------------------------------------------ studies
function renderStudies() {
  fillTable($("studies-table"), ["name", "trials", "complete", "pruned", "best value", "best params", "direction"],
    state.studies.map((s) => {
      const link = el("a", { href: "#", "data-study": s.name }, s.name);
      link.addEventListener("click", (e) => { e.preventDefault(); openStudy(s.name).catch(showError); });
      return [link, s.trials, s.complete, s.pruned, s.best ? s.best.value : null, s.best ? s.best.params : null, s.direction];
    }));
}

async function openStudy(name) {
  const base = "/api/studies/" + encodeURIComponent(name);
  const s = await getJSON(base);
  $("study-view").hidden = false;
  $("study-title").textContent = name;
  fillTable($("study-trials"), ["#", "state", "value", "params", "run", "seconds"],
    s.trials.map((t) => [t.number, t.state, t.value, t.params, t.run, t.duration_seconds]));
  const plots = $("study-plots"), files = $("study-files");
  plots.replaceChildren();
  files.replaceChildren();
  for (const file of s.plots || []) {
    if (/\.(png|svg)$/i.test(file)) {
      const fig = await figure(fileUrl(base, file), file);
      if (fig) plots.append(fig);
    } else {
      // study.md, best.yaml, trials.csv: shown as text on demand (fetched with the key).
      const pre = el("pre", { class: "output" });
      const box = el("details", {}, el("summary", {}, file), pre);
      box.addEventListener("toggle", async () => {
        if (!box.open || pre.textContent) return;
        const r = await fetch(fileUrl(base, file), { headers: headers(false) });
        pre.textContent = r.ok ? await r.text() : "could not read " + file;
      });
      files.append(box);
    }
  }
}

// ------------------------------------------------------------------------------------------ start
function showTab(name) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== "tab-" + name;
  document.body.dataset.tab = name;
}

async function loadWorkspace() {
  const ws = await getJSON("/api/workspace");
  $("workspace").textContent = ws.workspace;
  $("workspace").title = ws.workspace;
  selectOptions($("data-file"), ["", ...ws.files.map((f) => f.path)], true);
  state.runs = ws.runs || [];
  state.studies = ws.studies || [];
  renderRuns();
  renderStudies();
}

function describeTask() {
  const task = (state.schema.tasks || []).find((t) => t.name === $("task").value);
  $("task-description").textContent = task ? task.description : "";
}

async function load() {
  try {
    state.schema = await getJSON("/api/schema");
    selectOptions($("task"), state.schema.tasks.map((t) => t.name), true);
    $("models").replaceChildren(...state.schema.models.map((m) => el("option", { value: m.name }, m.description || "")));
    if (!$("model").value && state.schema.models.length) $("model").value = state.schema.models[0].name;
    describeTask();
    buildForm();
    await loadWorkspace();
    await loadRuns();
    setStatus("");
    document.body.dataset.ready = "1";
  } catch (e) {
    showError(e);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  rememberApiKey(sessionStorage, KEY_STORE, load);
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("task").addEventListener("change", describeTask);
  action($("upload-btn"), upload);
  action($("inspect-btn"), inspect);
  action($("config-btn"), validateConfig);
  action($("plan-btn"), planConfig);
  action($("launch-btn"), launch);
  action($("runs-refresh"), loadRuns);
  action($("run-stop"), stopRun);
  action($("run-resume"), resumeRun);
  action($("run-open-report"), async () => { showTab("report"); await openReport(state.view.name); });
  action($("run-open-try"), async () => { $("try-run").value = state.view.name; updateTryKind(); showTab("try"); });
  action($("compare-btn"), compare);
  action($("report-btn"), () => openReport());
  action($("try-send"), sendTry);
  action($("export-btn"), exportRun);
  $("try-run").addEventListener("change", () => { state.chat = []; $("chat-log").replaceChildren(); updateTryKind(); });
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-reset").addEventListener("click", () => { state.chat = []; $("chat-log").replaceChildren(); });
  showTab("data");
  load();
});
