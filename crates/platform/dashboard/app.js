// Mayfly's dashboard: a small single-page app over the admin API. The
// session cookie authenticates every request (the node checks its scopes);
// actions send the x-mayfly-dashboard header the node requires with it.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const page = () => $("#page");
let timers = [];
let aborts = [];
let charts = [];

function stopPage() {
  timers.forEach(clearInterval);
  aborts.forEach((a) => a.abort());
  charts.forEach((c) => c.destroy());
  timers = [];
  aborts = [];
  charts = [];
}

function every(ms, fn) {
  fn();
  timers.push(setInterval(fn, ms));
}

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function notice(text, isError) {
  const box = $("#notice");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = !text;
}

class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const init = {
    credentials: "same-origin",
    ...options,
    headers: { "x-mayfly-dashboard": "1", ...(options.headers || {}) },
  };
  const response = await fetch(path, init);
  if (response.status === 401) {
    // The session ended (token revoked): back to the login page.
    location.href = "/dashboard/";
    throw new ApiError(401, "log in again");
  }
  if (!response.ok) {
    let message = response.statusText;
    try {
      const body = await response.json();
      message = body.error ? body.error.message : JSON.stringify(body);
    } catch (_) { /* not JSON */ }
    const label = response.status === 403 ? "403 Forbidden" : String(response.status);
    throw new ApiError(label, message);
  }
  if (response.status === 204) return null;
  return response.json();
}

// Runs an action after the user confirms it in the page's dialog; shows
// the outcome (a 403 says the token may not act).
function act(question, action, done) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = question;
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    try {
      const message = await action();
      notice(message, false);
      if (done) done();
    } catch (error) {
      notice(`Refused: ${error.message}`, true);
    }
  };
  dialog.returnValue = "";
  dialog.showModal();
}

const fmt = {
  int: (n) => Number(n || 0).toLocaleString("en-US"),
  ms: (n) => (n ? `${Number(n).toFixed(n < 10 ? 2 : 1)} ms` : "–"),
  pct: (part, all) => (all ? `${((100 * part) / all).toFixed(2)} %` : "–"),
  cost: (n, currency) => `${Number(n || 0).toFixed(8)} ${currency || ""}`.trim(),
  gbs: (n) => Number(n || 0).toFixed(6),
  day: (ms) => new Date(ms).toISOString().slice(0, 10),
  time: (ms) => new Date(ms).toISOString().replace("T", " ").slice(0, 19),
};

function card(id, label, value) {
  return `<div class="card"><div class="label">${esc(label)}</div><div class="value" id="${id}">${esc(value)}</div></div>`;
}

// Axis labels that stay readable for tiny figures (costs of 1e-7).
function axisValue(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000) return v.toLocaleString("en-US");
  if (a >= 0.01) return String(Number(v.toPrecision(3)));
  return v.toExponential(1);
}

function chart(target, title, series, data, options = {}) {
  const box = document.createElement("div");
  box.className = "chart";
  box.innerHTML = `<h3>${esc(title)}</h3>`;
  target.appendChild(box);
  const width = Math.max(480, box.clientWidth - 20);
  const plot = new uPlot({
    width,
    height: 200,
    series: [{}, ...series.map((s, i) => ({
      label: s,
      stroke: ["#2563eb", "#dc2626", "#d97706", "#7c3aed", "#059669", "#64748b", "#db2777"][i % 7],
      width: 1.5,
      // Isolated points (one busy step in an idle hour) stay visible.
      points: { show: options.points ?? ((u, si, i0, i1) => i1 - i0 < 100) },
    }))],
    axes: [{}, { size: 70, values: (u, values) => values.map(axisValue) }],
    scales: options.scales || {},
  }, data, box);
  charts.push(plot);
  return plot;
}

// ---------------------------------------------------------------- overview

