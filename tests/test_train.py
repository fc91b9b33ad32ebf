"""train.py as the worker runs it: a real subprocess, from its own run directory, tiny profile."""

import math
import re
import shutil
import subprocess
import sys

try:
    from tests.conftest_data import TRAIN_PY, autoresearch_env, tiny_cache  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from conftest_data import TRAIN_PY, autoresearch_env, tiny_cache  # noqa: F401

SUMMARY_KEYS = ["profile", "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"]
PROGRESS_LINE = re.compile(
    r"^step (\d+) \| progress (\d+\.\d)% \| loss (\d+\.\d{6}) \| lrm (\d+\.\d\d) \| dt (\d+)ms \| "
    r"tok/s (\d+) \| mfu (\d+\.\d)% \| remaining (\d+)s$")


def run_train(tmp_path, cache, source=None, timeout=180):
    """Copy train.py (or the given source) into a fresh run dir, as the worker does, and run it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if source is None:
        shutil.copy(TRAIN_PY, run_dir / "train.py")
    else:
        (run_dir / "train.py").write_text(source)
    return subprocess.run([sys.executable, "train.py"], cwd=run_dir, env=autoresearch_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def parse_summary(stdout):
    lines = stdout.splitlines()
    assert "---" in lines, stdout
    block = lines[lines.index("---") + 1:]
    pairs = [line.split(":", 1) for line in block if line.strip()]
    return [k for k, _ in pairs], {k: v.strip() for k, v in pairs}


def test_tiny_run_prints_progress_and_summary(tmp_path, tiny_cache):
    result = run_train(tmp_path, tiny_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    progress = [PROGRESS_LINE.match(line) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert progress and all(progress), [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [int(m.group(1)) for m in progress] == list(range(len(progress)))   # one line per step
    assert float(progress[-1].group(2)) == 100.0

    keys, summary = parse_summary(result.stdout)
    assert keys == SUMMARY_KEYS
    assert summary["profile"] == "tiny"
    val_bpb = float(summary["val_bpb"])
    assert math.isfinite(val_bpb) and 0 < val_bpb < 13 / 3   # below a uniform guess over 8192 tokens
    assert re.fullmatch(r"\d+\.\d{6}", summary["val_bpb"])
    assert float(summary["training_seconds"]) >= 6.0
    assert float(summary["total_seconds"]) >= float(summary["training_seconds"])
    assert summary["peak_vram_mb"] == "0.0" and summary["mfu_percent"] == "0.00"
    assert int(summary["num_steps"]) == len(progress)
    assert float(summary["num_params_M"]) > 0 and int(summary["depth"]) >= 1


def test_nan_loss_fails_fast(tmp_path, tiny_cache):
    source = TRAIN_PY.read_text()
    target = "            loss = model(x, y)\n"
    assert source.count(target) == 1
    source = source.replace(target, "            loss = model(x, y) * float('nan')\n")
    result = run_train(tmp_path, tiny_cache, source=source, timeout=120)
    assert result.returncode != 0
    assert "FAIL: loss is NaN at step 0" in result.stderr
    assert "val_bpb" not in result.stdout
