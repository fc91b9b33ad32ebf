// Tag page: the progress chart, the experiment table (filter, sort), strategy, suggestions, near misses.
"use strict";

(() => {
  const { api, el, fixed, bpb, signed, badge, experimentLink, bpbWithUncertainty, duration, seconds } = Dash;
  const tag = document.getElementById("tag-name").dataset.tag;
  const TABLE_EVERY_MS = 2000;
  const SLOW_EVERY_MS = 10000;
  const COLOURS = { keep: "#2e7d32", discard: "#9e9e9e", best: "#1b5e20" };

  // The table's state; the first filters may come from the link that led here (?status=keep).
  const query = new URLSearchParams(location.search);
  const state = {
    experiments: [],
    sortKey: "created_at",
    sortDirection: 1,
    status: query.get("status") || "",
    category: query.get("category") || "",
  };

  // What the verdict column says: the decision and how sure it is, or that none is made yet.
  function verdict(e) {
    if (Dash.LIVE_STATUSES.includes(e.status)) return "pending";
    if (e.status === "keep" || e.status === "discard") {
      const name = e.status === "discard" && e.near_miss ? "near miss" : e.status;
      return e.z !== null && e.z !== undefined ? `${name} (z ${fixed(e.z, 1)})` : name;
    }
    return "none";
  }

  // Sort value of each column: numbers sort as numbers, missing values always last.
  const sortValue = {
    created_at: (e) => e.created_at,
    status: (e) => e.status,
    verdict: (e) => verdict(e),
    val_bpb: (e) => e.val_bpb,
    delta: (e) => e.delta,
    category: (e) => e.category,
    description: (e) => e.description.toLowerCase(),
    gpu_id: (e) => e.gpu_id,
    duration: (e) => duration(e),
  };

  function compare(a, b) {
    const x = sortValue[state.sortKey](a);
    const y = sortValue[state.sortKey](b);
    const missingX = x === null || x === undefined;
    const missingY = y === null || y === undefined;
    if (missingX || missingY) return missingX - missingY;
    const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return order * state.sortDirection || a.created_at.localeCompare(b.created_at);
  }

  function fillSelect(select, values, chosen) {
    const options = [...new Set([...values, ...(chosen ? [chosen] : [])])].sort();
    // Rebuilt only when the choices change: a rebuild would close a list the user has open.
    const current = [...select.options].map((o) => o.value).slice(1);
    if (current.join("\n") === options.join("\n")) {
      select.value = chosen;
      return;
    }
    select.replaceChildren(el("option", { value: "" }, "all"),
      ...options.map((v) => el("option", { value: v, selected: v === chosen }, v)));
  }

  function renderTable() {
    const all = state.experiments;
    fillSelect(document.getElementById("status-filter"), all.map((e) => e.status), state.status);
    fillSelect(document.getElementById("category-filter"), all.map((e) => e.category), state.category);
    const number = new Map(all.map((e, i) => [e.id, i + 1]));
    const shown = all
      .filter((e) => (!state.status || e.status === state.status) && (!state.category || e.category === state.category))
      .sort(compare);
    for (const th of document.querySelectorAll("#experiments th[data-key]")) {
      th.setAttribute("aria-sort", th.dataset.key === state.sortKey ? (state.sortDirection > 0 ? "ascending" : "descending") : "none");
    }
    document.querySelector("#experiments tbody").replaceChildren(...shown.map((e) => el("tr", { dataset: { id: e.id, status: e.status } },
      el("td", { class: "num" }, experimentLink(e.id, `#${number.get(e.id)}`)),
      el("td", {}, badge(e.status)),
      el("td", { class: "verdict" }, verdict(e)),
      el("td", { class: "num bpb", dataset: { value: e.val_bpb ?? "" } }, bpbWithUncertainty(e)),
      el("td", { class: "num" }, signed(e.delta)),
      el("td", { class: "category" }, e.category),
      el("td", { class: "description" }, experimentLink(e.id, e.description)),
      el("td", {}, e.gpu_id || "—"),
      el("td", { class: "num" }, seconds(duration(e))),
    )));
    document.getElementById("experiment-count").textContent =
      shown.length === all.length ? `${all.length}` : `${shown.length} of ${all.length}`;
  }

  document.querySelector("#experiments thead").addEventListener("click", (event) => {
    const key = event.target.closest("th")?.dataset.key;
    if (!key) return;
    state.sortDirection = key === state.sortKey ? -state.sortDirection : 1;
    state.sortKey = key;
    renderTable();
  });
  for (const [id, field] of [["status-filter", "status"], ["category-filter", "category"]]) {
    document.getElementById(id).addEventListener("change", (event) => {
      state[field] = event.target.value;
      renderTable();
    });
  }

  async function refreshTable() {
    state.experiments = (await api("/api/experiment/history", { tag })).experiments;
    renderTable();
  }

  async function refreshSummary() {
    const s = await api("/api/report/summary", { tag });
    const noise = s.noise && s.noise.sigma !== null && s.noise.sigma !== undefined ? `${fixed(s.noise.sigma, 6)} (${s.noise.runs} runs)` : "not measured";
    Dash.facts(document.getElementById("tag-facts"), [
      ["best val_bpb", s.best ? experimentLink(s.best.experiment_id, bpb(s.best.val_bpb)) : "—"],
      ["branch", s.branch],
      ["profile", s.profile],
      ["experiments", s.stats.total],
      ["kept", s.stats.kept],
      ["discarded", s.stats.discarded],
      ["crashed", s.stats.crashed],
      ["running", s.stats.running],
      ["queued", s.stats.queued],
      ["keep rate", `${fixed(100 * s.stats.keep_rate, 0)}%`],
      ["noise σ", noise],
      ["training", `${s.total_training_minutes} min`],
      ["strategy", s.strategy],
    ]);
  }

  async function refreshChart() {
    const points = (await api(`/api/report/progress?tag=${encodeURIComponent(tag)}`)).points;
    const container = document.getElementById("progress-chart");
    document.getElementById("progress-empty").hidden = points.length > 0;
    container.hidden = points.length === 0;
    if (!points.length) return;
    const pick = (status) => points.map((p) => (p.status === status ? p.val_bpb : null));
    Dash.chart(container, {
      xLabel: "experiment #",
      yLabel: "val_bpb",
      series: [Dash.dots("discard", COLOURS.discard), Dash.dots("keep", COLOURS.keep), Dash.line("running best", COLOURS.best, true)],
      data: [points.map((p) => p.n), pick("discard"), pick("keep"), points.map((p) => p.best)],
      onPick: (i) => { location.href = `/experiment/${encodeURIComponent(points[i].id)}`; },
    });
  }

  async function refreshStrategy() {
    const [strategy, suggestion, nearMisses] = await Promise.all([
      api("/api/search/strategy", { tag }),
      api("/api/search/suggest", { tag }),
      api("/api/experiment/near-misses", { tag }),
    ]);
    Dash.facts(document.getElementById("strategy"), [
      ["mode", strategy.mode],
      ["explore ratio", fixed(strategy.explore_ratio, 2)],
      ["temperature", fixed(strategy.temperature, 2)],
      ["why", strategy.reason],
      ["underexplored", suggestion.underexplored_categories.join(", ") || "—"],
      ["high yield", suggestion.high_yield_categories.join(", ") || "—"],
    ]);
    document.getElementById("suggestions").replaceChildren(...suggestion.suggestions.map((s) => el("li", {}, s)));
    document.getElementById("near-misses-empty").hidden = nearMisses.near_misses.length > 0;
    document.querySelector("#near-misses tbody").replaceChildren(...nearMisses.near_misses.map((m) => el("tr", {},
      el("td", {}, experimentLink(m.experiment_id)),
      el("td", { class: "num" }, bpb(m.val_bpb)),
      el("td", { class: "num" }, fixed(m.delta, 6)),
      el("td", {}, m.category),
      el("td", { class: "prose" }, m.hypothesis),
    )));
  }

  Dash.poll(refreshTable, TABLE_EVERY_MS);
  Dash.poll(refreshSummary, TABLE_EVERY_MS);
  Dash.poll(refreshChart, TABLE_EVERY_MS);
  Dash.poll(refreshStrategy, SLOW_EVERY_MS);
})();