async function overview() {
  page().innerHTML = `
    <h1>Overview</h1>
    <div class="cards" id="node-cards"></div>
    <h2>Functions <span class="muted">(last hour on this node)</span></h2>
    <table id="functions"><thead><tr>
      <th>Function</th><th>Routes</th><th class="num">Live</th><th>Tier</th>
      <th class="num">Instances</th><th class="num">Requests</th><th class="num">Req/min</th>
      <th class="num">Errors</th><th class="num">Error rate</th><th class="num">p50</th>
      <th class="num">p99</th><th class="num">Cold starts</th><th class="num">Cost</th>
    </tr></thead><tbody></tbody></table>`;
  every(5000, async () => {
    try {
      const [functions, status, summary] = await Promise.all([
        api("/v1/functions"), api("/v1/status"), api("/v1/dashboard/summary"),
      ]);
      const node = summary.node;
      $("#node-cards").innerHTML =
        card("node-memory", "Memory in use / budget", `${node.memory_in_use_mb} / ${node.memory_budget_mb} MB`) +
        card("node-resident", "Memory resident", `${node.memory_resident_mb} MB`) +
        card("node-in-flight", "Instances running", node.instances_in_flight) +
        card("node-kept", "Instances kept", node.instances_kept) +
        card("node-throttled", "Throttled (since start)", fmt.int(node.throttled)) +
        card("node-invocations", "Invocations (since start)", fmt.int(node.invocations));
      const scaling = Object.fromEntries((status.scaling || []).map((s) => [s.function, s]));
      const last = Object.fromEntries(summary.functions.map((f) => [f.function, f]));
      $("#functions tbody").innerHTML = functions.map((f) => {
        const s = last[f.name] || { requests: 0, errors: 0, cost: 0, cold_starts: 0 };
        const tier = scaling[f.name] || {};
        const routes = (f.live.config.routes || []).join(" ");
        return `<tr data-function="${esc(f.name)}">
          <td><a href="#/function/${encodeURIComponent(f.name)}">${esc(f.name)}</a></td>
          <td>${esc(routes)}</td>
          <td class="num live">${f.live.version}</td>
          <td class="tier">${esc(tier.tier || "")}</td>
          <td class="num">${(tier.running || 0) + (tier.kept || 0)}</td>
          <td class="num requests" data-value="${s.requests}">${fmt.int(s.requests)}</td>
          <td class="num">${(s.requests / 60).toFixed(2)}</td>
          <td class="num errors" data-value="${s.errors}">${fmt.int(s.errors)}</td>
          <td class="num">${fmt.pct(s.errors, s.requests)}</td>
          <td class="num p50">${fmt.ms(s.p50_ms)}</td>
          <td class="num p99">${fmt.ms(s.p99_ms)}</td>
          <td class="num">${fmt.int(s.cold_starts)}</td>
          <td class="num cost" data-value="${s.cost}">${fmt.cost(s.cost, summary.currency)}</td>
        </tr>`;
      }).join("");
      page().dataset.loaded = "overview";
    } catch (error) {
      notice(error.message, true);
    }
  });
}

// ---------------------------------------------------------------- function

