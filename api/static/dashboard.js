// The outbox dashboard: reads the documented JSON API with the page's token and redraws.
"use strict";

const token = document.body.dataset.token;
const refreshMs = Number(document.body.dataset.refreshMs) || 2000;

// Requests go to the page's origin: opened at a URL that carries credentials
// (http://user:token@host/dashboard), a relative path would carry them too, and the
// browser refuses to fetch such a URL.
async function api(path, options = {}) {
  const response = await fetch(new URL(path, window.location.origin), {
    ...options,
    headers: { Authorization: `Bearer ${token}`, ...(options.headers || {}) },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok && response.status !== 404) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new Error(`${path}: ${response.status} ${message}`);
  }
  return response.ok ? body : null;
}

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function cell(value, numeric) {
  const td = document.createElement("td");
  td.textContent = value === undefined || value === null ? "" : String(value);
  if (numeric) td.className = "num";
  return td;
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(
    ...rows.map((values) => {
      const tr = document.createElement("tr");
      for (const value of values) {
        tr.append(value instanceof Node ? wrap(value) : cell(value, typeof value === "number"));
      }
      return tr;
    }),
  );
}

function wrap(node) {
  const td = document.createElement("td");
  td.append(node);
  return td;
}

function sum(object) {
  return Object.values(object || {}).reduce((a, b) => a + b, 0);
}

function age(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return seconds < 120 ? `${seconds.toFixed(0)} s ago` : `${(seconds / 60).toFixed(0)} min ago`;
}

function drawThroughput(points) {
  const canvas = document.getElementById("throughput");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const top = Math.max(1, ...points.map((p) => p.per_s));
  ctx.fillStyle = "#6b7280";
  ctx.font = "12px system-ui";
  ctx.fillText(`${top.toFixed(0)} msg/s`, 4, 14);
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach((p, i) => {
    const x = (i / Math.max(1, points.length - 1)) * (width - 8) + 4;
    const y = height - 4 - (p.per_s / top) * (height - 24);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function renderSnapshot(snapshot, stats) {
  if (snapshot === null) {
    text("snapshot-age", "none");
    text("snapshot-at", "outbox.heartbeat has not run");
    return;
  }
  text("backlog", snapshot.backlog.outbox_pending);
  text("oldest", (snapshot.oldest_claimable_age_s || 0).toFixed(1));
  text("dead-total", snapshot.dead_letters);
  text("snapshot-age", `${snapshot.age_s.toFixed(0)} s`);
  text("snapshot-at", snapshot.taken_at);
  const counts = snapshot.counts || {};
  const topics = new Set([...Object.keys(counts.outbox || {}), ...Object.keys(stats.published)]);
  fill(
    "topics",
    [...topics].sort().map((topic) => {
      const c = (counts.outbox || {})[topic] || {};
      return [topic, c.pending || 0, c.sent || 0, c.dead || 0,
        stats.published[topic] || 0, stats.failed[topic] || 0];
    }),
  );
  const inbox = counts.inbox || {};
  const deliveries = counts.deliveries || {};
  const groups = new Set([...Object.keys(inbox), ...Object.keys(deliveries),
    ...Object.keys(stats.retries)]);
  fill(
    "groups",
    [...groups].sort().map((group) => {
      const i = inbox[group] || {};
      const d = deliveries[group] || {};
      return [group, i.received || 0, i.failed || 0, i.done || 0, (i.dead || 0) + (d.dead || 0),
        d.awaiting_ack || 0, stats.retries[group] || 0];
    }),
  );
  const lag = [];
  for (const [group, topicsOfGroup] of Object.entries(snapshot.consumer_lag)) {
    if (topicsOfGroup.error) {
      lag.push([group, "", "", topicsOfGroup.error]);
      continue;
    }
    for (const [topic, partitions] of Object.entries(topicsOfGroup)) {
      for (const [partition, n] of Object.entries(partitions)) lag.push([group, topic, partition, n]);
    }
  }
  fill("lag", lag);
}

function renderDead(items) {
  fill(
    "dead",
    items.map((item) => {
      const button = document.createElement("button");
      button.textContent = "requeue";
      button.className = "requeue";
      button.dataset.id = item.id;
      button.addEventListener("click", async () => {
        button.disabled = true;
        await guarded(() => api(`/v1/dead-letters/${encodeURIComponent(item.id)}/requeue`,
          { method: "POST" }));
        await refresh();
      });
      return [item.side, item.topic, item.group || "", item.attempts, item.error, item.at, button];
    }),
  );
}

async function guarded(action) {
  try {
    const result = await action();
    document.getElementById("error").hidden = true;
    return result;
  } catch (error) {
    const box = document.getElementById("error");
    box.textContent = error.message;
    box.hidden = false;
    return null;
  }
}

async function refresh() {
  await guarded(async () => {
    const [snapshot, stats, agents, dead, held] = await Promise.all([
      api("/v1/health/summary"),
      api("/v1/stats?minutes=5"),
      api("/v1/agents"),
      api("/v1/dead-letters?limit=50"),
      api("/v1/held-keys?limit=50"),
    ]);
    text("published-total", sum(stats.published));
    const circuit = document.getElementById("circuit");
    circuit.textContent = stats.circuit.replace("_", "-");
    circuit.className = stats.circuit;
    text("circuits", `${Object.keys(stats.circuits).length} relay(s)`);
    drawThroughput(stats.published_per_s);
    renderSnapshot(snapshot, stats);
    // Active agents first; the inactive ones (every restart leaves one) folded, counted.
    const row = (a) => [a.instance_id, a.role, age(a.last_seen_at)];
    fill("agents", agents.items.filter((a) => a.active).map(row));
    const inactive = agents.items.filter((a) => !a.active);
    text("inactive-count", `${inactive.length} inactive`);
    fill("inactive-agents", inactive.map(row));
    renderDead(dead.items);
    fill("held", held.items.map((h) => [h.group, h.topic, h.key, h.held, h.dead_letter,
      h.error || ""]));
    text("updated", `updated ${new Date().toLocaleTimeString()}`);
  });
}

for (const button of document.querySelectorAll("button.run")) {
  button.addEventListener("click", async () => {
    const result = await guarded(() => api(`/v1/tasks/${button.dataset.task}/run`,
      { method: "POST" }));
    if (result) text("run-result", `${result.task} queued (${result.task_id})`);
  });
}

refresh();
setInterval(refresh, refreshMs);
