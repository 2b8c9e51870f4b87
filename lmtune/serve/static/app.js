// The lmtune page: a playground for the served model and a view of its run. Plain JS, no dependencies:
// everything is fetched from this server, with the API key (if the server has one) as a Bearer token
// (common/apikey.js, loaded first: apiKey, headers, ApiError, needsApiKey, rememberApiKey).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, chat: [] };

function setStatus(text) { $("status").textContent = text || ""; }

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error.message;
  } catch (e) { /* not JSON */ }
  return response.status + " " + response.statusText;
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers(false) });
  if (!r.ok) throw new ApiError(await errorText(r), "", r.status);
  return r.json();
}

async function postJSON(path, body) {
  const r = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!r.ok) throw new ApiError(await errorText(r), "", r.status);
  return r.json();
}

// Reads a server-sent event stream of OpenAI chunks; calls onChunk(parsed) for each `data:` event.
async function streamJSON(path, body, onChunk) {
  const r = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!r.ok) throw new ApiError(await errorText(r), "", r.status);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new Error(parsed.error.message);
        onChunk(parsed);
      }
    }
  }
}

function numberOr(id, fallback) {
  const v = parseFloat($(id).value);
  return Number.isFinite(v) ? v : fallback;
}

// ------------------------------------------------------------------------------------------ chat
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  addMessage("user", text);
  state.chat.push({ role: "user", content: text });
  const system = $("chat-system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.chat);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  $("chat-send").disabled = true;
  setStatus("");
  let answer = "";
  try {
    await streamJSON("/v1/chat/completions", {
      model: state.info.model, messages, stream: true,
      max_tokens: numberOr("chat-max-tokens", 128), temperature: numberOr("chat-temperature", 0),
    }, (chunk) => {
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) { answer += delta.content; bubble.textContent = answer; }
    });
    state.chat.push({ role: "assistant", content: answer });
  } catch (e) {
    state.chat.pop();  // the message was not answered: it is not part of the conversation
    bubble.className = "msg error";
    bubble.textContent = "error: " + e.message;
  } finally {
    bubble.classList.remove("streaming");
    bubble.classList.add("done");
    $("chat-send").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------ completion
async function sendCompletion() {
  const prompt = $("complete-input").value;
  if (!prompt.trim()) return;
  const out = $("complete-output");
  out.textContent = "";
  $("complete-send").disabled = true;
  try {
    await streamJSON("/v1/completions", {
      model: state.info.model, prompt, stream: true,
      max_tokens: numberOr("complete-max-tokens", 64), temperature: numberOr("complete-temperature", 0),
    }, (chunk) => { if (chunk.choices.length) out.textContent += chunk.choices[0].text; });
  } catch (e) {
    setStatus("error: " + e.message);
  } finally {
    $("complete-send").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------ classify
// A text with each word's background coloured by its attribution: green for evidence for the explained
// label, red against it, stronger for larger scores (in [-1, 1]); the score shows on hover.
function attributedText(text, row) {
  const box = document.createElement("div");
  box.className = "attributions";
  let at = 0;
  for (const w of row.word_attributions || []) {
    if (w.segment) continue;  // a second text's words (text-pair models): not shown here
    if (w.start > at) box.appendChild(document.createTextNode(text.slice(at, w.start)));
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = text.slice(w.start, w.end);
    const alpha = Math.min(1, Math.abs(w.score)) * 0.75;
    span.style.background = (w.score >= 0 ? "rgba(26, 150, 65, " : "rgba(215, 48, 39, ") + alpha.toFixed(3) + ")";
    span.title = w.word + ": " + w.score.toFixed(3);
    box.appendChild(span);
    at = Math.max(at, w.end);
  }
  if (at < text.length) box.appendChild(document.createTextNode(text.slice(at)));
  const legend = document.createElement("span");
  legend.className = "legend";
  const e = row.explained || {};
  legend.textContent = "attributions towards " + e.label + " (green: for, red: against); convergence delta " +
    (typeof e.convergence_delta === "number" ? e.convergence_delta.toExponential(1) : "–") + " of a score change " +
    (typeof e.score_change === "number" ? e.score_change.toFixed(3) : "–");
  box.appendChild(legend);
  return box;
}

async function sendClassify() {
  const texts = $("classify-input").value.split("\n").map((t) => t.trim()).filter((t) => t);
  if (!texts.length) return;
  const table = $("classify-results");
  const explain = state.info.explain && $("classify-explain").checked;
  if (explain && texts.length > state.info.limits.explain_items) {
    setStatus("this server explains at most " + state.info.limits.explain_items + " texts at once");
    return;
  }
  $("classify-send").disabled = true;
  setStatus("");
  try {
    const body = { model: state.info.model, input: texts };
    if (explain) body.explain = true;
    const result = await postJSON("/v1/classify", body);
    table.replaceChildren();
    const head = table.insertRow();
    for (const h of ["text", "label", "probabilities"]) {
      const th = document.createElement("th"); th.textContent = h; head.appendChild(th);
    }
    for (const row of result.data) {
      const tr = table.insertRow();
      tr.className = "prediction";
      const cell = tr.insertCell();
      if (row.word_attributions) cell.appendChild(attributedText(texts[row.index], row));
      else cell.textContent = texts[row.index];
      const label = tr.insertCell();
      label.className = "label";
      label.textContent = row.labels ? row.labels.join(", ") : row.label + " (" + row.score.toFixed(3) + ")";
      const probs = tr.insertCell();
      for (const [name, p] of Object.entries(row.probabilities)) {
        const line = document.createElement("div");
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.style.width = Math.round(p * 120) + "px";
        line.appendChild(bar);
        line.appendChild(document.createTextNode(name + " " + p.toFixed(3)));
        probs.appendChild(line);
      }
    }
  } catch (e) {
    setStatus("error: " + e.message);
  } finally {
    $("classify-send").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------ other tasks
async function sendPredict() {
  let input;
  try {
    input = JSON.parse($("predict-input").value);
  } catch (e) {
    setStatus("the input must be JSON: " + e.message);
    return;
  }
  $("predict-send").disabled = true;
  try {
    const result = await postJSON(state.info.endpoints[state.info.endpoints.length - 1], { input });
    $("predict-output").textContent = JSON.stringify(result.data, null, 2);
    setStatus("");
  } catch (e) {
    setStatus("error: " + e.message);
  } finally {
    $("predict-send").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------ run view
function fmt(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(4);
  return v === null || v === undefined ? "–" : String(v);
}

function showMetrics(metrics) {
  const table = $("metrics-table");
  table.replaceChildren();
  const columns = [];
  const start = metrics.starting_point || {};
  for (const split of ["test", "validation"]) {
    if (start[split]) columns.push(["before: " + split, start[split]]);
    if (metrics[split]) columns.push([split, metrics[split]]);
  }
  if (!columns.length) {
    table.insertRow().insertCell().textContent = "no metrics (a bare model folder)";
    return;
  }
  const keys = [];
  for (const [, values] of columns) {
    for (const [k, v] of Object.entries(values)) if (typeof v === "number" && !keys.includes(k)) keys.push(k);
  }
  const head = table.insertRow();
  for (const h of ["metric"].concat(columns.map((c) => c[0]))) {
    const th = document.createElement("th"); th.textContent = h; head.appendChild(th);
  }
  for (const k of keys) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    for (const [, values] of columns) {
      const td = tr.insertCell(); td.className = "num"; td.textContent = fmt(values[k]);
    }
  }
}

async function showPlots(names) {
  const box = $("plots");
  box.replaceChildren();
  if (!names.length) box.textContent = "no plots";
  for (const name of names) {
    // Fetched with the key (an <img src> cannot send headers), shown from a blob URL.
    const r = await fetch("/v1/run/plots/" + encodeURIComponent(name), { headers: headers(false) });
    if (!r.ok) continue;
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = name;
    img.src = URL.createObjectURL(await r.blob());
    const cap = document.createElement("figcaption");
    cap.textContent = name;
    fig.append(img, cap);
    box.appendChild(fig);
  }
}

// ------------------------------------------------------------------------------------------ start
async function load() {
  try {
    const info = await getJSON("/v1/run");
    state.info = info;
    setStatus("");
    $("model-name").textContent = info.model;
    $("model-task").textContent = info.task;
    $("chat-panel").hidden = !info.chat;
    $("complete-panel").hidden = !(info.generative && !info.chat);
    // Panels follow the endpoints the model serves (its task's), never the task's name.
    const classify = info.endpoints.includes("/v1/classify");
    $("classify-panel").hidden = !classify;
    $("classify-explain-box").hidden = !(classify && info.explain);
    const other = !info.generative && !classify;
    $("predict-panel").hidden = !other;
    if (other) {
      const qa = info.endpoints.includes("/v1/qa");
      $("predict-help").textContent = "Input (JSON): " + (qa ? 'a list of {"question": ..., "context": ...}'
        : "a list of texts") + "; sent to " + info.endpoints[info.endpoints.length - 1];
      $("predict-input").value = qa ? '[{"question": "Who wrote it?", "context": "It was written by Ann."}]'
        : '["a text"]';
    }
    $("chat-max-tokens").value = Math.min(128, info.limits.max_tokens);
    $("config").textContent = info.config || "(no config.yaml: a bare model folder)";
    showMetrics(info.metrics || {});
    await showPlots(info.plots || []);
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus(needsApiKey(e) ? "This server needs an API key: enter it above." : "error: " + e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  rememberApiKey(localStorage, "lmtune-api-key", load);
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
      $("tab-playground").hidden = tab.dataset.tab !== "playground";
      $("tab-run").hidden = tab.dataset.tab !== "run";
    });
  }
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-reset").addEventListener("click", () => { state.chat = []; $("chat-log").replaceChildren(); });
  $("complete-send").addEventListener("click", sendCompletion);
  $("classify-send").addEventListener("click", sendClassify);
  $("predict-send").addEventListener("click", sendPredict);
  load();
});