async function functionPage(name) {
  const path = `/v1/functions/${encodeURIComponent(name)}`;
  page().innerHTML = `
    <h1>${esc(name)}</h1>
    <div class="cards" id="fn-cards"></div>
    <div class="row">
      <label>Resolution <select id="resolution"><option value="10s">10 s (last hour)</option>
        <option value="5m">5 min (last day)</option></select></label>
    </div>
    <div class="charts" id="charts"></div>
    <h2>Versions and aliases</h2>
    <div class="row">
      <button id="rollback">Roll back live</button>
      <label>Move alias <input id="alias-name" value="live" size="10"></label>
      <label>to version <input id="alias-version" type="number" min="1"></label>
      <button id="alias-move">Move</button>
      <button id="delete-function" class="danger">Delete function</button>
    </div>
    <table id="aliases"><thead><tr><th>Alias</th><th class="num">Version</th><th>Canary</th><th class="num">Previous</th></tr></thead><tbody></tbody></table>
    <table id="versions"><thead><tr><th class="num">Version</th><th>Created</th><th>Digest</th><th>Routes</th><th class="num">Memory</th></tr></thead><tbody></tbody></table>
    <h2>Alias history</h2>
    <table id="history"><thead><tr><th>When</th><th>Alias</th><th class="num">From</th><th class="num">To</th><th>Cause</th></tr></thead><tbody></tbody></table>
    <h2>Triggers and dead letters</h2>
    <table id="fn-triggers"><thead><tr><th>Id</th><th>Source</th><th>Alias</th></tr></thead><tbody></tbody></table>
    <div class="row"><span id="dlq-count"></span> <button id="fn-redrive">Redrive all</button></div>
    <h2>Logs <span class="muted">(live)</span></h2>
    <pre class="logs" id="logs"></pre>`;

  const refreshMeta = async () => {
    const [fn, triggers, dlq] = await Promise.all([
      api(path), api(`${path}/triggers`).catch(() => []), api(`${path}/dlq`).catch(() => []),
    ]);
    $("#aliases tbody").innerHTML = fn.aliases.map((a) => {
      let canary = "";
      if (a.canary) {
        const p = a.canary.progress;
        canary = `v${a.canary.version} at ${a.canary.weight_percent}%` +
          (p ? ` (${p.requests} requests, ${p.errors} errors${p.decided ? ", decided" : ""})` : "");
      }
      return `<tr data-alias="${esc(a.alias)}"><td>${esc(a.alias)}</td><td class="num version">${a.version}</td><td>${esc(canary)}</td><td class="num">${a.previous_version ?? ""}</td></tr>`;
    }).join("");
    $("#versions tbody").innerHTML = fn.versions.slice().reverse().map((v) =>
      `<tr><td class="num">${v.version}</td><td>${fmt.time(v.created_at_ms)}</td><td>${esc(v.digest.slice(0, 19))}</td><td>${esc((v.config.routes || []).join(" "))}</td><td class="num">${v.config.limits ? v.config.limits.memory_mb + " MB" : ""}</td></tr>`).join("");
    $("#history tbody").innerHTML = fn.history.map((h) =>
      `<tr><td>${fmt.time(h.at_ms)}</td><td>${esc(h.alias)}</td><td class="num">${h.from_version ?? ""}</td><td class="num">${h.version}</td><td>${esc(h.cause)}</td></tr>`).join("");
    const live = fn.aliases.find((a) => a.alias === "live");
    const triggerList = Array.isArray(triggers) ? triggers : (triggers.triggers || []);
    $("#fn-triggers tbody").innerHTML = triggerList.map((t) =>
      `<tr><td>${esc(t.id)}</td><td>${esc(JSON.stringify(t.source))}</td><td>${esc(t.alias || "live")}</td></tr>`).join("");
    const letters = Array.isArray(dlq) ? dlq : (dlq.dead_letters || dlq.events || []);
    $("#dlq-count").textContent = `${letters.length} dead letters`;
    return live;
  };

  const liveCards = async () => {
    const live = await refreshMeta();
    $("#fn-cards").dataset.live = live ? live.version : "";
    return live;
  };

  const drawCharts = async () => {
    const resolution = $("#resolution").value;
    const data = await api(`${path}/series?resolution=${resolution}`);
    // Every step of the window, empty ones as zero (latency as a gap), so
    // the time axis is the window's whatever the traffic.
    const step = data.step_ms;
    const span = resolution === "10s" ? 3600000 : 86400000;
    const now = Date.now();
    const byTime = new Map(data.points.map((p) => [p.t_ms, p]));
    const points = [];
    for (let t = Math.floor((now - span) / step) * step; t <= now; t += step) {
      points.push(byTime.get(t) || {
        t_ms: t, requests: 0, errors: 0, cold_starts: 0, instances: 0, billed_gb_s: 0, cost: 0,
        p50_ms: null, p95_ms: null, p99_ms: null,
        outcomes: { ok: 0, error: 0, timeout: 0, oom: 0, killed: 0, client_closed: 0, throttled: 0 },
      });
    }
    const x = points.map((p) => p.t_ms / 1000);
    const sum = (key) => points.reduce((n, p) => n + p[key], 0);
    const requests = sum("requests");
    const errors = sum("errors");
    const cost = sum("cost");
    const live = $("#fn-cards").dataset.live || "";
    $("#fn-cards").innerHTML =
      card("fn-live", "Live version", live) +
      card("fn-requests", "Requests (shown period)", fmt.int(requests)) +
      card("fn-errors", "Errors", fmt.int(errors)) +
      card("fn-cost", "Cost", fmt.cost(cost, data.currency)) +
      card("fn-gbs", "Billed GB-s", fmt.gbs(sum("billed_gb_s")));
    $("#fn-cards").dataset.live = live;
    $("#fn-requests").dataset.value = requests;
    $("#fn-errors").dataset.value = errors;
    $("#fn-cost").dataset.value = cost;
    charts.forEach((c) => c.destroy());
    charts = [];
    const target = $("#charts");
    target.innerHTML = "";
    const outcomes = ["ok", "error", "timeout", "oom", "killed", "client_closed", "throttled"];
    chart(target, "Requests by outcome", outcomes,
      [x, ...outcomes.map((o) => points.map((p) => p.outcomes[o]))]);
    chart(target, "Latency (ms)", ["p50", "p95", "p99"],
      [x, points.map((p) => p.p50_ms), points.map((p) => p.p95_ms), points.map((p) => p.p99_ms)],
      { points: true });
    chart(target, "Cold starts and instances", ["cold starts", "instances"],
      [x, points.map((p) => p.cold_starts), points.map((p) => p.instances)]);
    chart(target, `Billed GB-s and cost (${data.currency})`, ["GB-s", "cost"],
      [x, points.map((p) => p.billed_gb_s), points.map((p) => p.cost)]);
    page().dataset.loaded = `function:${name}`;
  };

  $("#resolution").onchange = () => drawCharts().catch((e) => notice(e.message, true));
  $("#rollback").onclick = () => act(`Roll back ${name}'s live alias to its previous version?`,
    async () => {
      const r = await api(`${path}/rollback`, { method: "POST" });
      return `live now serves version ${r.version} (was ${r.from})`;
    }, () => liveCards().then(drawCharts));
  $("#alias-move").onclick = () => {
    const alias = $("#alias-name").value.trim();
    const version = Number($("#alias-version").value);
    act(`Point ${name}'s alias ${alias} at version ${version}?`, async () => {
      const r = await api(`${path}/aliases/${encodeURIComponent(alias)}`, {
        method: "PUT",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ version }),
      });
      return `${r.alias} now points at version ${r.version}`;
    }, () => liveCards().then(drawCharts));
  };
  $("#delete-function").onclick = () => act(`Delete ${name} with all its versions and routes?`,
    async () => {
      await api(path, { method: "DELETE" });
      location.hash = "#/";
      return `${name} deleted`;
    });
  $("#fn-redrive").onclick = () => act(`Redrive every dead letter of ${name}?`, async () => {
    const r = await api(`${path}/dlq/redrive`, {
      method: "POST", headers: { "content-type": "application/json" }, body: "{}",
    });
    return `redriven: ${JSON.stringify(r)}`;
  }, () => refreshMeta());

  try {
    await liveCards();
    await drawCharts();
  } catch (error) {
    notice(error.message, true);
  }
  timers.push(setInterval(() => {
    liveCards().then(drawCharts).catch((e) => notice(e.message, true));
  }, 5000));
  followLogs(`${path}/logs?tail=100&follow=true`);
}

