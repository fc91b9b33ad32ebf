"""The trusted evaluator started fresh against from a standby interpreter (issue 14): wall time of
workers.evaluator.score on one export, both ways.

Trains train.py once (the tiny profile) with an export path and the validation split, then each
round scores that export twice:

- fresh:   no standby, score() starts `python -m workers.evaluator`;
- standby: a standby (workers.runner.start_evaluator_standby) whose imports are done, as when the
           worker started it while the run trained.

It prints the seconds score() took each way, both val_bpb, and the host it ran on. Needs a
prepared cache with the validation split (AUTORESEARCH_CACHE).

    AUTORESEARCH_CACHE=<cache with the val shard> .venv/bin/python bench/evaluator_start.py --rounds 3
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from standby_start import wait_until_idle  # noqa: E402
from start_table import print_start_table  # noqa: E402

from workers import evaluator  # noqa: E402
from workers.runner import start_evaluator_standby  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cache = Path(os.environ["AUTORESEARCH_CACHE"])
    times = {"fresh": [], "standby": []}
    scores = set()
    with tempfile.TemporaryDirectory() as folder:
        artifact = Path(folder) / evaluator.ARTIFACT_FILENAME
        env = {**os.environ, "AUTORESEARCH_PROFILE": "tiny", "AUTORESEARCH_EXPORT_PATH": str(artifact),
               "PYTHONPATH": str(REPO_ROOT)}
        trained = subprocess.run([sys.executable, str(REPO_ROOT / "train.py")], cwd=folder, env=env,
                                 capture_output=True, text=True)
        if trained.returncode != 0:
            raise SystemExit(f"train.py failed:\n{trained.stdout[-2000:]}{trained.stderr[-2000:]}")
        for _ in range(args.rounds):
            for name in times:
                standby = None
                if name == "standby":
                    standby = start_evaluator_standby("")
                    wait_until_idle(standby.proc.pid)
                started = time.monotonic()
                evaluation = evaluator.score(artifact, profile="tiny", cache_dir=cache, standby=standby)
                times[name].append(time.monotonic() - started)
                assert evaluation.error is None, evaluation.error
                assert evaluation.details["standby"] == (name == "standby"), "the standby was not used"
                scores.add(evaluation.val_bpb)
    print_start_table(times, f"python {sys.version.split()[0]}; val_bpb {', '.join(f'{s:.7f}' for s in sorted(scores))}")


if __name__ == "__main__":
    main()
