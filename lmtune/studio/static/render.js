// lmtune studio: the page's drawing helpers (DOM tables, SVG charts drawn here, a markdown renderer). Loaded
// before app.js; plain JS, no dependencies. Text from files is only ever put on the page as text nodes.
"use strict";

const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#0b7285", "#c2255c", "#5c7cfa"];

// ------------------------------------------------------------------------------------------ DOM helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-") || k === "title" || k === "type" || k === "value") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return v.toLocaleString("en");
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(2) : String(Number(v.toPrecision(4)));
  }
  if (Array.isArray(v)) return JSON.stringify(v);
  if (typeof v === "object") return Object.entries(v).map(([k, x]) => k + " " + fmt(x)).join(", ");
  return String(v);
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  const gib = n / 2 ** 30;
  return gib >= 1 ? gib.toFixed(2) + " GiB" : (n / 2 ** 20).toFixed(1) + " MiB";
}

function duration(s) {
  if (typeof s !== "number" || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
}

// A table from a header and rows of cells (strings, numbers or nodes).
function fillTable(table, header, rows, rowAttrs) {
  table.replaceChildren();
  table.append(el("tr", {}, ...header.map((h) => el("th", {}, h))));
  rows.forEach((row, i) => {
    const tr = el("tr", rowAttrs ? rowAttrs(i) : {});
    for (const cell of row) {
      const td = el("td", typeof cell === "number" ? { class: "num" } : {});
      td.append(cell instanceof Node ? cell : fmt(cell));
      tr.append(td);
    }
    table.append(tr);
  });
}

// ------------------------------------------------------------------------------------------ SVG chart
const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

// Draws series [{name, points: [[x, y], ...]}] on one pair of axes (shared by every series).
function drawChart(svg, series, { width = 480, height = 240, xLabel = "step" } = {}) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const pts = series.flatMap((s) => s.points).filter((p) => isFinite(p[0]) && isFinite(p[1]));
  svg.dataset.points = String(pts.length);
  if (!pts.length) {
    const t = svgEl("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis" });
    t.textContent = "no points yet";
    svg.append(t);
    return;
  }
  const m = { l: 52, r: 10, t: 10, b: 44 };
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (width - m.l - m.r);
  const Y = (y) => height - m.b - ((y - y0) / (y1 - y0)) * (height - m.t - m.b);
  svg.append(svgEl("line", { x1: m.l, y1: height - m.b, x2: width - m.r, y2: height - m.b, class: "axis-line" }));
  svg.append(svgEl("line", { x1: m.l, y1: m.t, x2: m.l, y2: height - m.b, class: "axis-line" }));
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4, xv = x0 + ((x1 - x0) * i) / 4;
    const ty = svgEl("text", { x: m.l - 4, y: Y(yv) + 4, "text-anchor": "end", class: "axis" });
    ty.textContent = Math.abs(yv) >= 100 ? yv.toFixed(0) : yv.toPrecision(3);
    const tx = svgEl("text", { x: X(xv), y: height - m.b + 14, "text-anchor": "middle", class: "axis" });
    tx.textContent = Number.isInteger(xv) ? String(xv) : xv.toFixed(1);
    svg.append(ty, tx, svgEl("line", { x1: m.l, x2: width - m.r, y1: Y(yv), y2: Y(yv), class: "grid" }));
  }
  const xl = svgEl("text", { x: (width + m.l) / 2, y: height - 18, "text-anchor": "middle", class: "axis" });
  xl.textContent = xLabel;
  svg.append(xl);
  let legendX = m.l;
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const p = s.points.filter((q) => isFinite(q[0]) && isFinite(q[1]));
    if (p.length) {
      svg.append(svgEl("polyline", { points: p.map((q) => X(q[0]) + "," + Y(q[1])).join(" "), fill: "none",
        stroke: color, "stroke-width": 2, "data-series": s.name }));
      for (const q of p.length < 40 ? p : []) svg.append(svgEl("circle", { cx: X(q[0]), cy: Y(q[1]), r: 2.5, fill: color }));
    }
    const lg = svgEl("text", { x: legendX, y: height - 3, fill: color, class: "legend" });
    lg.textContent = "■ " + s.name;
    svg.append(lg);
    legendX += 14 + 7 * (s.name.length + 2);
  });
}

// ------------------------------------------------------------------------------------------ markdown
// A small renderer for the report's markdown (headings, tables, lists, images, paragraphs, `code`, **bold**):
// it builds DOM nodes, so nothing in the text can become markup. Images come from imageFor(path, alt).
function inline(text) {
  const frag = document.createDocumentFragment();
  const re = /(\*\*[^*]+\*\*|`[^`]+`)/g;
  let last = 0, m;
  while ((m = re.exec(text))) {
    if (m.index > last) frag.append(text.slice(last, m.index));
    const tok = m[0];
    frag.append(tok.startsWith("**") ? el("strong", {}, tok.slice(2, -2)) : el("code", {}, tok.slice(1, -1)));
    last = m.index + tok.length;
  }
  if (last < text.length) frag.append(text.slice(last));
  return frag;
}

function renderMarkdown(md, imageFor) {
  const out = document.createDocumentFragment();
  const lines = md.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if (!line.trim()) continue;
    if (line.startsWith("```")) {
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      out.append(el("pre", { class: "output" }, code.join("\n")));
    } else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      out.append(el("h" + Math.min(6, m[1].length + 1), {}, inline(m[2])));
    } else if ((m = /^!\[([^\]]*)\]\(([^)\s]+)\)\s*$/.exec(line))) {
      const holder = el("div", { class: "plots" });
      out.append(holder);
      imageFor(m[2], m[1]).then((fig) => { if (fig) holder.append(fig); });
    } else if (line.trim().startsWith("|")) {
      const rows = [];
      for (; i < lines.length && lines[i].trim().startsWith("|"); i++) rows.push(lines[i]);
      i--;
      const cells = (r) => r.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const table = el("table", { class: "results" });
      rows.forEach((r, k) => {
        if (k === 1 && /^[\s|:-]+$/.test(r)) return;
        table.append(el("tr", {}, ...cells(r).map((c) => el(k === 0 ? "th" : "td", {}, inline(c)))));
      });
      out.append(table);
    } else if (/^\s*[-*]\s+/.test(line)) {
      const ul = el("ul");
      for (; i < lines.length && /^\s*[-*]\s+/.test(lines[i]); i++) ul.append(el("li", {}, inline(lines[i].replace(/^\s*[-*]\s+/, ""))));
      i--;
      out.append(ul);
    } else {
      const para = [line];
      for (i++; i < lines.length && lines[i].trim() && !/^(#|\||!\[|```|\s*[-*]\s)/.test(lines[i]); i++) para.push(lines[i]);
      i--;
      out.append(el("p", {}, inline(para.join(" "))));
    }
  }
  return out;
}
