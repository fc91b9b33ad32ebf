"""Verdicts on the device: one train.py six times, then one change of known large effect, through the stack.

Run by bench/stack_verdicts.sh on the device machine (issue 13, "What it must show"). Everything goes
through start_stack() (the code behind `autoresearch up`, without Flower) and the HTTP API, as an
agent would use it, under the default verdict policy and BASELINE_RUNS:

  --mode verdicts (default): a tag; the same source submitted `--replicates` times in a row, each
      after the verdict on the one before (a greedy agent sees each verdict before its next change);
      the first is the baseline and gets BASELINE_RUNS runs, the others are verdicts against the
      tag's best. The replicated source is train.py with MATRIX_LR lowered (--lowered-matrix-lr); the
      change submitted last is train.py itself, so the real change is the restored learning rate,
      whose large effect in a short budget is known. --reverse swaps the two: train.py is replicated and
      the lowered learning rate is the change (on a cache small enough that a short run sees each token
      many times, the lower rate is the better one: docs/benchmarks.md, "Verdicts on the device").
      Then checks the three claims:
        - no replicate's verdict reports z > 2.5;
        - the tag's reported best is within one sigma (the tag's noise floor) of the mean of all the
          replicates' runs;
        - the change is kept with z > 2.
  --mode noise: a tag; the unchanged train.py submitted once, so that it runs BASELINE_RUNS times
      (--baseline-runs overrides the setting); reports the tag's noise floor.

Writes under --out, after every verdict: results.json (every experiment: status, val_bpb, sigma, z,
delta, runs, best_runs, every run's seed, val_bpb and timings; the tag's summary with its noise floor;
the claims), and at the end results.tsv and progress.png from the API and logs.tar.gz (the stack's logs
and every train.log). Prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stack_two_gpu import Api, submit_all, wait_pool  # noqa: E402  (bench/, the script's own folder)

from app.cli import api_url, start_stack  # noqa: E402
from app.config import load_settings  # noqa: E402

FINAL = ("keep", "discard", "crash", "timeout", "cancelled", "pruned")
MATRIX_LR_LINE = r"^MATRIX_LR = 0\.04\b"
REPLICATE_Z_LIMIT = 2.5  # an honest z-score exceeds it in one of five replicates less than 4 % of the time
CHANGE_Z_LIMIT = 2.0
RUN_KEYS = ("id", "replicate", "purpose", "seed", "status", "val_bpb", "gpu_id", "gpu_model", "num_steps",
            "training_seconds", "total_seconds", "peak_vram_mb", "queued_at", "claimed_at", "training_started_at",
            "finished_at", "error")


def lowered_source(baseline: str, matrix_lr: float) -> str:
    source, n = re.subn(MATRIX_LR_LINE, f"MATRIX_LR = {matrix_lr}", baseline, count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"train.py has no line matching {MATRIX_LR_LINE!r}; update bench/stack_verdicts.py")
    return source


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round(datetime.fromisoformat(end).timestamp() - datetime.fromisoformat(start).timestamp(), 3)


def wait_final(api: Api, experiment_id: str, deadline: float) -> dict:
    """Long-poll until the experiment's verdict is final (confirming is not) or the deadline passes."""
    while True:
        left = deadline - time.time()
        record = api.post("/api/experiment/wait", {"experiment_id": experiment_id,
                                                   "timeout_s": int(min(20, max(1, left)))}, timeout=40)
        if record["status"] in FINAL or time.time() >= deadline:
            return record


def best_before(api: Api, tag: str) -> tuple[str | None, float | None, int]:
    """The tag's best as the next verdict will see it: (experiment id, val_bpb, its finished runs)."""
    best = api.post("/api/report/summary", {"tag": tag})["best"]
    if not best:
        return None, None, 0
    record = api.get(f"/api/experiment/{best['experiment_id']}").json()
    return best["experiment_id"], best["val_bpb"], record["run_count"]