// Streams the function's log lines (JSON lines) into the page.
async function followLogs(url) {
  const abort = new AbortController();
  aborts.push(abort);
  const out = $("#logs");
  try {
    const response = await fetch(url, { credentials: "same-origin", signal: abort.signal });
    if (!response.ok) {
      out.textContent = `cannot read the logs: ${response.status}`;
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, end);
        buffered = buffered.slice(end + 1);
        if (!line.trim()) continue;
        let text = line;
        try {
          const r = JSON.parse(line);
          const when = r.at_ms || r.time_ms || r.ts_ms;
          text = `${when ? fmt.time(when) : ""} ${r.request_id ? r.request_id.slice(-8) : ""} ${r.stream || ""} ${r.line ?? r.message ?? line}`;
        } catch (_) { /* shown as is */ }
        out.textContent += text + "\n";
        if (out.textContent.length > 200000) out.textContent = out.textContent.slice(-100000);
        out.scrollTop = out.scrollHeight;
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") out.textContent += `\n(log stream ended: ${error.message})`;
  }
}

// ---------------------------------------------------------------- usage

let usageRows = [];

async function usagePage() {
  page().innerHTML = `
    <h1>Usage</h1>
    <div class="row">
      <label>Days <select id="usage-days"><option>7</option><option>30</option><option>1</option></select></label>
      <a id="csv" href="#" download="mayfly-usage.csv">Export CSV</a>
    </div>
    <div class="cards" id="usage-cards"></div>
    <div class="charts" id="usage-chart"></div>
    <table id="usage-table"><thead><tr><th>Day</th><th>Function</th><th class="num">Requests</th>
      <th class="num">Errors</th><th class="num">Billed GB-s</th><th class="num">Cost</th></tr></thead><tbody></tbody></table>`;
  const load = async () => {
    const days = Number($("#usage-days").value);
    const functions = await api("/v1/functions");
    const from = `${days * 24}h`;
    const [total, ...perFunction] = await Promise.all([
      api(`/v1/usage?from=${from}&group_by=function`),
      ...functions.map((f) => api(`/v1/usage?from=${from}&group_by=day&function=${encodeURIComponent(f.name)}`)),
    ]);
    const currency = total.prices.currency;
    usageRows = [];
    functions.forEach((f, i) => perFunction[i].rows.forEach((row) => usageRows.push({
      day: fmt.day(row.period_start_ms), function: f.name, requests: row.invocations,
      errors: row.errors, gbs: row.billed_gb_s, cost: row.cost.total,
    })));
    usageRows.sort((a, b) => (a.day === b.day ? a.function.localeCompare(b.function) : b.day.localeCompare(a.day)));
    const t = total.total;
    $("#usage-cards").innerHTML =
      card("usage-total-requests", `Requests, last ${days} days`, fmt.int(t.invocations)) +
      card("usage-total-errors", "Errors", fmt.int(t.errors)) +
      card("usage-total-cost", "Cost", fmt.cost(t.cost.total, currency));
    $("#usage-total-requests").dataset.value = t.invocations;
    $("#usage-total-errors").dataset.value = t.errors;
    $("#usage-total-cost").dataset.value = t.cost.total;
    $("#usage-table tbody").innerHTML = usageRows.map((r) =>
      `<tr data-function="${esc(r.function)}" data-day="${r.day}"><td>${r.day}</td><td>${esc(r.function)}</td>
        <td class="num requests" data-value="${r.requests}">${fmt.int(r.requests)}</td>
        <td class="num errors" data-value="${r.errors}">${fmt.int(r.errors)}</td>
        <td class="num">${fmt.gbs(r.gbs)}</td>
        <td class="num cost" data-value="${r.cost}">${fmt.cost(r.cost, currency)}</td></tr>`).join("");
    // Chart: cost per function per day.
    const dayList = [...new Set(usageRows.map((r) => r.day))].sort();
    const names = functions.map((f) => f.name);
    const x = dayList.map((d) => Date.parse(`${d}T00:00:00Z`) / 1000);
    const series = names.map((n) => dayList.map((d) => {
      const row = usageRows.find((r) => r.day === d && r.function === n);
      return row ? row.cost : 0;
    }));
    charts.forEach((c) => c.destroy());
    charts = [];
    $("#usage-chart").innerHTML = "";
    // A day on each side, so one day of data is not the whole axis.
    const scales = { x: { range: (u, min, max) => [min - 86400, max + 86400] } };
    if (dayList.length) chart($("#usage-chart"), `Cost per function per day (${currency})`, names, [x, ...series], { scales });
    const csv = ["day,function,requests,errors,billed_gb_s,cost"]
      .concat(usageRows.map((r) => [r.day, r.function, r.requests, r.errors, r.gbs, r.cost].join(",")))
      .join("\n") + "\n";
    $("#csv").href = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
    page().dataset.loaded = "usage";
  };
  $("#usage-days").onchange = () => load().catch((e) => notice(e.message, true));
  try {
    await load();
  } catch (error) {
    notice(error.message, true);
  }
}

