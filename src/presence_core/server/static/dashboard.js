// presence-core dashboard: polls GET /api/dashboard about once a second and draws it.
//
// One request loop and nothing else talks to the server.  The topic list and a topic's
// members ride on that same request (?topics=... / ?topic=...&cursor=...), but only every
// TOPICS_EVERY_MS, or at once when the operator types a filter or turns a page, so the page
// costs the server one small overview a second.
//
// Nothing received is ever parsed as HTML: every value goes in through textContent or an
// attribute, so a topic or a meta holding markup shows as text.
"use strict";

const POLL_MS = 1000;
const TOPICS_EVERY_MS = 5000;
const FETCH_TIMEOUT_MS = 4000;
const STALE_AFTER_MS = 3500;
const FILTER_DEBOUNCE_MS = 300;
const HISTORY_SPAN_S = 300;  // the widest window a chart shows
const MIN_SPAN_S = 60;  // and the narrowest, so a fresh server's few points are not squeezed
const OP_KINDS = ["track", "update", "untrack", "heartbeat", "disconnect"];
const COLORS = { p50: "#4cc38a", p95: "#f0b541", p99: "#f0605d", ops: "#5fb3f9",
  connections: "#b48cf2", presences: "#5fb3f9" };

// --- formatting ---------------------------------------------------------------------------

