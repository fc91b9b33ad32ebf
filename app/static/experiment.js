// Experiment page: what it tried, its runs, the diffs against its parent and the tag's best,
// the loss curves (live while it trains), the log tail, and cancel.
"use strict";

(() => {
  const { api, el, fixed, bpb, signed, badge, experimentLink, tagLink, bpbWithUncertainty, duration, seconds } = Dash;
  const experimentId = document.getElementById("experiment-id").dataset.experiment;
  const RECORD_EVERY_MS = 1500;
  const LOG_EVERY_MS = 2000;
  const BEST_EVERY_MS = 10000;
  const LOG_BYTES = 12000;
  const RUN_COLOURS = ["#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#558b2f"];

  let record = null;
  let bestShownFor = null;  // the best experiment the best-diff was drawn against
  let followersStarted = false;
  // The running run's progress as this page saw it, step -> loss: the live curve when the
  // server stores no curve of its own for the run.
  const seenProgress = new Map();

  const isLive = (r) => Dash.LIVE_STATUSES.includes(r.status);

  function renderRecord(r) {
    document.title = `${r.description} · autoresearch`;
    document.getElementById("tag-crumb").replaceChildren("tag ", tagLink(r.tag));
    document.getElementById("description").textContent = r.description;
    document.getElementById("hypothesis").textContent = r.hypothesis;
    const error = document.getElementById("error");
    error.hidden = !r.error;
    error.textContent = r.error || "";
    Dash.facts(document.getElementById("facts"), [
      ["status", badge(r.status)],
      ["val_bpb", bpbWithUncertainty(r)],
      ["delta vs best", signed(r.delta)],
      ["z", r.z === null || r.z === undefined ? "—" : fixed(r.z, 2)],
      ["near miss", r.near_miss ? "yes" : "no"],
      ["category", r.category],
      ["commit", r.commit_sha.slice(0, 12)],
      ["parent", r.parent_id ? experimentLink(r.parent_id) : "—"],
      ["GPU", r.gpu_id || "—"],
      ["profile", r.profile || "—"],
      ["steps", r.num_steps ?? "—"],
      ["params", r.num_params_m === null ? "—" : `${fixed(r.num_params_m, 1)} M`],
      ["peak VRAM", r.peak_vram_mb === null ? "—" : `${fixed(r.peak_vram_mb, 0)} MB`],
      ["training", seconds(r.training_seconds)],
      ["duration", seconds(duration(r))],
      ["created", r.created_at ? new Date(r.created_at).toLocaleString() : "—"],
    ]);
    const cancel = document.getElementById("cancel");
    cancel.hidden = !isLive(r);
    cancel.disabled = r.cancel_requested;
    cancel.textContent = r.cancel_requested ? "Cancel requested…" : "Cancel this experiment";
    renderRuns(r);
  }

  // The runs of the experiment; a record without a run list is its own single run.
  function runsOf(r) {
    if (Array.isArray(r.runs) && r.runs.length) return r.runs;
    return [{ ...r, id: "—", purpose: "first", seed: null }];
  }

  function renderRuns(r) {
    document.querySelector("#runs tbody").replaceChildren(...runsOf(r).map((run) => el("tr", {},
      el("td", {}, run.id),
      el("td", {}, run.purpose ?? "—"),
      el("td", { class: "num" }, run.seed ?? "—"),
      el("td", {}, badge(run.status)),
      el("td", { class: "num" }, bpb(run.val_bpb)),
      el("td", {}, run.gpu_id || "—"),
      el("td", { class: "num" }, fixed(run.training_seconds, 1)),
      el("td", { class: "num" }, run.num_steps ?? "—"),
      el("td", { class: "num" }, run.peak_vram_mb === null || run.peak_vram_mb === undefined ? "—" : `${fixed(run.peak_vram_mb, 0)} MB`),
    )));
  }

  // One [steps, losses] table per curve: the stored curve of each run, and the live one seen here.
  function curves(r) {
    const found = [];
    for (const [i, run] of (Array.isArray(r.runs) ? r.runs : []).entries()) {
      if (Array.isArray(run.curve) && run.curve.length) {
        found.push({ label: `run ${run.replicate ?? i}${run.purpose ? ` (${run.purpose})` : ""}`, points: run.curve });
      }
    }
    if (r.progress && r.progress.step !== null && Number.isFinite(r.progress.loss)) {
      seenProgress.set(r.progress.step, r.progress.loss);
    }
    const liveRunHasCurve = Array.isArray(r.runs) && r.runs.some((run) => isLive(run) && run.curve && run.curve.length);
    if (seenProgress.size && !liveRunHasCurve) {
      found.push({ label: isLive(r) ? "live" : "seen live", points: [...seenProgress].map(([step, loss]) => ({ step, loss })) });
    }
    return found;
  }

  function renderCurves(r) {
    const found = curves(r).map((c) => ({ ...c, points: c.points.filter((p) => Number.isFinite(p.loss)).sort((a, b) => a.step - b.step) }));
    const container = document.getElementById("loss-chart");
    const empty = !found.some((c) => c.points.length);
    document.getElementById("loss-empty").hidden = !empty;
    container.hidden = empty;
    if (empty) return;
    const data = uPlot.join(found.map((c) => [c.points.map((p) => p.step), c.points.map((p) => p.loss)]));
    Dash.chart(container, {
      xLabel: "step",
      yLabel: "training loss",
      yDigits: 3,
      series: found.map((c, i) => Dash.line(c.label, RUN_COLOURS[i % RUN_COLOURS.length], false)),
      data,
    });
  }

  async function refreshRecord() {
    record = await api(`/api/experiment/${encodeURIComponent(experimentId)}`);
    renderRecord(record);
    renderCurves(record);
    if (!followersStarted) {
      // What needs the record (its parent, its tag's best) starts once it is known.
      await renderParentDiff(record);
      followersStarted = true;
      Dash.poll(refreshLog, LOG_EVERY_MS);
      Dash.poll(refreshBestDiff, BEST_EVERY_MS);
    }
    return isLive(record);  // a finished experiment no longer changes
  }

  async function renderParentDiff(r) {
    const pre = document.getElementById("diff-parent");
    if (!r.parent_id) {
      Dash.renderDiff(pre, null, "No parent recorded (register or submit with parent_id).");
      return;
    }
    const d = await api("/api/report/diff", { experiment_a: r.parent_id, experiment_b: r.id });
    document.getElementById("parent-delta").textContent = d.delta_bpb === null ? "" : `val_bpb ${signed(d.delta_bpb)}`;
    Dash.renderDiff(pre, d.diff, d.diff === null ? "A train.py source is missing on one side." : "The same train.py as its parent.");
  }

  async function refreshBestDiff() {
    const pre = document.getElementById("diff-best");
    let best;
    try {
      best = (await api("/api/experiment/best", { tag: record.tag })).best.experiment_id;
    } catch (error) {
      if (!(error instanceof Dash.ApiError && error.status === 404)) throw error;
      Dash.renderDiff(pre, null, "The tag has no best yet.");
      return true;
    }
    if (best === bestShownFor) return true;
    bestShownFor = best;
    if (best === record.id) {
      document.getElementById("best-delta").textContent = "";
      Dash.renderDiff(pre, null, "This experiment is the tag's best.");
      return true;
    }
    const d = await api("/api/report/diff", { experiment_a: best, experiment_b: record.id });
    document.getElementById("best-delta").replaceChildren("best ", experimentLink(best), d.delta_bpb === null ? "" : ` · val_bpb ${signed(d.delta_bpb)}`);
    Dash.renderDiff(pre, d.diff, d.diff === null ? "A train.py source is missing on one side." : "The same train.py as the best.");
    return true;
  }

  // The log from the API, else the tail stored with the newest run (a worker on another host).
  async function refreshLog() {
    const log = (await api(`/api/experiment/${encodeURIComponent(experimentId)}/log?max_bytes=${LOG_BYTES}`)).log;
    const runs = Array.isArray(record.runs) ? record.runs : [];
    const stored = runs.length ? runs[runs.length - 1].log_tail : null;
    const pre = document.getElementById("log");
    const text = log || stored || "";
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    if (pre.textContent !== text) {
      pre.textContent = text;
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
    return isLive(record);  // a finished run's log no longer changes
  }

  document.getElementById("cancel").addEventListener("click", async (event) => {
    if (!confirm(`Cancel ${experimentId}? A running training is stopped.`)) return;
    event.target.disabled = true;
    record = await api("/api/experiment/cancel", { experiment_id: experimentId });
    renderRecord(record);
  });

  Dash.poll(refreshRecord, RECORD_EVERY_MS);
})();
