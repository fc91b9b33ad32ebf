"""The whole stack on a machine with GPUs: N GPU workers, then one, on the same experiments.

Run by bench/stack_two_gpu.sh on the device machine (it installs the carried wheels and points
AUTORESEARCH_CACHE at the carried, already prepared cache). Everything goes through the project's
own code and the HTTP API, as an agent would use it:

  1. start_stack() (the code behind `autoresearch up`, without Flower): embedded Postgres and
     Redis, migrations, the API (gunicorn), control worker + beat, one Celery worker per GPU;
  2. warm-up tag: the baseline once on every GPU (pinned), so the torch.compile caches on disk are
     warm for both measured phases alike; not counted;
  3. the one-GPU phase, first half ("single-a"): the workers but gpu0 are stopped; a tag, the first
     half of the sources (baseline + variations of train.py), submitted unpinned;
  4. phase "multi": the workers are started again; a tag, all the sources, unpinned, all GPUs;
  5. the one-GPU phase, second half ("single-b"): as in 3, with the other half of the sources.
     Splitting the one-GPU runs around the multi-GPU phase puts drift over the session (compile
     caches warming, clocks, the host) on both sides alike;
  6. the pool is polled (/api/pool/list) every POLL_S throughout; heartbeats.jsonl.

Writes under --out: summary.json, results.tsv + progress.png (of the multi-GPU tag, from the API),
heartbeats.jsonl, timings.json, logs.tar.gz (the stack's logs and every train.log), and prints
a table last. Timings come from the records (Postgres timestamps): started_at is the worker's
claim, finished_at the keep/discard decision.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from datetime import datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.cli import api_url, start_stack  # noqa: E402
from app.config import load_settings  # noqa: E402
from workers.gpu import list_gpus  # noqa: E402
from workers.training import cpu_share_env  # noqa: E402

POLL_S = 2.0

# (description, category, hypothesis, regex of the line's start, replacement)
VARIATIONS = [
    ("matrix LR 0.04 -> 0.06", "optimizer", "A higher Muon LR learns faster in a short budget",
     r"^MATRIX_LR = 0\.04\b", "MATRIX_LR = 0.06"),
    ("warmdown 0.5 -> 0.3", "scheduling", "A shorter warmdown keeps the LR high for longer",
     r"^WARMDOWN_RATIO = 0\.5\b", "WARMDOWN_RATIO = 0.3"),
    ("embedding LR 0.6 -> 0.8", "optimizer", "Embeddings tolerate a higher AdamW LR",
     r"^EMBEDDING_LR = 0\.6\b", "EMBEDDING_LR = 0.8"),
    ("unembedding LR 0.004 -> 0.006", "optimizer", "The lm_head can learn faster",
     r"^UNEMBEDDING_LR = 0\.004\b", "UNEMBEDDING_LR = 0.006"),
    ("weight decay 0.2 -> 0.1", "regularization", "Less decay helps in a short run",
     r"^WEIGHT_DECAY = 0\.2\b", "WEIGHT_DECAY = 0.1"),
    ("scalar LR 0.5 -> 0.3", "optimizer", "Per-layer scalars are better with a lower LR",
     r"^SCALAR_LR = 0\.5\b", "SCALAR_LR = 0.3"),
    ("matrix LR 0.04 -> 0.03", "optimizer", "A lower Muon LR is more stable",
     r"^MATRIX_LR = 0\.04\b", "MATRIX_LR = 0.03"),
]


def experiments(count: int) -> list[tuple[str, str, str, str]]:
    baseline = (ROOT / "train.py").read_text()
    runs = [("baseline", "other", "The unchanged baseline sets the bar", baseline)]
    for description, category, hypothesis, pattern, new in VARIATIONS[: count - 1]:
        source, n = re.subn(pattern, new, baseline, count=1, flags=re.M)
        if n != 1:
            raise SystemExit(f"train.py has no line matching {pattern!r}; update bench/stack_two_gpu.py")
        runs.append((description, category, hypothesis, source))
    return runs


class Api:
    def __init__(self, base: str):
        self.base = base
        self.http = requests.Session()

    def post(self, path: str, body: dict, timeout: float = 60) -> dict:
        r = self.http.post(self.base + path, json=body, timeout=timeout)
        if r.status_code >= 400:
            raise RuntimeError(f"{path} answered {r.status_code}: {r.text}")
        return r.json()

    def get(self, path: str, **params):
        r = self.http.get(self.base + path, params=params, timeout=30)
        r.raise_for_status()
        return r


class PoolPoller(threading.Thread):
    """GET /api/pool/list every POLL_S; one JSON line per poll, labelled with the current phase."""

    def __init__(self, base: str, path: Path):
        super().__init__(daemon=True)
        self.base, self.path, self.phase = base, path, "start"
        self.halt = threading.Event()

    def run(self) -> None:
        http = requests.Session()
        with open(self.path, "a") as f:
            while not self.halt.is_set():
                t = time.time()
                try:
                    pool = http.get(self.base + "/api/pool/list", timeout=5).json()
                    line = {"t": round(t, 3), "phase": self.phase, "total": pool["total"], "idle": pool["idle"],
                            "training": pool["training"], "offline": pool["offline"],
                            "workers": [{"id": w["id"], "status": w["status"],
                                         "experiment": w["current_experiment_id"],
                                         "last_heartbeat": w["last_heartbeat"],
                                         "utilization_pct": (w["telemetry"] or {}).get("utilization_pct"),
                                         "memory_used_mb": (w["telemetry"] or {}).get("memory_used_mb")}
                                        for w in pool["workers"]]}
                except Exception as exc:  # the poller must never stop the run
                    line = {"t": round(t, 3), "phase": self.phase, "error": repr(exc)}
                f.write(json.dumps(line) + "\n")
                f.flush()
                self.halt.wait(POLL_S)


def wait_pool(api: Api, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        pool = api.get("/api/pool/list").json()
        if pool["idle"] + pool["training"] >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool never reached {count} live workers: {pool}")
        time.sleep(1)


def submit_all(api: Api, tag: str, runs, pins=None) -> list[str]:
    ids = []
    for i, (description, category, hypothesis, source) in enumerate(runs):
        body = {"tag": tag, "commit_sha": hashlib.sha1(source.encode()).hexdigest(), "description": description,
                "hypothesis": hypothesis, "category": category, "diff_summary": description, "train_py": source}
        if pins is not None:
            body["gpu_index"] = pins[i]
        ids.append(api.post("/api/experiment/submit", body)["experiment_id"])
    return ids


def wait_all(api: Api, ids: list[str], deadline: float) -> tuple[list[dict], bool]:
    """Long-poll each experiment; past the deadline, cancel what is left. (records, complete?)"""
    records, complete = {}, True
    for experiment_id in ids:
        while True:
            left = deadline - time.time()
            if left <= 0:
                complete = False
                break
            record = api.post("/api/experiment/wait", {"experiment_id": experiment_id,
                                                       "timeout_s": int(min(20, max(1, left)))}, timeout=40)
            if record["status"] not in ("queued", "running"):
                records[experiment_id] = record
                break
    if not complete:
        for experiment_id in ids:
            if experiment_id not in records:
                try:
                    api.post("/api/experiment/cancel", {"experiment_id": experiment_id})
                except RuntimeError:
                    pass
        time.sleep(3)
    return [records.get(i) or api.get(f"/api/experiment/{i}").json() for i in ids], complete


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def phase_timings(records: list[dict], submitted_at: float, gpus: int) -> dict:
    done = [r for r in records if r["finished_at"] and r["started_at"]]
    per_worker: dict[str, list[dict]] = {}
    for r in sorted(done, key=lambda r: ts(r["started_at"])):
        per_worker.setdefault(r["gpu_id"] or "?", []).append(r)
    workers = {}
    for gpu_id, rs in per_worker.items():
        gaps = [ts(b["started_at"]) - ts(a["finished_at"]) for a, b in zip(rs, rs[1:], strict=False)]
        workers[gpu_id] = {
            "experiments": [r["id"] for r in rs],
            "idle_gaps_s": [round(g, 3) for g in gaps],
            "mean_idle_gap_s": round(sum(gaps) / len(gaps), 3) if gaps else None,
            "max_idle_gap_s": round(max(gaps), 3) if gaps else None,
            "first_claim_after_submit_s": round(ts(rs[0]["started_at"]) - submitted_at, 3),
            "busy_s": round(sum(ts(r["finished_at"]) - ts(r["started_at"]) for r in rs), 3),
        }
    finished = [r for r in done if r["status"] in ("keep", "discard")]
    end = max((ts(r["finished_at"]) for r in done), default=None)
    makespan = end - submitted_at if end else None
    all_gaps = [g for w in workers.values() for g in w["idle_gaps_s"]]
    return {
        "gpus": gpus,
        "submitted": len(records),
        "finished_ok": len(finished),
        "statuses": {s: sum(1 for r in records if r["status"] == s) for s in sorted({r["status"] for r in records})},
        "makespan_s": round(makespan, 3) if makespan else None,
        "experiments_per_hour": round(len(finished) * 3600 / makespan, 2) if makespan and finished else None,
        "mean_experiment_wall_s": round(sum(ts(r["finished_at"]) - ts(r["started_at"]) for r in done) / len(done), 3)
        if done else None,
        "mean_training_seconds": round(sum(r["training_seconds"] or 0 for r in finished) / len(finished), 3)
        if finished else None,
        "mean_total_seconds": round(sum(r["total_seconds"] or 0 for r in finished) / len(finished), 3)
        if finished else None,
        "mean_idle_gap_s": round(sum(all_gaps) / len(all_gaps), 3) if all_gaps else None,
        "max_idle_gap_s": round(max(all_gaps), 3) if all_gaps else None,
        "per_worker": workers,
    }


def one_gpu_total(first: dict, second: dict) -> dict:
    """The two halves of the one-GPU phase as one: their makespans add up, their means weigh by count."""
    parts = (first, second)
    ok = sum(p["finished_ok"] for p in parts)
    makespan = sum(p["makespan_s"] or 0 for p in parts)

    def weighted(key):
        pairs = [(p[key], p["finished_ok"]) for p in parts if p[key] is not None]
        weight = sum(w for _, w in pairs)
        return round(sum(v * w for v, w in pairs) / weight, 3) if weight else None

    maxima = [p["max_idle_gap_s"] for p in parts if p["max_idle_gap_s"] is not None]
    return {"gpus": 1, "submitted": sum(p["submitted"] for p in parts), "finished_ok": ok,
            "makespan_s": round(makespan, 3) if makespan else None,
            "experiments_per_hour": round(ok * 3600 / makespan, 2) if makespan and ok else None,
            **{key: weighted(key) for key in ("mean_experiment_wall_s", "mean_training_seconds",
                                              "mean_total_seconds", "mean_idle_gap_s")},
            "max_idle_gap_s": max(maxima) if maxima else None}


def heartbeat_stats(path: Path) -> dict:
    """From the polls of each phase: how often every GPU was `training`, and its utilisation then."""
    stats: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        p = json.loads(line)
        if "workers" not in p:
            continue
        s = stats.setdefault(p["phase"], {"polls": 0, "all_training": 0, "util": {}, "mem": {}})
        s["polls"] += 1
        live = [w for w in p["workers"] if w["status"] != "offline"]
        if live and all(w["status"] == "training" for w in live):
            s["all_training"] += 1
        for w in live:
            if w["status"] == "training" and w["utilization_pct"] is not None:
                s["util"].setdefault(w["id"], []).append(w["utilization_pct"])
                s["mem"].setdefault(w["id"], []).append(w["memory_used_mb"] or 0)
    return {phase: {"polls": s["polls"], "polls_all_live_training": s["all_training"],
                    "mean_utilization_pct_while_training": {k: round(sum(v) / len(v), 1) for k, v in s["util"].items()},
                    "max_memory_used_mb_while_training": {k: max(v) for k, v in s["mem"].items()}}
            for phase, s in stats.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("STACK_PROFILE", "tiny"))
    parser.add_argument("--experiments", type=int, default=6, help="baseline + variations, per phase")
    parser.add_argument("--budget-s", type=float, default=480, help="seconds from start to the last result")
    parser.add_argument("--cpu-workers", type=int, default=0,
                        help="a check of this script where there is no GPU: N CPU workers instead (tiny profile)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "stack_out")
    args = parser.parse_args()
    t0 = time.time()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    beats = out / "heartbeats.jsonl"

    settings = load_settings()
    settings = dataclasses.replace(settings, default_profile=args.profile)
    stack, settings, workers = start_stack(settings, flower=False, cpu_workers=args.cpu_workers or None)
    if args.cpu_workers:
        gpus = list(range(args.cpu_workers))
    else:
        gpus = sorted(int(name[3:]) for name in workers if name.startswith("gpu") and name[3:].isdigit())
    print(f"stack up in {time.time() - t0:.1f}s: {', '.join(workers)}; profile {args.profile}", flush=True)
    summary: dict = {"profile": args.profile, "gpus": gpus, "experiments_per_phase": args.experiments,
                     "started": datetime.fromtimestamp(t0).isoformat(), "tags": {},
                     "train_thread_limits": cpu_share_env(gpus_on_host=len(list_gpus()), cores=os.cpu_count() or 1)}
    try:
        summary["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    except OSError:
        summary["nvidia_smi"] = None
    api = Api(api_url(settings))
    poller = PoolPoller(api.base, beats)
    poller.start()
    timings: dict = {}
    stamp = time.strftime("%H%M%S")
    try:
        if not gpus:
            raise SystemExit("no GPU found: this benchmark is for GPU machines")
        wait_pool(api, len(gpus))
        runs = experiments(args.experiments)

        # Warm-up: the baseline on every GPU at once; fills the compile caches, checks the path.
        poller.phase = "warmup"
        tag = f"warm-{stamp}"
        api.post("/api/experiment/setup", {"tag": tag, "profile": args.profile})
        t = time.time()
        ids = submit_all(api, tag, [runs[0]] * len(gpus), pins=gpus)
        records, _ = wait_all(api, ids, deadline)
        warm = time.time() - t
        summary["tags"]["warmup"] = tag
        timings["warmup"] = {"wall_s": round(warm, 3), "statuses": [r["status"] for r in records]}
        print(f"warm-up: {[r['status'] for r in records]} in {warm:.1f}s", flush=True)
        if any(r["status"] not in ("keep", "discard") for r in records):
            errors = [r.get("error") for r in records]
            raise SystemExit(f"warm-up failed: {errors}")

        # How many experiments fit: one warm experiment takes less than the cold warm-up (0.8 of it
        # is the guess); a phase that would overrun the deadline is cut there and marked incomplete.
        left = deadline - time.time()
        count = args.experiments
        while count > 4 and (count / len(gpus) + count) * 0.8 * warm > left:
            count -= 1
        runs = runs[:count]
        summary["experiments_per_phase"] = count

        half = len(runs) // 2
        live = set(gpus)
        for phase, phase_gpus, phase_runs in (("single-a", gpus[:1], runs[:half]), ("multi", gpus, runs),
                                              ("single-b", gpus[:1], runs[half:])):
            for index in sorted(live - set(phase_gpus)):
                stack.stop(f"gpu{index}")
            for index in sorted(set(phase_gpus) - live):
                stack.start_gpu_worker(index, cpu=bool(args.cpu_workers))
            live, n = set(phase_gpus), len(phase_gpus)
            wait_pool(api, n)
            poller.phase = phase
            tag = f"{phase}-{n}gpu-{stamp}"
            api.post("/api/experiment/setup", {"tag": tag, "profile": args.profile})
            submitted_at = time.time()
            ids = submit_all(api, tag, phase_runs)
            records, complete = wait_all(api, ids, deadline)
            timings[phase] = {"tag": tag, "complete": complete, **phase_timings(records, submitted_at, n)}
            summary["tags"][phase] = tag
            summary[f"records_{phase}"] = records
            summary[f"summary_{phase}"] = api.post("/api/report/summary", {"tag": tag})
            print(f"{phase}: {timings[phase]['statuses']} makespan {timings[phase]['makespan_s']}s", flush=True)
            if phase == "multi":
                (out / "results.tsv").write_text(api.post("/api/report/tsv", {"tag": tag})["tsv"] + "\n")
                (out / "progress.png").write_bytes(api.get("/api/report/plot", tag=tag).content)
            if not complete:
                break
    finally:
        poller.halt.set()
        poller.join(timeout=5)
        if all(phase in timings for phase in ("single-a", "multi", "single-b")):
            timings["single"] = one_gpu_total(timings["single-a"], timings["single-b"])
            a, b = timings["multi"]["experiments_per_hour"], timings["single"]["experiments_per_hour"]
            timings["ratio_experiments_per_hour"] = round(a / b, 3) if a and b else None
        if beats.exists():
            timings["heartbeats"] = heartbeat_stats(beats)
        timings["script_wall_s"] = round(time.time() - t0, 3)
        (out / "timings.json").write_text(json.dumps(timings, indent=2))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for folder in (settings.state_dir / "logs", settings.runs_dir):
                if folder.exists():
                    tar.add(folder, arcname=folder.name)
        print(f"stopping the stack ({time.time() - t0:.0f}s in)", flush=True)
        stack.stop_all()

    print()
    print(f"{'phase':<8} {'gpus':>4} {'ok':>3} {'makespan s':>10} {'exp/h':>7} {'exp wall s':>10} "
          f"{'train s':>8} {'mean gap s':>10} {'max gap s':>9}")
    for phase in ("single-a", "multi", "single-b", "single"):
        if phase in timings:
            p = timings[phase]
            print(f"{phase:<8} {p['gpus']:>4} {p['finished_ok']:>3} {p['makespan_s'] or '-':>10} "
                  f"{p['experiments_per_hour'] or '-':>7} {p['mean_experiment_wall_s'] or '-':>10} "
                  f"{p['mean_training_seconds'] or '-':>8} {p['mean_idle_gap_s'] or '-':>10} "
                  f"{p['max_idle_gap_s'] or '-':>9}")
    print(f"ratio experiments/hour multi/single: {timings.get('ratio_experiments_per_hour')}")
    for phase, h in timings.get("heartbeats", {}).items():
        print(f"heartbeats {phase}: {h['polls_all_live_training']}/{h['polls']} polls all live GPUs training; "
              f"util {h['mean_utilization_pct_while_training']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
