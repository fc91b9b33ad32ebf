"""Timed share on the device: several experiments in a row on one GPU, through the stack (issue 15).

Run by bench/stack_verdicts.sh on the device machine (DRIVER=bench/stack_timed_share.py). Everything
goes through start_stack() (the code behind `autoresearch up`, without Flower) and the HTTP API, with
the worker's defaults: trusted scoring, the standby interpreters, staged start. All experiments are
submitted at once, as an agent with a queue of ideas would: first a warm-up on its own tag (the
`--warmup-profile`, the same model with a short budget, which fills the host's compile cache), then
on the measured tag (`--profile`): train.py, train.py with one constant changed (WARMDOWN_RATIO), and
train.py with its model's code changed (`--code-edits` of them: the MLP's activation, then the
norm's epsilon), each of which torch.compile must compile anew. The verdict policy is `single` (one
run each), so that every experiment is one run and the GPU never waits for a decision.

What it measures, from the run records and each run's train.log:
  - the timed share: timed training seconds over wall seconds, from the warm-up's verdict (the GPU
    free for the first measured run) to the last verdict, and for each experiment from the verdict
    before it to its own;
  - where each remaining second went: hand-over (the verdict before -> this run on the GPU), step 0
    after the hold (the compile not done while staged: all of it for a run that was not staged), the
    other untimed steps, and after training (export, the trusted evaluation, recording), with the
    evaluator's own seconds;
  - the timed tokens/s of each run in its last `lead` seconds (when the next run is staged beside it)
    against the steps before, and the staged process's peak and held GPU memory.
Writes results.json and logs.tar.gz under --out; prints a table.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stack_two_gpu import Api, submit_all, ts, wait_pool  # noqa: E402  (bench/, the script's own folder)
from stack_verdicts import wait_final  # noqa: E402

from app.cli import api_url, start_stack  # noqa: E402
from app.config import load_settings  # noqa: E402
from workers.progress import HELD_LINE, parse_progress  # noqa: E402

UNTIMED_STEPS_LINE = re.compile(r"^UNTIMED_STEPS = (\d+) if COMPILE else (\d+)", re.M)
EDITS = {
    "constant": (r"^WARMDOWN_RATIO = 0\.5\b", "WARMDOWN_RATIO = 0.45"),
    "code: MLP activation": (r"F\.relu\(self\.c_fc\(x\)\)\.square\(\)", "F.leaky_relu(self.c_fc(x), 0.01).square()"),
    "code: norm epsilon": (r"^def norm\(x\):\n    return F\.rms_norm\(x, \(x\.size\(-1\),\)\)",
                           "def norm(x):\n    return F.rms_norm(x, (x.size(-1),), eps=1e-5)"),
}


def edited(source: str, edit: str) -> str:
    pattern, replacement = EDITS[edit]
    out, n = re.subn(pattern, replacement, source, count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"train.py has no match for {pattern!r}; update bench/stack_timed_share.py")
    return out


def log_steps(log: str) -> tuple[list[dict], float]:
    """Every progress line of a train.log, parsed, and the seconds it held for the GPU."""
    steps = [p for p in map(parse_progress, log.splitlines()) if p is not None]
    held = HELD_LINE.search(log)
    return steps, float(held.group(1)) if held else 0.0


def run_account(run: dict, log: str, untimed_steps: int, lead_s: float, verdict_before: float,
                verdict: float) -> dict:
    steps, held_s = log_steps(log)
    dts = {p["step"]: (p["step_ms"] or 0.0) / 1000 for p in steps}
    timed = [p for p in steps if p["step"] >= untimed_steps and p["tokens_per_sec"]]
    beside = [p["tokens_per_sec"] for p in timed if p["remaining_s"] is not None and p["remaining_s"] <= lead_s]
    alone = [p["tokens_per_sec"] for p in timed if p["remaining_s"] is not None and p["remaining_s"] > lead_s]
    granted = ts(run["gpu_granted_at"]) or ts(run["claimed_at"])
    segment = verdict - verdict_before
    account = {
        "segment_s": round(segment, 3),
        "timed_s": run["training_seconds"],
        "hand_over_s": round(granted - verdict_before, 3),
        "step0_after_hold_s": round(dts.get(0, 0.0) - held_s, 3),
        "untimed_steps_s": round(sum(dt for step, dt in dts.items() if 0 < step < untimed_steps), 3),
        "evaluator_s": (run.get("scoring") or {}).get("evaluator_s"),
        "held_s": held_s,
        "compile_seconds": run["compile_seconds"],
        "tokens_per_sec_alone_median": statistics.median(alone) if alone else None,
        "tokens_per_sec_last_lead_median": statistics.median(beside) if beside else None,
        "tokens_per_sec_last_lead_min": min(beside) if beside else None,
    }
    known = sum(account[k] or 0.0 for k in ("timed_s", "hand_over_s", "step0_after_hold_s", "untimed_steps_s"))
    account["after_training_s"] = round(segment - known, 3)
    account["timed_share"] = round((run["training_seconds"] or 0.0) / segment, 4) if segment > 0 else None
    return account


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="h100")
    parser.add_argument("--warmup-profile", default="h100-short",
                        help="'none': no warm-up; the first experiment, train.py, then fills the compile cache "
                             "and only the later ones are measured")
    parser.add_argument("--code-edits", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--edits-only", action="store_true",
                        help="measure the edits only, without the unchanged train.py first (the warm-up has it)")
    parser.add_argument("--budget-s", type=float, default=1500, help="seconds from start to the last verdict")
    parser.add_argument("--cpu-workers", type=int, default=0,
                        help="a check of this script where there is no GPU: a CPU worker (tiny profiles)")
    parser.add_argument("--out", default="timed_share_out")
    args = parser.parse_args()
    t0 = time.time()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    settings = dataclasses.replace(load_settings(), default_profile=args.profile, verdict_policy="single")
    stack, settings, workers = start_stack(settings, flower=False, cpu_workers=args.cpu_workers or None)
    print(f"stack up in {time.time() - t0:.1f}s: {', '.join(workers)}; staged start lead "
          f"{settings.staged_start_lead_s}s, trusted scoring {settings.trusted_scoring}", flush=True)
    api = Api(api_url(settings))
    baseline = (ROOT / "train.py").read_text()
    gpu_untimed, cpu_untimed = map(int, UNTIMED_STEPS_LINE.search(baseline).groups())
    untimed_steps = cpu_untimed if args.cpu_workers else gpu_untimed
    plan = [] if args.edits_only else [("train.py", baseline)]
    plan.append(("constant", edited(baseline, "constant")))
    plan += [(name, edited(baseline, name)) for name in list(EDITS)[1:1 + args.code_edits]]
    results: dict = {"profile": args.profile, "warmup_profile": args.warmup_profile, "workers": workers,
                     "lead_s": settings.staged_start_lead_s, "experiments": []}
    stamp = time.strftime("%H%M%S")
    try:
        wait_pool(api, 1)
        labels = [label for label, _ in plan]
        ids = []
        if args.warmup_profile != "none":
            api.post("/api/experiment/setup", {"tag": f"warm-{stamp}", "profile": args.warmup_profile})
            ids = submit_all(api, f"warm-{stamp}", [("warm-up", "other", "fills the compile cache", baseline)])
            labels.insert(0, "warm-up")
        api.post("/api/experiment/setup", {"tag": f"share-{stamp}", "profile": args.profile})
        ids += submit_all(api, f"share-{stamp}", [(label, "other", label, source) for label, source in plan])
        records = [wait_final(api, experiment_id, deadline) for experiment_id in ids]
        for label, record in zip(labels, records, strict=True):
            run = record["runs"][-1]
            log = (settings.runs_dir / record["id"] / run["id"] / "train.log").read_text(errors="replace")
            results["experiments"].append({"label": label, "status": record["status"], "val_bpb": record["val_bpb"],
                                           "verdict_at": record["finished_at"], "run": run, "log": log})
            print(f"{label}: {record['status']} val_bpb {record['val_bpb']} staging {run['staging']} "
                  f"compile {run['compile_seconds']}", flush=True)
    finally:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for folder in (settings.state_dir / "logs", settings.runs_dir):
                if folder.exists():
                    tar.add(folder, arcname=folder.name)
        stack.stop_all()

    entries = results["experiments"]
    if any(e["status"] in ("crash", "timeout", "cancelled") or e["verdict_at"] is None for e in entries):
        print("not every experiment ended with a verdict: no shares")
        return 1
    accounts = []
    for before, entry in zip(entries, entries[1:], strict=False):
        entry["account"] = run_account(entry["run"], entry["log"], untimed_steps, settings.staged_start_lead_s,
                                       ts(before["verdict_at"]), ts(entry["verdict_at"]))
        accounts.append(entry["account"])
    # From the verdict on the warm-up (or on the first experiment, which then warmed the cache).
    window = ts(entries[-1]["verdict_at"]) - ts(entries[0]["verdict_at"])
    timed = sum(a["timed_s"] for a in accounts)
    results["window_s"], results["timed_s"], results["timed_share"] = round(window, 3), timed, round(timed / window, 4)
    for entry in results["experiments"]:
        entry.pop("log")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    columns = ("segment_s", "timed_s", "timed_share", "hand_over_s", "step0_after_hold_s", "untimed_steps_s",
               "after_training_s", "evaluator_s", "held_s", "compile_seconds", "tokens_per_sec_alone_median",
               "tokens_per_sec_last_lead_median", "tokens_per_sec_last_lead_min")
    print("\n| experiment | " + " | ".join(columns) + " | staging |")
    print("|---" * (len(columns) + 2) + "|")
    for entry in entries[1:]:
        print(f"| {entry['label']} | " + " | ".join(str(entry["account"][c]) for c in columns)
              + f" | {entry['run']['staging']} |")
    print(f"\ntimed share from the first verdict to the last: {timed:.1f} s of {window:.1f} s = "
          f"{100 * timed / window:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
