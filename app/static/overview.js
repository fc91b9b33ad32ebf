// Overview: the GPU pool with live telemetry and each GPU's current run, and every tag.
"use strict";

(() => {
  const { api, el, fixed, bpb, badge, experimentLink, tagLink, progressBar, megabytes, age } = Dash;
  const POOL_EVERY_MS = 1500;
  const TAGS_EVERY_MS = 4000;

  // An experiment that finished between the pool read and this one is simply shown without progress.
  async function currentRun(experimentId) {
    try {
      return await api(`/api/experiment/${encodeURIComponent(experimentId)}`);
    } catch (error) {
      if (error instanceof Dash.ApiError && error.status === 404) return null;
      throw error;
    }
  }

  async function refreshPool() {
    const pool = await api("/api/pool/list");
    const runs = await Promise.all(pool.workers.map((w) => (w.current_experiment_id ? currentRun(w.current_experiment_id) : null)));
    const body = document.querySelector("#gpus tbody");
    body.replaceChildren(...pool.workers.map((worker, i) => gpuRow(worker, runs[i])));
    document.getElementById("gpus-empty").hidden = pool.workers.length > 0;
    document.getElementById("pool-counts").textContent =
      `${pool.total} total · ${pool.training} training · ${pool.idle} idle · ${pool.offline} offline`;
  }

  function gpuRow(worker, run) {
    const t = worker.telemetry || {};
    const progress = run && run.progress ? run.progress : {};
    const memory = t.memory_used_mb !== undefined && t.memory_used_mb !== null
      ? `${megabytes(t.memory_used_mb)} / ${megabytes(t.vram_total_mb ?? worker.vram_mb)}` : "—";
    return el("tr", { dataset: { gpu: worker.id } },
      el("td", {}, worker.id),
      el("td", {}, worker.host || "—"),
      el("td", {}, t.name || worker.gpu_name),
      el("td", {}, badge(worker.status)),
      el("td", { class: "num" }, t.utilization_pct === null || t.utilization_pct === undefined ? "—" : `${fixed(t.utilization_pct, 0)}%`),
      el("td", { class: "num" }, memory),
      el("td", { class: "num" }, t.temperature_c === null || t.temperature_c === undefined ? "—" : `${fixed(t.temperature_c, 0)} °C`),
      el("td", { class: "current-run" }, worker.current_experiment_id
        ? [experimentLink(worker.current_experiment_id, run ? run.description : worker.current_experiment_id),
          run ? el("div", { class: "muted" }, tagLink(run.tag), " · ", run.status) : null]
        : "—"),
      el("td", { class: "progress" }, run ? progressBar(progress.progress_pct) : "—"),
      el("td", { class: "num step" }, progress.step ?? "—"),
      el("td", { class: "num loss" }, fixed(progress.loss, 4)),
      el("td", {}, age(worker.last_heartbeat)),
    );
  }

  // A count links to the tag's experiment table filtered to what it counts.
  const filtered = (name, status, count) =>
    el("a", { href: `/tag/${encodeURIComponent(name)}${status ? `?status=${status}` : ""}` }, count);

  async function refreshTags() {
    const tags = (await api("/api/report/overview")).tags;
    document.querySelector("#tags tbody").replaceChildren(...tags.map(tagRow));
    document.getElementById("tags-empty").hidden = tags.length > 0;
  }

  function tagRow(tag) {
    const noise = tag.noise;
    return el("tr", { dataset: { tag: tag.name } },
      el("td", {}, tagLink(tag.name)),
      el("td", {}, tag.profile),
      el("td", { class: "num" }, tag.best_experiment_id ? experimentLink(tag.best_experiment_id, bpb(tag.best_val_bpb)) : "—"),
      el("td", { class: "num" }, filtered(tag.name, "", tag.total_experiments)),
      el("td", { class: "num" }, filtered(tag.name, "keep", tag.kept_experiments)),
      el("td", { class: "num" }, filtered(tag.name, "discard", tag.discarded_experiments)),
      el("td", { class: "num" }, filtered(tag.name, "crash", tag.crashed_experiments)),
      el("td", { class: "num running" }, filtered(tag.name, "running", tag.running)),
      el("td", { class: "num" }, filtered(tag.name, "queued", tag.queued)),
      el("td", { class: "num" }, noise.sigma === null ? "not measured" : `${fixed(noise.sigma, 6)} (${noise.runs} runs)`),
      el("td", { class: "num" }, fixed(tag.gpu_hours, 3)),
      el("td", { class: "num" }, tag.experiments_per_gpu_hour === null ? "—" : fixed(tag.experiments_per_gpu_hour, 1)),
    );
  }

  Dash.poll(refreshPool, POOL_EVERY_MS);
  Dash.poll(refreshTags, TAGS_EVERY_MS);
})();
