"use strict";
// The status page: everything is drawn from /api/status (one request per refresh,
// whatever the number of jobs) and the picked job's /api/chains. No framework: each
// section is one string of HTML set at once, which a browser lays out in milliseconds
// for hundreds of rows.

const REFRESH_MS = 5000;
const token = (() => {
  for (const pair of location.search.slice(1).split("&")) {
    const [k, v] = pair.split("=");
    if (k === "token" && v) return decodeURIComponent(v);
  }
  return null;
})();

function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  return fetch(path, { headers, cache: "no-store" }).then((r) => {
    if (!r.ok) return r.text().then((t) => { throw new Error(r.status + ": " + t.trim()); });
    return r.json();
  });
}

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.round(s);
  if (s < 60) return s + " s";
  const parts = [[86400, "d"], [3600, "h"], [60, "m"], [1, "s"]];
  const out = [];
  for (const [n, u] of parts) {
    if (s >= n && out.length < 2) { out.push(Math.floor(s / n) + " " + u); s %= n; }
    else if (out.length) break;
  }
  return out.join(" ");
}

// Times relative to the daemon's clock (the document's `now`), not the browser's.
function ago(iso, now) {
  if (!iso) return "—";
  const s = (now - Date.parse(iso)) / 1000;
  return `<span title="${esc(iso)}">${s >= 0 ? duration(s) + " ago" : "in " + duration(-s)}</span>`;
}

function resultClass(r) { return r === "success" ? "ok" : "bad"; }

function jobsTable(status) {
  const now = Date.parse(status.daemon.now);
  const rows = [];
  for (const job of status.jobs) {
    const n = job.destinations.length;
    job.destinations.forEach((d, i) => {
      const last = d.last_run;
      const late = d.lag_seconds !== null && d.lag_seconds > 2 * job.interval_seconds;
      const failing = d.consecutive_failures > 0;
      const cells = [];
      if (i === 0) {
        const running = job.running ? `<span class="running">running${job.running.cancelling ? " (cancelling)" : ""}</span>` : "";
        cells.push(`<td rowspan="${n}" class="job"><b>${esc(job.name)}</b>${running}<br><span class="muted">${esc(job.schedule)}</span></td>`);
      }
      cells.push(`<td class="url" title="${esc(d.url)}">${esc(d.url)}</td>`);
      const result = last ? last.result : null;
      const error = last && last.error ? `<span class="error">${esc(last.error)}</span>` : "";
      const retry = failing && d.next_retry ? ` <span class="muted">(${d.consecutive_failures}× failed, retry ${ago(d.next_retry, now)})</span>` : "";
      cells.push(`<td class="result" data-result="${esc(result || "")}">${result ? `<span class="${resultClass(result)}">${esc(result)}</span> ${ago(last.started, now)}${retry}${error}` : '<span class="muted">no run yet</span>'}</td>`);
      cells.push(`<td class="last-success">${ago(d.last_success, now)}</td>`);
      cells.push(`<td class="lag num${late ? " late" : ""}" data-lag="${d.lag_seconds === null ? "" : d.lag_seconds}">${duration(d.lag_seconds)}</td>`);
      cells.push(`<td class="next-run">${ago(job.next_run, now)}</td>`);
      cells.push(`<td class="sent num">${last ? bytes(last.sent_bytes) : "—"}</td>`);
      rows.push(`<tr class="dest${i === 0 ? " first" : ""}" data-job="${esc(job.name)}" data-url="${esc(d.url)}">${cells.join("")}</tr>`);
    });
  }
  $("jobs").tBodies[0].innerHTML = rows.join("");
}