const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const oneDecimal = new Intl.NumberFormat("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
const twoDecimals = new Intl.NumberFormat("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });

/** A finite number, or null for anything else (missing, null, a string, NaN). */
function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function fmtInt(value) {
  const n = num(value);
  return n === null ? "–" : intFormat.format(n);
}

/** A rate: one decimal below 100/s, whole numbers above. */
function fmtRate(value) {
  const n = num(value);
  if (n === null) return "–";
  return Math.abs(n) < 100 ? oneDecimal.format(n) : intFormat.format(n);
}

/** Milliseconds: two decimals below 10 ms, one above. */
function fmtMs(value, unit = " ms") {
  const n = num(value);
  if (n === null) return "–";
  return (Math.abs(n) < 10 ? twoDecimals.format(n) : oneDecimal.format(n)) + unit;
}

function fmtSeconds(value) {
  const n = num(value);
  if (n === null) return "–";
  return n < 10 ? twoDecimals.format(n) + " s" : oneDecimal.format(n) + " s";
}

function pad2(n) {
  return String(n).padStart(2, "0");
}

/** Unix seconds as local hh:mm:ss (hh:mm with short=true). */
function fmtClock(unixSeconds, short = false) {
  const n = num(unixSeconds);
  if (n === null) return "–";
  const d = new Date(n * 1000);
  const hm = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  return short ? hm : `${hm}:${pad2(d.getSeconds())}`;
}

function fmtDuration(seconds) {
  const n = num(seconds);
  if (n === null || n < 0) return "–";
  const s = Math.floor(n);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${pad2(m)}m`;
  if (m > 0) return `${m}m ${pad2(sec)}s`;
  return `${sec}s`;
}

// --- DOM helpers --------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** Build an element: attrs may hold class, text, data-* and plain attributes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = String(value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Show a figure: its text formatted, its raw number in data-value ("" when missing). */
function setFigure(id, value, format = fmtInt) {
  const node = $(id);
  if (!node) return;
  const n = num(value);
  const raw = n === null ? "" : String(n);
  if (node.getAttribute("data-value") !== raw) node.setAttribute("data-value", raw);
  const text = format(n);
  if (node.textContent !== text) node.textContent = text;
}

function setText(id, text) {
  const node = $(id);
  if (node && node.textContent !== text) node.textContent = text;
}

/** Replace a tbody's rows; an empty list shows one muted row saying so. */
function fillRows(tbody, rows, columns, emptyText) {
  if (rows.length === 0) {
    rows = [el("tr", {}, el("td", { class: "empty", colspan: columns, text: emptyText }))];
  }
  tbody.replaceChildren(...rows);
}

function asArray(value) {
  return Array.isArray(value) ? value : [];
}

function asObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value) ? value : {};
}

// --- the chart ----------------------------------------------------------------------------
//
// A line chart over time, drawn from scratch on a canvas: y from 0 to a rounded maximum with
// grid lines and labels, x over a fixed window ending at the newest point with clock labels,
// one line per series with a gap wherever a value is null (a lone value between gaps is drawn
// as a dot), and a legend along the top.  The canvas is sized in device pixels so that lines
// are sharp on high-density screens.

/** Round a step up to 1, 2 or 5 times a power of ten. */
function niceStep(rough) {
  if (!(rough > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(rough)));
  const fraction = rough / power;
  return (fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10) * power;
}

function yTicks(max, count = 5) {
  const step = niceStep(max / count);
  const top = Math.max(step, Math.ceil(max / step) * step);
  const ticks = [];
  for (let i = 0; i * step <= top + step / 2; i++) ticks.push(i * step);
  // as many decimals as the step needs, and no more (0, 0.5, 1 rather than 0.00, 0.50, 1.00)
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  const format = new Intl.NumberFormat("en-US", { minimumFractionDigits: decimals, maximumFractionDigits: decimals });
  return { top, ticks, label: (v) => format.format(v) };
}

const X_STEPS = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];

/**
 * Draw `series` ([{name, color, values}]) against `times` (unix seconds) on `canvas`.
 * Returns how many time points had at least one value drawn.
 */
function drawChart(canvas, times, series, { yFormat = fmtInt, unit = "" } = {}) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (width === 0 || height === 0) return 0;
  const pxWidth = Math.round(width * dpr), pxHeight = Math.round(height * dpr);
  if (canvas.width !== pxWidth) canvas.width = pxWidth;
  if (canvas.height !== pxHeight) canvas.height = pxHeight;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const style = getComputedStyle(document.documentElement);
  const muted = style.getPropertyValue("--muted").trim() || "#8a96a3";
  const line = style.getPropertyValue("--line").trim() || "#263039";
  const font = "11px " + (style.getPropertyValue("--mono").trim() || "monospace");

  // y range over every value drawn
  let max = 0, drawn = 0;
  for (let i = 0; i < times.length; i++) {
    let any = false;
    for (const s of series) {
      const v = num(s.values[i]);
      if (v !== null) { any = true; if (v > max) max = v; }
    }
    if (any && num(times[i]) !== null) drawn++;
  }
  const { top, ticks, label: tickLabel } = yTicks(max > 0 ? max : 1);
  ctx.font = font;
  const labelWidth = Math.max(...ticks.map((v) => ctx.measureText(tickLabel(v)).width));
  const plot = { left: Math.ceil(labelWidth) + 14, right: width - 10, top: 26, bottom: height - 22 };
  const plotW = plot.right - plot.left, plotH = plot.bottom - plot.top;

  // The window ends at the newest point and reaches back over the history held, within bounds.
  const lastT = num(times[times.length - 1]) ?? Date.now() / 1000;
  const firstT = num(times[0]) ?? lastT;
  const span = Math.min(HISTORY_SPAN_S, Math.max(MIN_SPAN_S, lastT - firstT));
  const t0 = lastT - span;
  const x = (t) => plot.left + ((t - t0) / span) * plotW;
  const y = (v) => plot.bottom - (v / top) * plotH;

  // y grid and labels
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const v of ticks) {
    const py = Math.round(y(v)) + 0.5;
    ctx.strokeStyle = line;
    ctx.beginPath(); ctx.moveTo(plot.left, py); ctx.lineTo(plot.right, py); ctx.stroke();
    ctx.fillStyle = muted;
    ctx.fillText(tickLabel(v), plot.left - 6, py);
  }
  if (unit) {
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillText(unit, 2, plot.top - 10);
  }

  // x ticks on round clock times
  const xStep = X_STEPS.find((s) => span / s <= 6) ?? X_STEPS[X_STEPS.length - 1];
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.strokeStyle = muted;
  for (let t = Math.ceil(t0 / xStep) * xStep; t <= lastT; t += xStep) {
    const px = Math.round(x(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(px, plot.bottom); ctx.lineTo(px, plot.bottom + 4); ctx.stroke();
    const text = fmtClock(t, xStep >= 60);
    const half = ctx.measureText(text).width / 2;
    if (px - half < 0 || px + half > width) continue;  // a label the edge would cut
    ctx.fillStyle = muted;
    ctx.fillText(text, px, plot.bottom + 6);
  }
  // the axes themselves
  ctx.beginPath();
  ctx.moveTo(plot.left + 0.5, plot.top); ctx.lineTo(plot.left + 0.5, plot.bottom + 0.5);
  ctx.lineTo(plot.right, plot.bottom + 0.5);
  ctx.stroke();

  // the lines, clipped to the plot, broken at nulls
  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.left, plot.top - 2, plotW, plotH + 4);
  ctx.clip();
  ctx.lineWidth = 1.6;
  ctx.lineJoin = "round";
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.beginPath();
    let open = false;
    for (let i = 0; i < times.length; i++) {
      const t = num(times[i]), v = num(s.values[i]);
      if (t === null || v === null || t < t0) { open = false; continue; }
      const px = x(t), py = y(v);
      const next = i + 1 < times.length ? num(s.values[i + 1]) : null;
      if (!open && next === null) {
        // a lone value between gaps: a dot, since a line needs two points
        ctx.moveTo(px + 2.2, py);
        ctx.arc(px, py, 2.2, 0, Math.PI * 2);
        ctx.fill();
        ctx.beginPath();
        continue;
      }
      if (open) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      open = true;
    }
    ctx.stroke();
  }
  ctx.restore();

  // legend, with each series' newest value
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let lx = Math.max(plot.left + 4, unit ? ctx.measureText(unit).width + 12 : 0);
  for (const s of series) {
    let latest = null;
    for (let i = s.values.length - 1; i >= 0 && latest === null; i--) latest = num(s.values[i]);
    const label = `${s.name} ${latest === null ? "–" : yFormat(latest)}`;
    ctx.fillStyle = s.color;
    ctx.fillRect(lx, 8, 10, 3);
    ctx.fillStyle = muted;
    ctx.fillText(label, lx + 14, 10);
    lx += 14 + ctx.measureText(label).width + 16;
  }
  if (drawn === 0) {
    ctx.textAlign = "center";
    ctx.fillStyle = muted;
    ctx.fillText("no data yet", plot.left + plotW / 2, plot.top + plotH / 2);
  }
  canvas.setAttribute("data-points", String(drawn));
  return drawn;
}

// --- state --------------------------------------------------------------------------------

const state = {
  last: null,            // the newest overview received
  lastOkAt: 0,           // Date.now() of the newest successful fetch
  failure: null,         // the newest fetch's error, null after a success
  timer: null,
  inFlight: false,
  again: false,          // a refresh was asked for while a fetch was in flight
  topicsDue: true,       // the next request asks for the topic list (and members)
  generation: 0,         // bumped by each filter, page or topic change: older answers are dropped
  lastTopicsAt: 0,
  filter: "",
  offset: 0,
  topic: null,           // the topic whose members are shown
  cursor: null,          // the cursor of the members page shown
  cursors: [],           // the cursors of the pages before it, for prev
};

// serve --dashboard-token: the page is opened as /?token=..., and every request carries it.
const TOKEN = new URLSearchParams(location.search).get("token");

function browserOpen() {
  return $("browser").open;
}

function requestUrl() {
  const params = new URLSearchParams();
  if (state.topicsDue && browserOpen()) {
    params.set("topics", state.filter);
    if (state.offset > 0) params.set("topics_offset", String(state.offset));
    if (state.topic !== null) {
      params.set("topic", state.topic);
      if (state.cursor !== null) params.set("cursor", state.cursor);
    }
  }
  const query = params.toString();
  return "/api/dashboard" + (query ? "?" + query : "");
}

// --- the request loop ---------------------------------------------------------------------

function schedule(delay) {
  clearTimeout(state.timer);
  state.timer = setTimeout(poll, delay);
}

/** Fetch now (topic list included): after typing, paging or a click. */
function refreshNow() {
  state.generation++;
  state.topicsDue = true;
  if (state.inFlight) state.again = true;
  else schedule(0);
}

async function poll() {
  clearTimeout(state.timer);
  if (state.inFlight) return;
  state.inFlight = true;
  if (Date.now() - state.lastTopicsAt >= TOPICS_EVERY_MS) state.topicsDue = true;
  const askedTopics = state.topicsDue && browserOpen();
  const generation = state.generation;
  const started = Date.now();
  const abort = new AbortController();
  const timeout = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    const headers = TOKEN === null ? {} : { Authorization: `Bearer ${TOKEN}` };
    const response = await fetch(requestUrl(), { cache: "no-store", signal: abort.signal, headers });
    if (response.status === 401) throw new Error("unauthorized: open this page as /?token=<the dashboard token>");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    const current = askedTopics && generation === state.generation;
    if (current) {
      state.topicsDue = false;
      state.lastTopicsAt = started;
    }
    state.last = data;
    state.lastOkAt = Date.now();
    state.failure = null;
    render(data, current);
  } catch (err) {
    state.failure = err && err.name === "AbortError" ? "timed out" : String((err && err.message) || err);
  } finally {
    clearTimeout(timeout);
    state.inFlight = false;
    renderLink();
  }
  if (state.again) {
    state.again = false;
    schedule(0);
  } else {
    schedule(Math.max(0, POLL_MS - (Date.now() - started)));
  }
}

// --- rendering ----------------------------------------------------------------------------

function renderLink() {
  const link = $("link");
  let stateName, text, title = "";
  if (state.failure !== null) {
    stateName = "offline";
    text = state.lastOkAt ? `offline, last data ${fmtDuration((Date.now() - state.lastOkAt) / 1000)} ago` : "offline";
    title = state.failure;
  } else if (!state.lastOkAt) {
    stateName = "connecting";
    text = "connecting…";
  } else if (Date.now() - state.lastOkAt > STALE_AFTER_MS) {
    stateName = "stale";
    text = `stale, ${fmtDuration((Date.now() - state.lastOkAt) / 1000)} old`;
  } else {
    stateName = "live";
    text = "live";
  }
  if (link.getAttribute("data-state") !== stateName) link.setAttribute("data-state", stateName);
  if (link.textContent !== text) link.textContent = text;
  link.title = title;
  document.body.classList.toggle("offline", stateName === "offline" || stateName === "stale");
}

/** Draw an answer; `browse` says whether its topic list and members answer the current view. */
function render(data, browse) {
  data = asObject(data);
  renderHeader(data);
  renderFigures(data);
  renderCharts(data);
  renderRedis(data);
  renderLimits(data);
  renderScaler(data);
  if (browse && "topics" in data) renderTopics(data.topics);
  if (browse && "members" in data) renderMembers(data.members);
}

function renderHeader(data) {
  setText("node", typeof data.node === "string" ? data.node : "–");
  setText("version", typeof data.version === "string" ? data.version : "–");
  const now = num(data.now), started = num(data.started);
  setFigure("uptime", now !== null && started !== null ? now - started : null, fmtDuration);
  const accepting = $("accepting");
  const value = typeof data.accepting === "boolean" ? String(data.accepting) : "";
  accepting.setAttribute("data-value", value);
  accepting.textContent = value === "true" ? "accepting" : value === "false" ? "stopping" : "–";
  accepting.className = "badge " + (value === "true" ? "ok" : value === "false" ? "warn" : "");
  const updated = $("updated");
  updated.setAttribute("data-now", now === null ? "" : String(now));
  updated.textContent = fmtClock(now);
  if (typeof data.node === "string") document.title = `presence-core · ${data.node}`;
}

function renderFigures(data) {
  const totals = asObject(data.totals);
  for (const id of ["connections", "presences", "topics", "pending_changes", "expiries", "hook_errors"]) {
    setFigure(id, totals[id]);
  }
  $("hook_errors").classList.toggle("alert", (num(totals.hook_errors) ?? 0) > 0);

  const ops = asObject(data.ops);
  let perSecond = 0, anyRate = false;
  for (const kind of OP_KINDS) {
    const op = asObject(ops[kind]);
    setFigure(`ops-${kind}-total`, op.total);
    setFigure(`ops-${kind}-per_s`, op.per_s, fmtRate);
    if (num(op.per_s) !== null) { perSecond += op.per_s; anyRate = true; }
  }
  setFigure("ops_per_s", anyRate ? perSecond : null, fmtRate);

  const diff = asObject(data.diff);
  setFigure("diff-count", diff.count);
  setFigure("diff-p50", diff.p50_ms, fmtMs);
  setFigure("diff-p95", diff.p95_ms, fmtMs);
  setFigure("diff-p99", diff.p99_ms, fmtMs);
}

function renderCharts(data) {
  const history = asObject(data.history);
  const times = asArray(history.t);
  const msFormat = (v) => fmtMs(v, "");
  drawChart($("diff-chart"), times, [
    { name: "p50", color: COLORS.p50, values: asArray(history.p50_ms) },
    { name: "p95", color: COLORS.p95, values: asArray(history.p95_ms) },
    { name: "p99", color: COLORS.p99, values: asArray(history.p99_ms) },
  ], { yFormat: msFormat, unit: "ms" });
  drawChart($("ops-chart"), times, [
    { name: "ops/s", color: COLORS.ops, values: asArray(history.ops_per_s) },
  ], { yFormat: fmtRate });
  drawChart($("load-chart"), times, [
    { name: "connections", color: COLORS.connections, values: asArray(history.connections) },
    { name: "presences", color: COLORS.presences, values: asArray(history.presences) },
  ], { yFormat: fmtInt });
}

function kvTable(pairs) {
  return el("table", { class: "kv" }, el("tbody", {}, ...pairs.map(([label, value, cls]) =>
    el("tr", {}, el("th", { text: label }), el("td", { class: cls, text: value })))));
}

function renderRedis(data) {
  const box = $("redis");
  const body = $("redis-body");
  const redis = data.redis;
  if (redis === null || typeof redis !== "object") {
    box.setAttribute("data-connected", "");
    body.replaceChildren(el("p", { class: "empty", text: "in-process state, no Redis" }));
  } else {
    const connected = redis.connected === true;
    box.setAttribute("data-connected", String(connected));
    const badge = el("span", { class: "badge " + (connected ? "ok" : "bad"),
      text: connected ? "connected" : "disconnected" });
    const layout = typeof redis.layout === "string" ? redis.layout : "–";
    body.replaceChildren(
      el("p", {}, badge, " ", el("span", { class: "redis-url",
        text: (typeof redis.url === "string" ? redis.url : "–") + (redis.cluster === true ? " (cluster)" : "") })),
      kvTable([
        ["layout", layout],
        ["flush lag", fmtSeconds(redis.flush_lag_s)],
        ["pending writes", fmtInt(redis.pending)],
        ["errors", fmtInt(redis.errors)],
        ["reconnects", fmtInt(redis.reconnects)],
      ]),
    );
  }
  const peers = asArray(data.peers).map((peer) => {
    peer = asObject(peer);
    const live = peer.live === true;
    return el("tr", { "data-node": String(peer.node ?? ""), "data-live": String(live) },
      el("th", { text: typeof peer.node === "string" ? peer.node : "–" }),
      el("td", {}, el("span", { class: "badge " + (live ? "ok" : "bad"), text: live ? "live" : "lapsed" })),
      el("td", { text: fmtInt(peer.presences) }));
  });
  fillRows($("peers").tBodies[0], peers, 3, redis ? "no other process" : "no peers without Redis");
}

function renderLimits(data) {
  const rows = asArray(data.limits).map((hit) => {
    hit = asObject(hit);
    const name = typeof hit.limit === "string" ? hit.limit : "–";
    const total = num(hit.total);
    return el("tr", { "data-limit": name, "data-total": total === null ? "" : String(total) },
      el("th", { text: name }),
      el("td", { text: fmtInt(total) }),
      el("td", { text: fmtInt(hit.last_minute) }),
      el("td", { text: fmtClock(hit.last_at) }));
  });
  fillRows($("limits").tBodies[0], rows, 4, "no limit hit");
}

function renderScaler(data) {
  const box = $("scaler");
  const scaler = data.scaler;
  const tbody = $("scaler-decisions").tBodies[0];
  if (scaler === null || typeof scaler !== "object") {
    box.setAttribute("data-configured", "false");
    setText("scaler-interval", "");
    fillRows(tbody, [], 4, "no scaler configured");
    return;
  }
  box.setAttribute("data-configured", "true");
  const interval = num(scaler.interval_s);
  setText("scaler-interval", interval === null ? "" : `every ${oneDecimal.format(interval)} s`);
  const rows = asArray(scaler.decisions).map((decision) => {
    decision = asObject(decision);
    const action = typeof decision.action === "string" ? decision.action : "–";
    return el("tr", { "data-action": action },
      el("td", { text: fmtClock(decision.at) }),
      el("td", {}, el("span", { class: "action", "data-action": action, text: action.replace("_", " ") })),
      el("td", { text: `${fmtInt(decision.desired)} / ${fmtInt(decision.current)}` }),
      el("td", { class: "reason", text: typeof decision.reason === "string" ? decision.reason : "–" }));
  });
  fillRows(tbody, rows, 4, "no decision yet");
}

// --- topic browser ------------------------------------------------------------------------

function renderTopics(topics) {
  topics = asObject(topics);
  const total = num(topics.total), offset = num(topics.offset) ?? state.offset;
  state.offset = offset;  // the server may have clamped a page past the end
  const limit = num(topics.limit) ?? 50;
  const items = asArray(topics.items);
  const rows = items.map((item) => {
    item = asObject(item);
    const name = typeof item.topic === "string" ? item.topic : "";
    const keys = num(item.keys);
    return el("tr", { "data-topic": name, "data-keys": keys === null ? "" : String(keys),
      class: name === state.topic ? "selected" : null },
    el("td", {}, el("button", { type: "button", class: "link", text: name })),
    el("td", { text: fmtInt(keys) }),
    el("td", { text: fmtInt(item.metas) }));
  });
  fillRows($("topic-list").tBodies[0], rows, 3, state.filter ? "no topic matches" : "no topic has presence");
  const range = $("topics-range");
  range.setAttribute("data-total", total === null ? "" : String(total));
  range.textContent = items.length === 0 ? `0 of ${fmtInt(total ?? 0)}`
    : `${fmtInt(offset + 1)}–${fmtInt(offset + items.length)} of ${fmtInt(total)}`;
  $("topics-prev").disabled = offset <= 0;
  $("topics-next").disabled = total === null || offset + limit >= total;
  state.topicsLimit = limit;
}

function renderMembers(members) {
  members = asObject(members);
  if (state.topic === null) return;
  const box = $("members");
  box.setAttribute("data-topic", state.topic ?? "");
  const keys = num(members.keys);
  setText("members-title", `${state.topic} · ${fmtInt(keys)} keys`);
  const items = asArray(members.items);
  const rows = items.map((item) => {
    item = asObject(item);
    const key = typeof item.key === "string" ? item.key : String(item.key ?? "");
    const metas = asArray(item.metas);
    return el("tr", { "data-key": key, "data-metas": metas.length },
      el("td", { class: "key", text: key }),
      el("td", {}, ...metas.map((meta) => el("code", { text: JSON.stringify(meta) }))));
  });
  fillRows($("member-list").tBodies[0], rows, 2, "no presence in this topic");
  const page = state.cursors.length + 1;
  setText("members-range", `page ${page}`);
  $("members-prev").disabled = state.cursors.length === 0;
  const next = typeof members.next === "string" ? members.next : null;
  state.nextCursor = next;
  $("members-next").disabled = next === null;
}

function selectTopic(name) {
  state.topic = name;
  state.cursor = null;
  state.cursors = [];
  state.nextCursor = null;
  for (const row of $("topic-list").tBodies[0].rows) {
    row.classList.toggle("selected", row.getAttribute("data-topic") === name);
  }
  $("members").setAttribute("data-topic", name);
  setText("members-title", `${name} · loading…`);
  $("member-list").tBodies[0].replaceChildren();
  $("members-prev").disabled = true;
  $("members-next").disabled = true;
  refreshNow();
}

function wireBrowser() {
  let debounce = null;
  $("topic-filter").addEventListener("input", (event) => {
    clearTimeout(debounce);
    const value = event.target.value;
    debounce = setTimeout(() => {
      if (value === state.filter) return;
      state.filter = value;
      state.offset = 0;
      refreshNow();
    }, FILTER_DEBOUNCE_MS);
  });
  $("topics-prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - (state.topicsLimit ?? 50));
    refreshNow();
  });
  $("topics-next").addEventListener("click", () => {
    state.offset += state.topicsLimit ?? 50;
    refreshNow();
  });
  $("topic-list").addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-topic]");
    if (row) selectTopic(row.getAttribute("data-topic"));
  });
  $("members-next").addEventListener("click", () => {
    if (state.nextCursor === null || state.nextCursor === undefined) return;
    state.cursors.push(state.cursor);
    state.cursor = state.nextCursor;
    state.nextCursor = null;
    $("members-next").disabled = true;
    refreshNow();
  });
  $("members-prev").addEventListener("click", () => {
    if (state.cursors.length === 0) return;
    state.cursor = state.cursors.pop();
    $("members-prev").disabled = true;
    refreshNow();
  });
  $("browser").addEventListener("toggle", () => {
    if (browserOpen()) refreshNow();
  });
}

// --- start --------------------------------------------------------------------------------

function start() {
  wireBrowser();
  // Redraw the charts at the new size when the window changes, from the data already held.
  let resize = null;
  window.addEventListener("resize", () => {
    clearTimeout(resize);
    resize = setTimeout(() => state.last && renderCharts(asObject(state.last)), 100);
  });
  // The link badge ages between fetches (a fetch that hangs still turns the page stale).
  setInterval(renderLink, 1000);
  poll();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
