"""Start-up of train.py alone, and with a second run started at the same moment on another GPU.

On a multi-GPU host the workers' runs often start together, and what they share (cores, the
compile cache on disk, the file system) can slow each one's start-up. For each thread setting
this launches train.py (h100-short model, a short budget, warm compile cache) once alone on
GPU 0, then twice at once on GPUs 0 and 1, and reports launch -> first step, the first step's
own time (compilation, or loading it from the cache), launch -> end of the untimed steps,
train.py's total_seconds and the wall time. Alongside, a sampler reads the host every 0.25 s: how
busy its cores are, its memory, and how many processes each train.py has spawned (torch.compile's
worker pool). After step 0 each run prints torch.compile's own time per phase.

    python bench/train_startup.py --cache .device/stack_cache --settings share,nowarm --repeats 2
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
# Lines train.py prints as set-up goes on: after the tokenizer, after the model, after the first batch.
MARKERS = {"Profile:": "tokenizer_s", "Parameters:": "model_s", "Gradient accumulation": "first_batch_s"}
SAMPLE_S = 0.25
COMPILE_TIMES = ("        gc.freeze()\n",
                 "        gc.freeze()\n        print(torch._dynamo.utils.compile_times(), flush=True)  # bench\n")


class HostSampler(threading.Thread):
    """Every SAMPLE_S: the share of busy cores, memory, and the processes under each launched run."""

    def __init__(self, procs):
        super().__init__(daemon=True)
        self.procs, self.rows, self.halt = procs, [], threading.Event()

    @staticmethod
    def cpu_times():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    def run(self):
        import psutil
        t0, (total0, idle0) = time.time(), self.cpu_times()
        while not self.halt.wait(SAMPLE_S):
            total, idle = self.cpu_times()
            busy = 1 - (idle - idle0) / max(1, total - total0)
            total0, idle0 = total, idle
            mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            children = []
            for proc in self.procs:
                try:
                    children.append(len(psutil.Process(proc.pid).children(recursive=True)))
                except psutil.NoSuchProcess:
                    children.append(0)
            self.rows.append(dict(t=round(time.time() - t0, 2), cpu_busy=round(busy, 3), children=children,
                                  mem_total_gb=round(int(mem["MemTotal"].split()[0]) / 2 ** 20, 1),
                                  mem_available_gb=round(int(mem["MemAvailable"].split()[0]) / 2 ** 20, 1)))

    def summary(self, first_s=20.0):
        early = [r for r in self.rows if r["t"] <= first_s] or self.rows
        return dict(cpu_busy_mean_first=round(sum(r["cpu_busy"] for r in early) / max(1, len(early)), 3),
                    cpu_busy_max=max((r["cpu_busy"] for r in self.rows), default=None),
                    children_max=max((sum(r["children"]) for r in self.rows), default=None),
                    mem_total_gb=(min((r["mem_total_gb"] for r in self.rows), default=None),
                                  max((r["mem_total_gb"] for r in self.rows), default=None)),
                    mem_available_gb_min=min((r["mem_available_gb"] for r in self.rows), default=None))


def settings(cores, gpus):
    share = dict.fromkeys(CPU_THREAD_VARIABLES, str(max(1, cores // gpus)))   # what a GPU worker now sets
    return {
        "default": {},                                              # torch sizes its pools to every core
        "share": share,
        "compile1": {**share, "TORCHINDUCTOR_COMPILE_THREADS": "1"},  # no compile pool
        # the pool starts when a kernel needs compiling, not when torch.compile is first called
        "nowarm": {**share, "TORCH_WARM_POOL": "0"},
        # the caching allocator's plain cudaMalloc segments instead of mapped, growable ones
        "noexpand": {**share, "PYTORCH_ALLOC_CONF": "expandable_segments:False"},
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


def measure(procs, log=None):
    sampler = HostSampler([proc for proc, *_ in procs])
    sampler.start()
    results = []
    for proc, reader, lines, t0 in procs:
        rc = proc.wait()
        reader.join()
        wall = time.time() - t0
        first = warm = step0_ms = None
        total = None
        marks = {}
        for at, line in lines:
            for prefix, key in MARKERS.items():
                if line.startswith(prefix):
                    marks.setdefault(key, round(at, 2))
            m = STEP.match(line)
            if m and int(m.group(1)) == 0:
                first, step0_ms = at, int(m.group(2))
            if m and int(m.group(1)) == UNTIMED_STEPS - 1:
                warm = at
            if line.startswith("total_seconds:"):
                total = float(line.split(":")[1])
        if rc != 0:
            print("\n".join(line for _, line in lines[-20:]), flush=True)
        if log is not None:
            log.write("".join(f"{at:8.2f} {line}\n" for at, line in lines) + "\n")
        results.append(dict(rc=rc, **marks, step0_line_s=first and round(first, 2), step0_ms=step0_ms,
                            warm_s=warm and round(warm, 2), total_seconds=total, wall_s=round(wall, 2)))
    sampler.halt.set()
    sampler.join()
    host = sampler.summary()
    for result in results:
        result["host"] = host
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
    source = make_variant_source({"replace": [COMPILE_TIMES]}, args.budget, 524288)
    print(f"{cores} cores; profile {args.profile}; {args.budget} s budget; warm-up run first (fills the compile cache)",
          flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    log = open(Path(args.out) / "startup_logs.txt", "w")
    print("warm-up:", measure([launch(0, {}, args, source)]), flush=True)
    rows = []
    for repeat in range(args.repeats):
        for name in args.settings.split(","):
            for mode, gpus in (("alone", [0]), ("pair", [0, 1])):
                log.write(f"===== {name} {mode} repeat {repeat}\n")
                runs = measure([launch(gpu, table[name], args, source) for gpu in gpus], log)
                for gpu, run in zip(gpus, runs, strict=True):
                    rows.append(dict(setting=name, env=table[name], mode=mode, gpu=gpu, repeat=repeat, **run))
                    print(f"{name:9s} {mode:5s} gpu{gpu}: tokenizer {run.get('tokenizer_s')} s, model "
                          f"{run.get('model_s')} s, first batch {run.get('first_batch_s')} s, step 0 line at "
                          f"{run['step0_line_s']} s (step 0 took {run['step0_ms']} ms), warm at {run['warm_s']} s, "
                          f"total_seconds {run['total_seconds']}, wall {run['wall_s']} s; host {run['host']}",
                          flush=True)
    log.close()
    (Path(args.out) / "startup.json").write_text(json.dumps(rows, indent=1))
    columns = ("first_batch_s", "step0_line_s", "step0_ms", "warm_s", "total_seconds", "wall_s")
    print(f"\n{'setting':9s} {'mode':5s} {'n':>2s} " + " ".join(f"{c:>13s}" for c in columns)
          + f" {'cpu busy 20s':>12s} {'children':>8s}")
    for name in args.settings.split(","):
        for mode in ("alone", "pair"):
            sel = [r for r in rows if r["setting"] == name and r["mode"] == mode and r["rc"] == 0]
            if sel:
                def mean(values):
                    values = [v for v in values if v is not None]
                    return sum(values) / len(values) if values else float("nan")
                print(f"{name:9s} {mode:5s} {len(sel):2d} " + " ".join(f"{mean(r.get(c) for r in sel):13.2f}" for c in columns)
                      + f" {mean(r['host']['cpu_busy_mean_first'] for r in sel):12.2f}"
                      + f" {mean(r['host']['children_max'] for r in sel):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
