// batchpool's web page: refreshes the live part of a page, sorts the runs table, draws
// the timeline. No framework, no build step. Everything shown comes from the server's
// escaped HTML or is written with textContent / the canvas: store text never becomes code.
"use strict";
(function () {
  const COLORS = {
    Pending: "#9ca3af", Ready: "#60a5fa", Running: "#2563eb", Success: "#16a34a",
    Failed: "#dc2626", Error: "#9333ea", Cancelled: "#f59e0b",
  };

  function liveState() {
    const el = document.getElementById("state");
    return el ? { live: el.dataset.live === "1", every: Number(el.dataset.every || 2000) } : null;
  }

  function say(text) {
    const conn = document.getElementById("conn");
    if (conn) conn.textContent = text;
  }

  // -- refresh: fetch this page's live part again (?fragment=1) and put it in place --------
  async function refresh() {
    const url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    url.searchParams.delete("notice");
    let response;
    try {
      response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    } catch (err) {
      say("the server does not answer (" + err + "); retrying");
      return;
    }
    if (!response.ok) {
      say("the server answered " + response.status + "; retrying");
      return;
    }
    const html = await response.text();
    const main = document.getElementById("live");
    const open = new Set(
      Array.from(main.querySelectorAll("details[open] summary a")).map((a) => a.textContent)
    );
    main.innerHTML = html;  // the server's template output: escaped text only
    main.querySelectorAll("details summary a").forEach((a) => {
      if (open.has(a.textContent)) a.closest("details").open = true;
    });
    say("");
    afterRender();
  }

  function schedule() {
    const state = liveState();
    if (!state) return;
    window.setTimeout(async () => {
      const now = liveState();
      if (now && now.live && !document.hidden) await refresh();
      schedule();
    }, state.every);
  }

  // -- sorting the runs table --------------------------------------------------------------
  let sortKey = sessionStorage.getItem("batchpool.sortKey") || "created";
  let sortDir = sessionStorage.getItem("batchpool.sortDir") || "desc";

  function sortRuns() {
    const table = document.getElementById("runs");
    if (!table) return;
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const value = (row) => {
      const cell = row.querySelector('td[data-key="' + sortKey + '"]');
      const text = cell ? cell.dataset.sort || "" : "";
      const number = Number(text);
      return text !== "" && !Number.isNaN(number) ? number : text.toLowerCase();
    };
    rows.sort((a, b) => {
      const x = value(a), y = value(b);
      const order = x < y ? -1 : x > y ? 1 : 0;
      return sortDir === "asc" ? order : -order;
    });
    rows.forEach((row) => body.appendChild(row));
    table.querySelectorAll("th[data-key]").forEach((th) => {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.dataset.key === sortKey) th.classList.add("sorted-" + sortDir);
    });
  }

  document.addEventListener("click", (event) => {
    const th = event.target.closest("table.sortable th[data-key]");
    if (!th) return;
    if (sortKey === th.dataset.key) sortDir = sortDir === "asc" ? "desc" : "asc";
    else { sortKey = th.dataset.key; sortDir = "desc"; }
    sessionStorage.setItem("batchpool.sortKey", sortKey);
    sessionStorage.setItem("batchpool.sortDir", sortDir);
    sortRuns();
  });

  // -- the timeline: one bar per job that started, one lane per worker --------------------
  async function drawTimeline() {
    const canvas = document.getElementById("timeline");
    if (!canvas) return;
    let data;
    try {
      const response = await fetch(canvas.dataset.src, { credentials: "same-origin" });
      if (!response.ok) return;
      data = await response.json();
    } catch (err) {
      return;
    }
    const lanes = data.lanes.length;
    const labelWidth = lanes ? 170 : 0;
    const row = lanes > 40 ? Math.max(2, Math.floor(480 / lanes)) : 14;
    const height = Math.max(60, lanes * row + 34);
    const width = canvas.clientWidth || 900;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";
    if (!data.bars.length) {
      ctx.fillStyle = "#6b7280";
      ctx.fillText("no job has started yet", 10, 20);
      return;
    }
    let end = data.now;
    data.bars.forEach((b) => { if (b[2] !== null && b[2] > end) end = b[2]; });
    const span = Math.max(end, 0.001);
    const plot = width - labelWidth - 10;
    const x = (t) => labelWidth + (t / span) * plot;
    if (row >= 10) {
      ctx.fillStyle = "#374151";
      data.lanes.forEach((name, i) => {
        ctx.fillText(name.length > 28 ? name.slice(0, 27) + "…" : name, 4, i * row + row - 3);
      });
    }
    data.bars.forEach((b) => {
      const stop = b[2] === null ? data.now : b[2];
      ctx.fillStyle = COLORS[data.states[b[3]]] || "#9ca3af";
      const left = x(b[1]);
      ctx.fillRect(left, b[0] * row + 1, Math.max(1, x(stop) - left), Math.max(1, row - 2));
    });
    // the time axis: seconds since the first job started
    const axis = lanes * row + 4;
    ctx.strokeStyle = "#d1d5db";
    ctx.beginPath();
    ctx.moveTo(labelWidth, axis);
    ctx.lineTo(width - 10, axis);
    ctx.stroke();
    ctx.fillStyle = "#6b7280";
    for (let i = 0; i <= 5; i++) {
      const t = (span * i) / 5;
      const label = t >= 120 ? (t / 60).toFixed(1) + " min" : t.toFixed(t < 10 ? 1 : 0) + " s";
      ctx.fillText(label, Math.min(x(t), width - 50), axis + 14);
    }
  }

  // -- following a running job's log --------------------------------------------------------
  function followLogs() {
    const follow = document.getElementById("follow");
    if (!follow || !follow.checked) return;
    const logs = document.querySelectorAll("pre.log");
    if (!logs.length) return;
    const newest = logs[0];  // attempts are listed newest first
    newest.scrollTop = newest.scrollHeight;
  }

  function afterRender() {
    sortRuns();
    drawTimeline();
    followLogs();
  }

  document.addEventListener("DOMContentLoaded", () => {
    afterRender();
    schedule();
    window.addEventListener("resize", drawTimeline);
  });
})();