def experiment_entry(label: str, record: dict, submitted_at: float, verdict_at: float, best: tuple) -> dict:
    runs = [{key: run.get(key) for key in RUN_KEYS} for run in record["runs"]]
    for run in runs:
        run["wait_s"] = seconds_between(run["queued_at"], run["claimed_at"])
        run["wall_s"] = seconds_between(run["claimed_at"], run["finished_at"])
    best_id, best_val_bpb, best_runs = best
    return {
        "label": label, "id": record["id"], "status": record["status"], "val_bpb": record["val_bpb"],
        "sigma": record["sigma"], "z": record["z"], "delta": record["delta"], "near_miss": record["near_miss"],
        "runs": record["run_count"], "best_runs": best_runs, "best_id_before": best_id,
        "best_val_bpb_before": best_val_bpb, "error": record["error"],
        "created_at": record["created_at"], "started_at": record["started_at"], "finished_at": record["finished_at"],
        "submit_to_verdict_s": round(verdict_at - submitted_at, 3), "run_records": runs,
    }


def claims(entries: list[dict], replicates: int, summary: dict) -> dict:
    """The issue's three checks, from the records and the tag's summary after the replicates."""
    replicate_entries = entries[:replicates]
    verdict_zs = [e["z"] for e in replicate_entries[1:] if e["z"] is not None]
    values = [r["val_bpb"] for e in replicate_entries for r in e["run_records"]
              if r["status"] == "finished" and r["val_bpb"] is not None]
    sigma = summary["noise"]["sigma"]
    best = summary["best"]["val_bpb"] if summary["best"] else None
    mean_all = statistics.fmean(values) if values else None
    out = {
        "replicate_zs": verdict_zs,
        "replicate_max_z": max(verdict_zs) if verdict_zs else None,
        "replicate_z_ok": bool(verdict_zs) and len(verdict_zs) == replicates - 1
        and max(verdict_zs) <= REPLICATE_Z_LIMIT,
        "replicate_runs": len(values),
        "replicate_mean_of_runs": mean_all,
        "replicate_mean_of_means": statistics.fmean(e["val_bpb"] for e in replicate_entries if e["val_bpb"])
        if any(e["val_bpb"] for e in replicate_entries) else None,
        "replicate_stdev_of_runs": statistics.stdev(values) if len(values) > 1 else None,
        "best_after_replicates": best,
        "noise_sigma_after_replicates": sigma,
        "best_minus_mean_in_sigma": (best - mean_all) / sigma if best is not None and mean_all and sigma else None,
    }
    out["best_within_one_sigma"] = out["best_minus_mean_in_sigma"] is not None and abs(out["best_minus_mean_in_sigma"]) <= 1
    if len(entries) > replicates:
        change = entries[replicates]
        out["change_status"], out["change_z"] = change["status"], change["z"]
        out["change_kept_with_z_over_2"] = change["status"] == "keep" and (change["z"] or 0) > CHANGE_Z_LIMIT
    return out


