// The /ops dashboard: polls the operator API and draws it. Plain JS, no build step, no CDN.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const SERIES = [["in", "In"], ["processed", "Processed"], ["delivered", "Delivered"],
                ["failed", "Failed"]];
const revealed = new Map();  // "kind:id" -> person, kept in this tab only
let last = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "testid") el.dataset.testid = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function text(testid, value) {
  document.querySelector(`[data-testid="${testid}"]`).textContent = value;
}

function age(seconds) {
  if (!seconds) return "-";
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d${String(Math.floor(s % 86400 / 3600)).padStart(2, "0")}h`;
}

function since(iso) {
  return iso ? age((Date.now() - Date.parse(iso)) / 1000) + " ago" : "-";
}

function rate(value) {
  return value >= 10 ? value.toFixed(0) : value.toFixed(2);
}

async function api(method, path, body) {
  const headers = {"Accept": "application/json"};
  if (method !== "GET") headers["X-CSRF-Token"] = CSRF;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method, headers, credentials: "same-origin",
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  if (response.status === 401) {  // signed out, or the session expired: back to the sign-in form
    window.location.assign("/ops");
    throw new Error("signed out");
  }
  const data = response.status === 204 ? {} : await response.json();
  if (!response.ok) throw new Error(data.errors ? data.errors.error_message : response.statusText);
  return data;
}

function toast(message) {
  const el = document.querySelector('[data-testid="toast"]');
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 4000);
}

function confirmDialog(message) {
  const dialog = document.querySelector('[data-testid="confirm"]');
  text("confirm-text", message);
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {once: true});
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function act(what, method, path, body) {
  try {
    const result = await api(method, path, body);
    toast(what(result));
  } catch (err) {
    toast(`Failed: ${err.message}`);
  }
  await refresh();
}

function personCell(kind, id, person) {
  const key = `${kind}:${id}`;
  const shown = revealed.get(key) || person || {};
  const parts = [["email", shown.email], ["name", shown.name], ["phone", shown.phone]]
    .filter(([, v]) => v)
    .map(([field, v]) => h("div", {class: revealed.has(key) ? "pii revealed" : "pii",
                                   testid: `pii-${field}`}, v));
  if (!parts.length) return h("td", {class: "pii"}, "-");
  const reveal = revealed.has(key) ? null : h("button", {
    class: "link", type: "button", testid: "reveal", title: "Show this record unmasked (logged)",
    onclick: async () => {
      try {
        const data = await api("POST", "/api/reveal", {kind, id});
        revealed.set(key, data.person);
        render();
      } catch (err) {
        toast(`Failed: ${err.message}`);
      }
    }}, "reveal");
  return h("td", {}, parts, reveal);
}

function sinkCard(sink) {
  // null: Redis could not be read, so neither is known
  const state = sink.paused === null ? "?" : sink.paused ? "paused" : "running";
  const circuit = sink.circuit === null ? "?" : sink.circuit;
  const classes = ["card", sink.paused ? "paused" : "",
                   circuit !== "closed" && circuit !== "?" ? "open" : ""];
  const success = sink.success_rate === null ? "-" : `${(sink.success_rate * 100).toFixed(1)}%`;
  const rows = [
    ["pending", sink.pending, "pending"], ["oldest pending", age(sink.oldest_pending_seconds), "oldest"],
    ["oldest lead waiting", age(sink.oldest_lead_seconds), "oldest-lead"],
    ["delivered (1 h)", sink.delivered_hour, "delivered"], ["success (1 h)", success, "success"],
    ["p95 call", sink.p95_ms === null ? "-" : `${sink.p95_ms} ms`, "p95"],
    ["circuit", circuit, "circuit"], ["dead letters", sink.dead, "dead"],
  ];
  const toggle = h("button", {
    class: "action", type: "button", testid: "sink-toggle",
    onclick: () => act((r) => `${r.sink} ${r.paused ? "paused" : "resumed"}`, "POST",
                       `/api/sinks/${encodeURIComponent(sink.sink)}/${sink.paused ? "resume" : "pause"}`),
  }, sink.paused ? "Resume" : "Pause");
  const replayAll = sink.dead ? h("button", {
    class: "action", type: "button", testid: "sink-replay-all",
    onclick: async () => {
      if (!await confirmDialog(`Replay all ${sink.dead} dead letter(s) of ${sink.sink}?`)) return;
      await act((r) => `${r.replayed} dead letter(s) of ${sink.sink} replayed`, "POST",
                "/api/dead-letters/replay", {sink: sink.sink});
    }}, `Replay all ${sink.dead}`) : null;
  return h("div", {class: classes.join(" ").trim(), testid: `sink-${sink.sink}`},
    h("h3", {}, h("span", {}, sink.sink, " ", h("small", {}, sink.type)),
      h("span", {class: "state", testid: "sink-state"}, state)),
    h("dl", {}, rows.map(([label, value, id]) => [h("dt", {}, label),
                                                   h("dd", {testid: `sink-${id}`}, value)])),
    toggle, replayAll);
}

function rowsOrEmpty(tbody, rows, columns, message) {
  tbody.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", {class: "empty", colspan: columns}, message))]));
}

function plot(series) {
  const box = document.getElementById("plot");
  const W = Math.max(400, box.clientWidth - 16), H = 220, L = 40, R = 10, T = 24, B = 20;
  const svgNS = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, ...kids) => {
    const el = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    el.append(...kids);
    return el;
  };
  const max = Math.max(1, ...series.flatMap((p) => SERIES.map(([k]) => p[k])));
  const x = (i) => L + (W - L - R) * (series.length > 1 ? i / (series.length - 1) : 0);
  const y = (v) => H - B - (H - T - B) * v / max;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "events per minute, last hour"});
  svg.append(s("line", {class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B}),
             s("line", {class: "axis", x1: L, y1: T, x2: L, y2: H - B}),
             s("text", {x: 4, y: T + 4}, String(Math.round(max))),
             s("text", {x: 4, y: H - B}, "0"),
             s("text", {x: L, y: H - 4}, "-60 min"),
             s("text", {x: W - R - 24, y: H - 4}, "now"));
  const colours = getComputedStyle(document.documentElement);
  SERIES.forEach(([key, label], n) => {
    const colour = colours.getPropertyValue(`--${key}`).trim();
    const points = series.map((p, i) => `${x(i).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
    svg.append(s("polyline", {points, fill: "none", stroke: colour, "stroke-width": 2,
                              "data-series": key}));
    const total = series.reduce((sum, p) => sum + p[key], 0);
    const legend = s("g", {class: "legend"},
                     s("rect", {x: L + 10 + n * 170, y: 6, width: 10, height: 10, fill: colour}),
                     s("text", {x: L + 24 + n * 170, y: 15, "data-testid": `plot-${key}`},
                       `${label}: ${Math.round(total)} in the hour`));
    svg.append(legend);
  });
  box.replaceChildren(svg);
}