// ---------------------------------------------------------------- events

function autoTable(id, rows) {
  const list = Array.isArray(rows) ? rows : [];
  if (!list.length) return `<table id="${id}"><tbody><tr><td class="muted">none</td></tr></tbody></table>`;
  const keys = [...new Set(list.flatMap((r) => Object.keys(r)))].slice(0, 8);
  const cell = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : v ?? "");
  return `<table id="${id}"><thead><tr>${keys.map((k) => `<th>${esc(k)}</th>`).join("")}</tr></thead><tbody>${
    list.map((r) => `<tr>${keys.map((k) => `<td>${esc(cell(r[k]))}</td>`).join("")}</tr>`).join("")}</tbody></table>`;
}

async function eventsPage() {
  page().innerHTML = `<h1>Events</h1><div id="events-body"><p>Loading…</p></div>`;
  const load = async () => {
    const [queues, triggers, functions] = await Promise.all([
      api("/v1/queues"), api("/v1/triggers"), api("/v1/functions"),
    ]);
    const letters = await Promise.all(functions.map((f) =>
      api(`/v1/functions/${encodeURIComponent(f.name)}/dlq`).catch(() => [])));
    const queueList = Array.isArray(queues) ? queues : (queues.queues || []);
    const triggerList = Array.isArray(triggers) ? triggers : (triggers.triggers || []);
    let dlq = "";
    functions.forEach((f, i) => {
      const list = Array.isArray(letters[i]) ? letters[i] : (letters[i].dead_letters || letters[i].events || []);
      if (!list.length) return;
      dlq += `<h3>${esc(f.name)} <button class="redrive" data-function="${esc(f.name)}">Redrive ${list.length}</button></h3>` +
        autoTable(`dlq-${f.name}`, list);
    });
    $("#events-body").innerHTML = `
      <h2>Queues</h2>${autoTable("queues", queueList)}
      <h2>Triggers</h2>${autoTable("triggers", triggerList)}
      <h2>Dead letters</h2>${dlq || '<p class="muted" id="no-dlq">No dead letters.</p>'}`;
    document.querySelectorAll("button.redrive").forEach((button) => {
      const name = button.dataset.function;
      button.onclick = () => act(`Redrive every dead letter of ${name}?`, async () => {
        const r = await api(`/v1/functions/${encodeURIComponent(name)}/dlq/redrive`, {
          method: "POST", headers: { "content-type": "application/json" }, body: "{}",
        });
        return `redriven: ${JSON.stringify(r)}`;
      }, () => load());
    });
    page().dataset.loaded = "events";
  };
  every(10000, () => load().catch((e) => notice(e.message, true)));
}

// ---------------------------------------------------------------- router

function route() {
  stopPage();
  notice("", false);
  delete page().dataset.loaded;
  const hash = location.hash.replace(/^#/, "") || "/";
  document.querySelectorAll("header nav a").forEach((a) => a.classList.remove("active"));
  if (hash.startsWith("/function/")) {
    functionPage(decodeURIComponent(hash.slice("/function/".length)));
  } else if (hash === "/usage") {
    $("#nav-usage").classList.add("active");
    usagePage();
  } else if (hash === "/events") {
    $("#nav-events").classList.add("active");
    eventsPage();
  } else {
    $("#nav-overview").classList.add("active");
    overview();
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