def print_table(entries: list[dict]) -> None:
    print()
    print(f"{'#':>2} {'experiment':<26} {'status':<8} {'val_bpb':>9} {'sigma':>8} {'z':>7} {'runs':>4} "
          f"{'best_runs':>9} {'submit->verdict s':>17}  run val_bpb (seed)")
    for i, e in enumerate(entries, 1):
        runs = ", ".join(f"{r['val_bpb']:.6f} ({r['seed']})" if r["val_bpb"] is not None else f"{r['status']} ({r['seed']})"
                         for r in e["run_records"])
        sigma = f"{e['sigma']:.6f}" if e["sigma"] is not None else "-"
        z = f"{e['z']:.2f}" if e["z"] is not None else "-"
        val = f"{e['val_bpb']:.6f}" if e["val_bpb"] is not None else "-"
        print(f"{i:>2} {e['label']:<26} {e['status']:<8} {val:>9} {sigma:>8} {z:>7} {e['runs']:>4} "
              f"{e['best_runs']:>9} {e['submit_to_verdict_s']:>17}  {runs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("verdicts", "noise"), default="verdicts")
    parser.add_argument("--profile", default="h100-short", help="the tag's profile (tiny with --cpu-workers)")
    parser.add_argument("--replicates", type=int, default=6, help="submissions of the replicated source")
    parser.add_argument("--lowered-matrix-lr", type=float, default=0.01,
                        help="MATRIX_LR of the replicated source; train.py's own value is the change")
    parser.add_argument("--reverse", action="store_true",
                        help="replicate train.py and submit the lowered MATRIX_LR as the change")
    parser.add_argument("--baseline-runs", type=int, default=None, help="BASELINE_RUNS (default: the setting's)")
    parser.add_argument("--budget-s", type=float, default=1500, help="seconds from start to the last verdict")
    parser.add_argument("--cpu-workers", type=int, default=0,
                        help="a check of this script where there is no GPU: N CPU workers instead (tiny profile)")
    parser.add_argument("--out", default="verdicts_out")
    args = parser.parse_args()
    if args.replicates < 2:
        parser.error("--replicates must be at least 2: the first is the baseline, the others are verdicts")
    t0 = time.time()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    settings = dataclasses.replace(load_settings(), default_profile=args.profile)
    if args.baseline_runs is not None:
        settings = dataclasses.replace(settings, baseline_runs=args.baseline_runs)
    stack, settings, workers = start_stack(settings, flower=False, cpu_workers=args.cpu_workers or None)
    stack_up_s = round(time.time() - t0, 3)
    print(f"stack up in {stack_up_s}s: {', '.join(workers)}; profile {args.profile}, policy "
          f"{settings.verdict_policy}, BASELINE_RUNS {settings.baseline_runs}", flush=True)
    api = Api(api_url(settings))
    baseline = (ROOT / "train.py").read_text()
    if args.mode == "verdicts":
        lowered = (f"MATRIX_LR {args.lowered_matrix_lr}", lowered_source(baseline, args.lowered_matrix_lr))
        unchanged = ("MATRIX_LR 0.04", baseline)
        (replicated_name, replicated), (change_name, change) = (unchanged, lowered) if args.reverse \
            else (lowered, unchanged)
        plan = [(f"replicate {i + 1} ({replicated_name})", replicated) for i in range(args.replicates)]
        plan.append((f"{'lowered' if args.reverse else 'restored'} {change_name}", change))
    else:
        plan = [("baseline (unchanged train.py)", baseline)]
    results: dict = {"mode": args.mode, "profile": args.profile, "verdict_policy": settings.verdict_policy,
                     "baseline_runs": settings.baseline_runs, "workers": workers, "started": datetime.fromtimestamp(t0)
                     .isoformat(), "stack_up_s": stack_up_s, "lowered_matrix_lr": args.lowered_matrix_lr,
                     "reverse": args.reverse,
                     "experiments": []}
    entries: list[dict] = results["experiments"]

    def save() -> None:
        results["wall_s"] = round(time.time() - t0, 3)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    tag = f"{args.mode}-{time.strftime('%H%M%S')}"
    results["tag"] = tag
    try:
        wait_pool(api, 1)
        api.post("/api/experiment/setup", {"tag": tag, "profile": args.profile})
        for i, (label, source) in enumerate(plan):
            best = best_before(api, tag)
            submitted_at = time.time()
            category = "optimizer" if i >= args.replicates else "other"
            [experiment_id] = submit_all(api, tag, [(label, category, f"{label}: the verdict's noise", source)])
            record = wait_final(api, experiment_id, deadline)
            entries.append(experiment_entry(label, record, submitted_at, time.time(), best))
            e = entries[-1]
            print(f"{label}: {e['status']} val_bpb {e['val_bpb']} z {e['z']} sigma {e['sigma']} runs {e['runs']} "
                  f"(best_runs {e['best_runs']}) in {e['submit_to_verdict_s']}s", flush=True)
            if args.mode == "verdicts" and i == args.replicates - 1:
                results["summary_after_replicates"] = api.post("/api/report/summary", {"tag": tag})
            save()
            if record["status"] not in ("keep", "discard"):
                print(f"stopping: {label} ended {record['status']}: {record['error']}", flush=True)
                break
        results["summary"] = api.post("/api/report/summary", {"tag": tag})
        if "summary_after_replicates" in results:
            results["claims"] = claims(entries, args.replicates, results["summary_after_replicates"])
        (out / "results.tsv").write_text(api.post("/api/report/tsv", {"tag": tag})["tsv"] + "\n")
        (out / "progress.png").write_bytes(api.get("/api/report/plot", tag=tag).content)
    finally:
        save()
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for folder in (settings.state_dir / "logs", settings.runs_dir):
                if folder.exists():
                    tar.add(folder, arcname=folder.name)
        print(f"stopping the stack ({time.time() - t0:.0f}s in)", flush=True)
        stack.stop_all()

    print_table(entries)
    noise = results["summary"]["noise"]
    print(f"noise floor of {tag}: sigma {noise['sigma']} from {noise['runs']} runs; by GPU model {noise['by_gpu_model']}")
    for key, value in results.get("claims", {}).items():
        print(f"  {key}: {value}")
    print(f"wall {results['wall_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