function render() {
  const d = last;
  if (!d) return;
  for (const [source, up] of [["redis", d.redis_up], ["postgres", d.postgres_up]]) {
    document.querySelector(`[data-testid="source-${source}"]`).className = `source ${up ? "up" : "down"}`;
  }
  text("updated", `updated ${new Date(d.now * 1000).toLocaleTimeString()}`);
  const flower = document.querySelector('[data-testid="flower-link"]');
  if (d.flower_url) { flower.href = d.flower_url; flower.hidden = false; } else flower.hidden = true;
  for (const [key] of SERIES) {
    text(`rate-${key}`, rate(d.rates[key]));
    text(`total-${key}`, d.totals[key]);
  }
  text("total-duplicate", d.totals.duplicate);
  text("total-dead", d.totals.dead);
  text("ingest-depth", d.ingest.depth);
  text("ingest-unread", d.ingest.unread);
  text("ingest-oldest", age(d.ingest.oldest_seconds));
  text("quarantined", d.quarantined);
  plot(d.series);
  document.getElementById("sinks").replaceChildren(...d.sinks.map(sinkCard));
  rowsOrEmpty(document.querySelector('[data-testid="dead-letters"] tbody'), d.dead_letters.map((r) =>
    h("tr", {testid: `dead-letter-${r.id}`},
      h("td", {}, r.id), h("td", {}, r.sink), h("td", {class: "pii"}, r.event_id, h("br"), h("small", {}, r.event_type || "")),
      personCell("dead_letter", r.id, r.person), h("td", {class: "error"}, r.error),
      h("td", {}, r.attempts), h("td", {}, since(r.dead_at)),
      h("td", {}, h("button", {
        class: "action", type: "button", testid: "replay",
        onclick: () => act(() => `dead letter ${r.id} replayed`, "POST", `/api/dead-letters/${r.id}/replay`),
      }, "Replay")))), 8, "No dead letters waiting.");
  rowsOrEmpty(document.querySelector('[data-testid="quarantine"] tbody'), d.quarantine.map((r) =>
    h("tr", {testid: `quarantine-${r.id}`},
      h("td", {class: "pii"}, r.id), h("td", {}, since(r.received_at)),
      personCell("quarantine", r.id, r.person), h("td", {class: "error"}, r.reason),
      h("td", {}, r.replays))), 5, "Quarantine is empty.");
}

async function refresh() {
  try {
    last = await api("GET", "/api/dashboard");
    render();
  } catch (err) {
    text("updated", `update failed: ${err.message}`);
  }
}

async function refreshWorkers() {
  try {
    const data = await api("GET", "/api/workers?timeout=1");
    const rows = Object.entries(data.workers).map(([name, w]) => h("tr", {testid: "worker"},
      h("td", {}, name), h("td", {}, w.pool), h("td", {}, w.queues.length),
      h("td", {}, Object.entries(w.processed).map(([t, n]) => `${t} ${n}`).join(", ") || "none yet")));
    rowsOrEmpty(document.querySelector('[data-testid="workers"] tbody'), rows, 4,
                `No worker answered within ${data.timeout}s.`);
  } catch (err) {
    toast(`Workers: ${err.message}`);
  }
}

document.querySelector('[data-testid="logout"]').addEventListener("click", async () => {
  try { await api("POST", "/ops/logout"); } catch (err) { /* signed out either way */ }
  window.location.assign("/ops");
});

refresh();
refreshWorkers();
setInterval(refresh, 3000);
setInterval(refreshWorkers, 15000);