// A line chart of `series` ([{cls, values}]) over x = 0..n-1, one circle per value.
function chart(attrs, series, labels, format) {
  const W = 320, H = 110, L = 52, R = 8, T = 8, B = 18;
  const n = Math.max(...series.map((s) => s.values.length), 0);
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  const x = (i) => L + (n <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
  const y = (v) => T + (H - T - B) * (1 - v / max);
  let g = `<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"/>`;
  g += `<text x="${L - 4}" y="${T + 8}" text-anchor="end">${esc(format(max))}</text><text x="${L - 4}" y="${H - B}" text-anchor="end">0</text>`;
  if (labels.length) {
    g += `<text x="${L}" y="${H - 4}">${esc(labels[0])}</text><text x="${W - R}" y="${H - 4}" text-anchor="end">${esc(labels[labels.length - 1])}</text>`;
  }
  for (const s of series) {
    const pts = s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
    g += `<polyline class="${s.cls}" points="${pts.join(" ")}"/>`;
    g += s.values.map((v, i) => `<circle class="${s.cls}" r="2.5" cx="${x(i).toFixed(1)}" cy="${y(v).toFixed(1)}"><title>${esc((s.titles || [])[i] || format(v))}</title></circle>`).join("");
  }
  return `<svg ${attrs} viewBox="0 0 ${W} ${H}" width="${W}" height="${H}">${g}</svg>`;
}

function runCharts(status) {
  const cards = status.jobs.map((job) => {
    const runs = job.recent_runs.slice().reverse();
    const changed = runs.map((r) => Math.max(0, ...r.destinations.map((d) => d.changed_bytes)));
    const sent = runs.map((r) => r.destinations.reduce((a, d) => a + d.sent_bytes, 0));
    const titles = (what, vals) => runs.map((r, i) => `run ${r.id}, ${r.started}: ${bytes(vals[i])} ${what}`);
    const svg = chart(`class="runs" data-job="${esc(job.name)}"`, [
      { cls: "changed", values: changed, titles: titles("changed", changed) },
      { cls: "sent", values: sent, titles: titles("sent", sent) },
    ], runs.length ? ["run " + runs[0].id, "run " + runs[runs.length - 1].id] : [], bytes);
    const facts = runs.length ? `${runs.length} runs, last sent ${bytes(sent[sent.length - 1])}` : "no runs yet";
    return `<div class="card"><h3>${esc(job.name)}</h3><div class="facts">${facts}</div>${svg}</div>`;
  });
  $("runs").innerHTML = cards.join("");
}

function repositoryCharts(status) {
  const cards = (status.repositories || []).map((repo) => {
    const s = repo.samples;
    const last = s[s.length - 1];
    const ratio = last && last.stored_bytes > 0 ? (last.logical_bytes / last.stored_bytes).toFixed(2) + "×" : "—";
    const svg = chart(`class="repo" data-url="${esc(repo.url)}"`, [
      { cls: "logical", values: s.map((x) => x.logical_bytes) },
      { cls: "stored", values: s.map((x) => x.stored_bytes) },
    ], s.length ? [s[0].at.slice(0, 16).replace("T", " "), s[s.length - 1].at.slice(11, 16)] : [], bytes);
    const facts = last ? `${bytes(last.stored_bytes)} stored for ${bytes(last.logical_bytes)} in ${last.snapshots} snapshots of ${last.volumes} volumes: <b class="ratio">${ratio}</b>` : "";
    return `<div class="card"><h3 title="${esc(repo.url)}">${esc(repo.url)}</h3><div class="facts">${facts}</div>${svg}</div>`;
  });
  $("repositories").innerHTML = cards.length ? cards.join("") : '<p class="muted">No repository destination sampled yet (after a job\'s first run).</p>';
}

// One volume's chain: boxes in age order, an arc from each delta up to its base.
function chainSvg(url, chain, protectedName) {
  const BW = 112, BH = 30, GAP = 14, TOP = 56;
  const index = new Map(chain.snapshots.map((s, i) => [s.name, i]));
  const x = (i) => 4 + i * (BW + GAP);
  let arcs = "", boxes = "";
  chain.snapshots.forEach((s, i) => {
    const base = s.base && s.base.volume === chain.volume ? index.get(s.base.snapshot) : undefined;
    if (base !== undefined) {
      const x1 = x(i) + BW / 2, x2 = x(base) + BW / 2, h = Math.min(TOP - 6, 14 + 8 * Math.abs(i - base));
      arcs += `<path class="arc" d="M${x1},${TOP} C${x1},${TOP - h} ${x2},${TOP - h} ${x2},${TOP}"/>`;
    }
    const kind = s.full ? "full map" : s.base ? `delta of ${s.base.volume === chain.volume ? "" : s.base.volume + "@"}${s.base.snapshot}` : "delta";
    const cls = ["snap", s.full ? "full" : "", s.name === protectedName ? "protected" : ""].join(" ");
    boxes += `<g class="${cls}" data-name="${esc(s.name)}" data-full="${s.full}" data-base="${esc(s.base ? s.base.volume + "@" + s.base.snapshot : "")}" data-protected="${s.name === protectedName}">` +
      `<title>${esc(s.name)}\n${esc(s.created)}\n${bytes(s.size)}, ${esc(kind)}, depth ${s.depth}</title>` +
      `<rect x="${x(i)}" y="${TOP}" width="${BW}" height="${BH}" rx="3"/>` +
      `<text class="label" x="${x(i) + 5}" y="${TOP + 13}">${esc(s.name.length > 18 ? s.name.slice(0, 17) + "…" : s.name)}</text>` +
      `<text class="label" x="${x(i) + 5}" y="${TOP + 25}">${s.full ? "full" : "Δ" + s.depth}${s.name === protectedName ? " · base" : ""}</text>` +
      `<text x="${x(i) + 2}" y="${TOP + BH + 12}">${esc(s.created.slice(5, 16).replace("T", " "))}</text></g>`;
  });
  const W = Math.max(x(chain.snapshots.length) + 4, 200);
  return `<svg class="chain-svg" viewBox="0 0 ${W} ${TOP + BH + 16}" width="${W}" height="${TOP + BH + 16}">${arcs}${boxes}</svg>`;
}

function chains(doc) {
  const out = [];
  for (const d of doc.destinations) {
    // A failed read (a store that is no repository, an older server, one down) is
    // said beside the last chains read, which stay.
    const read = d.read ? "read " + esc(d.read.slice(0, 19).replace("T", " ")) : d.problem ? "not read" : "not read yet (a repository is read after each run)";
    const problem = d.problem ? ` <span class="view-problem">${d.read ? "the last read failed: " : ""}${esc(d.problem)}</span>` : "";
    out.push(`<h3 class="chain-dest" title="${esc(d.url)}" data-url="${esc(d.url)}" data-read="${esc(d.read || "")}" data-problem="${esc(d.problem || "")}">${esc(d.url)} <span class="muted">${read}</span>${problem}</h3>`);
    for (const c of d.volumes) {
      const base = d.bases[c.volume];
      const from = c.origin ? `${c.origin.volume}@${c.origin.snapshot}` : "";
      const origin = c.origin ? ` <span class="origin">clone of ${esc(from)}</span>` : "";
      out.push(`<div class="chain" data-url="${esc(d.url)}" data-volume="${esc(c.volume)}" data-origin="${esc(from)}"><div><b>${esc(c.volume)}</b>${origin} <span class="muted">${c.snapshots.length} snapshots</span></div>${chainSvg(d.url, c, base ? base.snapshot : null)}</div>`);
    }
  }
  $("chains").innerHTML = out.join("");
}

let picked = null;
// What the charts were last drawn from: they do not depend on the time, so a refresh
// that brought no new run or sample leaves them alone (at 200 jobs, most refreshes).
const drawn = { runs: null, repositories: null };

function redraw(key, data, draw, status) {
  const text = JSON.stringify(data);
  if (drawn[key] !== text) {
    draw(status);
    drawn[key] = text;
  }
}

function chainPicker(status) {
  const sel = $("chain-job");
  const names = status.jobs.map((j) => j.name);
  if (sel.options.length !== names.length || names.some((n, i) => sel.options[i].value !== n)) {
    sel.innerHTML = names.map((n) => `<option value="${esc(n)}">${esc(n)}</option>`).join("");
  }
  if (picked === null || !names.includes(picked)) picked = names[0] || null;
  sel.value = picked || "";
}

async function refresh() {
  try {
    const status = await api("/api/status");
    $("daemon").textContent = `pid ${status.daemon.pid}, ${status.jobs.length} jobs, config ${status.daemon.config}`;
    const problem = status.daemon.config_error ? "The config file was not reloaded: " + status.daemon.config_error : "";
    $("problem").hidden = !problem;
    $("problem").textContent = problem;
    jobsTable(status);
    redraw("runs", status.jobs.map((j) => [j.name, j.recent_runs]), runCharts, status);
    redraw("repositories", status.repositories, repositoryCharts, status);
    chainPicker(status);
    if (picked) chains(await api("/api/chains?job=" + encodeURIComponent(picked)));
    $("updated").textContent = "updated " + status.daemon.now.slice(11, 19) + " UTC";
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (e) {
    $("problem").hidden = false;
    $("problem").textContent = "Cannot reach the daemon: " + e.message;
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, REFRESH_MS);
}

$("chain-job").addEventListener("change", (e) => { picked = e.target.value; refresh(); });
loop();
