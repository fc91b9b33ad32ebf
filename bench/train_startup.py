"""Start-up of train.py alone, and with a second run started at the same moment on another GPU.

On a multi-GPU host the workers' runs often start together, and what they share (cores, the
compile cache on disk, the file system) can slow each one's start-up. For each thread setting
this launches train.py (h100-short model, a short budget, warm compile cache) once alone on
GPU 0, then twice at once on GPUs 0 and 1, and reports launch -> first step, the first step's
own time (compilation, or loading it from the cache), launch -> end of the untimed steps,
train.py's total_seconds and the wall time.

    python bench/train_startup.py --cache .device/stack_cache --settings default,share,noexpand
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
from train_throughput import UNTIMED_STEPS, make_variant_source  # noqa: E402

from workers.training import CPU_THREAD_VARIABLES  # noqa: E402

STEP = re.compile(r"^step (\d+) \| .* dt (\d+)ms ")


def settings(cores, gpus):
    share = str(max(1, cores // gpus))
    return {
        "default": {},                                              # torch sizes its pools to every core
        "share": dict.fromkeys(CPU_THREAD_VARIABLES, share),        # what a GPU worker now sets
        "compile1": {"OMP_NUM_THREADS": share, "TORCHINDUCTOR_COMPILE_THREADS": "1"},  # no compile pool
        # the caching allocator's plain cudaMalloc segments instead of mapped, growable ones
        "noexpand": {**dict.fromkeys(CPU_THREAD_VARIABLES, share), "PYTORCH_ALLOC_CONF": "expandable_segments:False"},
    }


def launch(gpu, extra_env, args, source):
    run_dir = Path(tempfile.mkdtemp(prefix=f"startup-gpu{gpu}-"))
    (run_dir / "train.py").write_text(source)
    env = {name: value for name, value in os.environ.items() if name not in CPU_THREAD_VARIABLES}
    env.update(extra_env, CUDA_VISIBLE_DEVICES=str(gpu), AUTORESEARCH_PROFILE=args.profile,
               AUTORESEARCH_CACHE=str(Path(args.cache).resolve()), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))))
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=run_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend((time.time() - t0, line.rstrip("\n")) for line in proc.stdout))
    reader.start()
    return proc, reader, lines, t0


def measure(procs):
    results = []
    for proc, reader, lines, t0 in procs:
        rc = proc.wait()
        reader.join()
        wall = time.time() - t0
        first = warm = step0_ms = None
        total = None
        for at, line in lines:
            m = STEP.match(line)
            if m and int(m.group(1)) == 0:
                first, step0_ms = at, int(m.group(2))
            if m and int(m.group(1)) == UNTIMED_STEPS - 1:
                warm = at
            if line.startswith("total_seconds:"):
                total = float(line.split(":")[1])
        if rc != 0:
            print("\n".join(line for _, line in lines[-20:]), flush=True)
        results.append(dict(rc=rc, step0_line_s=first and round(first, 2), step0_ms=step0_ms,
                            warm_s=warm and round(warm, 2), total_seconds=total, wall_s=round(wall, 2)))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--profile", default="h100-short")
    parser.add_argument("--settings", default="default,share,noexpand")
    parser.add_argument("--budget", type=int, default=5, help="training seconds per run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench" / "out"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    table = settings(cores, 2)
    source = make_variant_source({}, args.budget, 524288)
    print(f"{cores} cores; profile {args.profile}; {args.budget} s budget; warm-up run first (fills the compile cache)",
          flush=True)
    print("warm-up:", measure([launch(0, {}, args, source)]), flush=True)
    rows = []
    for repeat in range(args.repeats):
        for name in args.settings.split(","):
            for mode, gpus in (("alone", [0]), ("pair", [0, 1])):
                runs = measure([launch(gpu, table[name], args, source) for gpu in gpus])
                for gpu, run in zip(gpus, runs, strict=True):
                    rows.append(dict(setting=name, env=table[name], mode=mode, gpu=gpu, repeat=repeat, **run))
                    print(f"{name:9s} {mode:5s} gpu{gpu}: step 0 line at {run['step0_line_s']} s "
                          f"(step 0 took {run['step0_ms']} ms), warm at {run['warm_s']} s, "
                          f"total_seconds {run['total_seconds']}, wall {run['wall_s']} s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "startup.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'setting':9s} {'mode':5s} {'step0 line s':>12s} {'step0 ms':>9s} {'warm s':>7s} {'total s':>8s} {'wall s':>7s}")
    for name in args.settings.split(","):
        for mode in ("alone", "pair"):
            sel = [r for r in rows if r["setting"] == name and r["mode"] == mode and r["rc"] == 0]
            if sel:
                def mean(key, sel=sel):
                    values = [r[key] for r in sel if r[key] is not None]
                    return sum(values) / len(values) if values else float("nan")
                print(f"{name:9s} {mode:5s} {mean('step0_line_s'):12.2f} {mean('step0_ms'):9.0f} {mean('warm_s'):7.2f} "
                      f"{mean('total_seconds'):8.2f} {mean('wall_s'):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
