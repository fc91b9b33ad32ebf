// Shared by every dashboard page: API calls with the bearer token, the token form, polling,
// formatting, charts (uPlot) and diffs. No build step: plain browser JavaScript.
"use strict";

const Dash = (() => {
  // sessionStorage: the token lives as long as this tab, never in a URL or a cookie.
  const TOKEN_KEY = "autoresearch.apiToken";
  const LIVE_STATUSES = ["queued", "running", "confirming"];
  const CHART_HEIGHT = 300;
  // Tick spacings of an x axis that counts (experiments, steps): never a fraction.
  const WHOLE_NUMBER_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

  class Unauthorized extends Error {}

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // --- the API and the token ------------------------------------------------------------

  async function api(path, body) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { headers, cache: "no-store" };
    if (body !== undefined) {
      init.method = "POST";
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      askForToken(Boolean(token));
      throw new Unauthorized("the API needs its token");
    }
    const data = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new ApiError(response.status, data.error || response.statusText);
    showContent();
    return data;
  }

  function askForToken(refused) {
    if (refused) sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById("content").hidden = true;
    document.getElementById("login").hidden = false;
    document.getElementById("login-error").hidden = !refused;
    document.getElementById("forget-token").hidden = true;
    setStatus("waiting for the API token", true);
    document.getElementById("token-input").focus();
  }

  function showContent() {
    document.getElementById("login").hidden = true;
    document.getElementById("content").hidden = false;
    document.getElementById("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
  }

  function installTokenForm() {
    document.getElementById("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = document.getElementById("token-input");
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      resumeAll();
    });
    document.getElementById("forget-token").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    });
  }

  // --- polling --------------------------------------------------------------------------

  const pollers = [];

  function setStatus(text, isError) {
    const status = document.getElementById("live-status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  // Each poller runs its function, then again `intervalMs` after it finished; a 401 stops it
  // until a token is entered. `fn` returns false to stop for good (a finished experiment).
  function poll(fn, intervalMs) {
    const poller = { fn, intervalMs, timer: null, stopped: false };
    pollers.push(poller);
    runPoller(poller);
    return poller;
  }

  async function runPoller(poller) {
    clearTimeout(poller.timer);
    if (poller.stopped) return;
    try {
      if ((await poller.fn()) === false) {
        poller.stopped = true;
        return;
      }
      setStatus(`live · updated ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      if (error instanceof Unauthorized) return;
      setStatus(`error: ${error.message}`, true);
      console.error(error);
    }
    poller.timer = setTimeout(() => runPoller(poller), poller.intervalMs);
  }

  function resumeAll() {
    for (const poller of pollers) runPoller(poller);
  }

  // --- DOM and formatting ---------------------------------------------------------------

  // el("a", {href: "/x", class: "y"}, "text", child): text is always set as text, never as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const fixed = (value, digits) => (value === null || value === undefined ? "—" : Number(value).toFixed(digits));
  const bpb = (value) => fixed(value, 6);

  function signed(value, digits = 6) {
    if (value === null || value === undefined) return "—";
    return `${value > 0 ? "+" : value < 0 ? "−" : "±"}${Math.abs(value).toFixed(digits)}`;
  }

  // How many runs back an experiment's score: `runs` is a list of run records, or a count.
  function runCount(record) {
    if (Array.isArray(record.runs)) return record.runs.filter((r) => r.val_bpb !== null && r.val_bpb !== undefined).length;
    if (typeof record.runs === "number") return record.runs;
    return record.val_bpb === null || record.val_bpb === undefined ? 0 : 1;
  }

  // val_bpb with its uncertainty: "1.234567 ± 0.000400 (n=3)".
  function bpbWithUncertainty(record) {
    if (record.val_bpb === null || record.val_bpb === undefined) return "—";
    const sigma = record.sigma !== null && record.sigma !== undefined ? ` ± ${fixed(record.sigma, 6)}` : "";
    return `${bpb(record.val_bpb)}${sigma} (n=${runCount(record)})`;
  }

  function seconds(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "—";
    if (value < 90) return `${value.toFixed(1)} s`;
    if (value < 5400) return `${(value / 60).toFixed(1)} min`;
    return `${(value / 3600).toFixed(2)} h`;
  }

  // Wall time of an experiment: the worker's total when it has one, else its clock so far.
  function duration(record) {
    if (record.total_seconds !== null && record.total_seconds !== undefined) return record.total_seconds;
    if (!record.started_at) return null;
    const end = record.finished_at ? Date.parse(record.finished_at) : Date.now();
    return (end - Date.parse(record.started_at)) / 1000;
  }

  function age(iso) {
    if (!iso) return "—";
    return `${seconds(Math.max(0, (Date.now() - Date.parse(iso)) / 1000))} ago`;
  }

  function megabytes(value) {
    return value === null || value === undefined ? "—" : `${(value / 1024).toFixed(1)} GB`;
  }

  const badge = (status) => el("span", { class: `badge ${status}` }, status);
  const experimentLink = (id, text) => el("a", { href: `/experiment/${encodeURIComponent(id)}` }, text ?? id);
  const tagLink = (name) => el("a", { href: `/tag/${encodeURIComponent(name)}` }, name);

  function progressBar(percent) {
    if (percent === null || percent === undefined) return "—";
    const clamped = Math.max(0, Math.min(100, percent));
    return el("div", { class: "bar", role: "progressbar", "aria-valuenow": clamped.toFixed(1) },
      el("span", { style: `width:${clamped}%` }), el("em", {}, `${clamped.toFixed(1)}%`));
  }

  function facts(container, pairs) {
    container.replaceChildren(...pairs.map(([label, value]) =>
      el("div", {}, el("span", { class: "label" }, label), el("span", { class: "value" }, value ?? "—"))));
  }

  // A unified diff, one span per line, classed for the colours of pre.diff; or a one-line note.
  function renderDiff(pre, text, emptyMessage) {
    if (!text) {
      pre.replaceChildren(el("span", { class: "meta" }, emptyMessage));
      return;
    }
    pre.replaceChildren(...text.replace(/\n$/, "").split("\n").map((line) => {
      let kind = "ctx";
      if (line.startsWith("+++") || line.startsWith("---")) kind = "meta";
      else if (line.startsWith("@@")) kind = "hunk";
      else if (line.startsWith("+")) kind = "add";
      else if (line.startsWith("-")) kind = "del";
      return el("span", { class: kind }, line || " ");
    }));
  }

  // --- charts ---------------------------------------------------------------------------

  const charts = new Map();

  // Draw or update a uPlot chart in `container`; it is rebuilt only when its series change.
  function chart(container, { xLabel, yLabel, series, data, yDigits = 4, onPick }) {
    const signature = JSON.stringify([xLabel, yLabel, series.map((s) => s.label)]);
    // How many values it shows, for a reader (or a test) that cannot see the canvas.
    container.dataset.points = data.slice(1).reduce((n, ys) => n + ys.filter((y) => y !== null && y !== undefined).length, 0);
    let plot = charts.get(container);
    if (plot && plot.signature === signature) {
      plot.setData(data);
      return plot;
    }
    if (plot) plot.destroy();
    const options = {
      width: Math.max(300, container.clientWidth - 16),
      height: CHART_HEIGHT,
      scales: { x: { time: false } },
      series: [{ label: xLabel }, ...series],
      axes: [
        { label: xLabel, incrs: WHOLE_NUMBER_STEPS },
        { label: yLabel, size: 80, values: (u, ticks) => ticks.map((t) => t.toFixed(yDigits)) },
      ],
      cursor: { points: { size: 9 } },
    };
    plot = new uPlot(options, data, container);
    plot.signature = signature;
    if (onPick) {
      plot.over.style.cursor = "pointer";
      plot.over.addEventListener("click", () => {
        if (plot.cursor.idx !== null && plot.cursor.idx !== undefined) onPick(plot.cursor.idx);
      });
    }
    charts.set(container, plot);
    return plot;
  }

  window.addEventListener("resize", () => {
    for (const [container, plot] of charts) plot.setSize({ width: Math.max(300, container.clientWidth - 16), height: CHART_HEIGHT });
  });

  // Series styles: dots only, or a line (stepped for a running best).
  const dots = (label, colour) => ({ label, stroke: colour, fill: colour, paths: () => null, points: { show: true, size: 7, fill: colour } });
  // uPlot draws a curve's points by itself when they are sparse, so a one-point curve still
  // shows; a stepped running best has its points drawn by the series it summarises.
  const line = (label, colour, stepped) => ({
    label, stroke: colour, width: 2, spanGaps: true,
    ...(stepped ? { paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } } : {}),
  });

  installTokenForm();  // this script runs at the end of <body>: the form exists

  return {
    LIVE_STATUSES, Unauthorized, ApiError, api, poll, el, fixed, bpb, signed, runCount, bpbWithUncertainty,
    seconds, duration, age, megabytes, badge, experimentLink, tagLink, progressBar, facts, renderDiff, chart,
    dots, line,
  };
})();
