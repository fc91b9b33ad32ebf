"""Hand-over to train.py's first line: a fresh interpreter against a standby one (workers/standby.py).

The stand-in train.py is the real one's import block (everything above `USE_CUDA = ...`: torch,
prepare.py with numpy and pyarrow, gpu_kernels.py), then one line with the time it got there.
Each round runs it through workers.runner.run_training three ways, in the same run directory:

- fresh:   no standby, the runner starts `python train.py`;
- ready:   a standby started beforehand whose imports are done (its CPU time stopped growing),
           as when the worker recorded and scored the previous run meanwhile;
- at once: a standby handed the run right after its start, as when the next run is claimed at
           once: its remaining imports count against the run.

It prints the seconds from the hand-over (RunResult.started_at) to that line for each, and the
host it ran on: cores, load average, whether it ran as root (then train.py runs sandboxed).

    python bench/standby_start.py --rounds 5
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from start_table import print_start_table  # noqa: E402  (bench/, the script's own folder)

from workers.runner import run_training, start_standby  # noqa: E402

IMPORTS_END = "USE_CUDA = torch.cuda.is_available()"
STAND_IN = (REPO_ROOT / "train.py").read_text().split(IMPORTS_END)[0] + \
    "print('first line', time.time(), flush=True)\n"
ENV = {"AUTORESEARCH_PROFILE": "tiny", "PYTHONPATH": str(REPO_ROOT)}
IDLE_CHECK_S = 0.5  # a standby whose CPU time grew by nothing over this long has done its imports


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wait_until_idle(pid: int) -> None:
    last = cpu_seconds(pid)
    while True:
        time.sleep(IDLE_CHECK_S)
        now = cpu_seconds(pid)
        if now == last:
            return
        last = now


def to_first_line(run_dir: Path, standby=None) -> tuple[float, bool]:
    result = run_training(STAND_IN, run_dir, env=ENV, timeout_s=120, poll_interval_s=0.05, standby=standby)
    if result.returncode != 0:
        raise SystemExit(f"the stand-in failed:\n{result.log_tail}")
    printed = float(next(line for line in result.log_tail.splitlines() if line.startswith("first line")).split()[2])
    return printed - result.started_at, result.standby


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times = {"fresh": [], "ready": [], "at once": []}
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "runs" / "run"
        for _ in range(args.rounds):
            times["fresh"].append(to_first_line(run_dir)[0])
            standby = start_standby(ENV)
            wait_until_idle(standby.proc.pid)
            seconds, used = to_first_line(run_dir, standby)
            assert used, "the ready standby was not used"
            times["ready"].append(seconds)
            seconds, used = to_first_line(run_dir, start_standby(ENV))
            assert used, "the new standby was not used"
            times["at once"].append(seconds)
    print_start_table(times, f"{'root: train.py sandboxed' if os.geteuid() == 0 else 'not root'}, "
                             f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
