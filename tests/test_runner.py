"""run_training against real child processes: small Python scripts stand in for train.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from workers import runner
from workers.runner import RunResult, run_training, tail_log

# Short polls keep these tests fast; the runner's defaults are for minute-long runs.
POLL_S = 0.05

SUMMARY = """\
---
profile:          tiny
val_bpb:          1.234567
training_seconds: 0.5
total_seconds:    0.7
peak_vram_mb:     0.0
mfu_percent:      0.00
total_tokens_M:   0.1
num_steps:        3
num_params_M:     0.5
depth:            2
"""


def run(source: str, tmp_path: Path, **kwargs) -> RunResult:
    kwargs.setdefault("env", {})
    kwargs.setdefault("timeout_s", 10.0)
    kwargs.setdefault("poll_interval_s", POLL_S)
    return run_training(textwrap.dedent(source), tmp_path / "run", **kwargs)


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (PID 1 here may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def wait_for_file(path: Path, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


# A train.py that starts a grandchild, writes both pids to pids.txt, then sleeps forever.
# The grandchild ignores SIGTERM, so only the runner's SIGKILL of the whole group stops it.
SLEEPER_WITH_GRANDCHILD = """\
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
with open("pids.txt.tmp", "w") as f:
    f.write(f"{__import__('os').getpid()} {child.pid}")
__import__("os").rename("pids.txt.tmp", "pids.txt")
print("sleeping", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def short_grace(monkeypatch):
    # SIGTERM-ignoring children would otherwise cost the full default grace period.
    monkeypatch.setattr(runner, "TERM_GRACE_S", 0.5)


def test_finished_run_parses_summary_and_reports_progress(tmp_path):
    source = f"""\
        import os
        print("starting", os.environ["AUTORESEARCH_PROFILE"], os.getcwd())
        for step in range(3):
            print(f"step {{step}} | progress {{step * 33.3:.1f}}% | loss {{4 - step:.6f}} | lrm 1.00 | dt 10ms | tok/s 1000 | mfu 1.5% | remaining {{3 - step}}s", flush=True)
        print({SUMMARY!r})
        """
    seen = []
    result = run(source, tmp_path, env={"AUTORESEARCH_PROFILE": "tiny"}, on_progress=seen.append)

    assert result.status == "finished", result.error
    assert result.returncode == 0
    assert result.error is None
    assert result.summary["val_bpb"] == pytest.approx(1.234567)
    assert result.summary["num_steps"] == 3
    assert result.summary["profile"] == "tiny"
    assert seen, "on_progress was never called"
    assert seen[-1]["step"] == 2 and seen[-1]["loss"] == pytest.approx(2.0)
    assert result.progress == seen[-1]
    # The source ran from the run directory, with the caller's environment added.
    assert (tmp_path / "run" / "train.py").read_text() == textwrap.dedent(source)
    assert f"starting tiny {tmp_path / 'run'}" in result.log_tail
    assert result.log_path == tmp_path / "run" / "train.log"
    assert result.ended_at >= result.started_at
    assert result.duration_s == pytest.approx(result.ended_at - result.started_at)


def test_exception_is_failed_with_traceback(tmp_path):
    result = run(
        """\
        print("step 1 | loss 3.0", flush=True)
        def build_model():
            raise RuntimeError("CUDA out of memory (pretend)")
        build_model()
        """,
        tmp_path,
    )
    assert result.status == "failed"
    assert result.returncode == 1
    assert result.summary is None
    assert "exited with code 1" in result.error
    assert "Traceback (most recent call last):" in result.error
    assert "RuntimeError: CUDA out of memory (pretend)" in result.error
    assert "build_model" in result.error


def test_exit_zero_without_summary_is_failed(tmp_path):
    result = run('print("done, but no summary")', tmp_path)
    assert result.status == "failed"
    assert result.returncode == 0
    assert "without a summary" in result.error


def test_nan_val_bpb_is_failed(tmp_path):
    result = run('print("---"); print("val_bpb: nan")', tmp_path)
    assert result.status == "failed"
    assert "val_bpb is not finite" in result.error


def test_timeout_kills_child_and_grandchild(tmp_path, short_grace):
    started = time.monotonic()
    result = run(SLEEPER_WITH_GRANDCHILD, tmp_path, timeout_s=2.5)
    elapsed = time.monotonic() - started

    assert result.status == "timeout"
    assert "time limit of 2.5 s" in result.error
    assert result.returncode == -signal.SIGTERM
    assert 2.5 <= elapsed < 2.5 + runner.TERM_GRACE_S + 2.0
    child_pid, grandchild_pid = map(int, (tmp_path / "run" / "pids.txt").read_text().split())
    assert not pid_alive(child_pid)
    assert not pid_alive(grandchild_pid)


def test_cancel_kills_the_group(tmp_path, short_grace):
    pids_file = tmp_path / "run" / "pids.txt"

    def should_cancel() -> bool:
        return pids_file.exists()  # cancel as soon as both processes are up

    result = run(SLEEPER_WITH_GRANDCHILD, tmp_path, timeout_s=10.0, should_cancel=should_cancel)

    assert result.status == "cancelled"
    assert result.error == "cancelled on request"
    assert result.duration_s < 5.0
    child_pid, grandchild_pid = map(int, pids_file.read_text().split())
    assert not pid_alive(child_pid)
    assert not pid_alive(grandchild_pid)


def test_callback_exception_propagates_and_group_is_killed(tmp_path, short_grace):
    pids_file = tmp_path / "run" / "pids.txt"
    source = SLEEPER_WITH_GRANDCHILD.replace('print("sleeping"', 'print("step 1 | loss 2.0"')

    def on_progress(progress: dict) -> None:
        wait_for_file(pids_file)
        raise ConnectionError("database went away")

    with pytest.raises(ConnectionError):
        run(source, tmp_path, on_progress=on_progress)

    child_pid, grandchild_pid = map(int, pids_file.read_text().split())
    assert not pid_alive(child_pid)
    assert not pid_alive(grandchild_pid)


def test_large_output_does_not_deadlock(tmp_path):
    # About 8 MB: far beyond a pipe buffer (64 KiB), which would block a PIPE-based runner.
    source = f"""\
        import sys
        line = "x" * 1000 + "\\n"
        for i in range(8000):
            sys.stdout.write(line)
            if i % 1000 == 0:
                print(f"step {{i}} | loss 1.0")
        print({SUMMARY!r})
        """
    seen = []
    result = run(source, tmp_path, timeout_s=20.0, on_progress=seen.append)
    assert result.status == "finished", result.error
    assert result.log_path.stat().st_size > 8_000_000
    assert len(result.log_tail) <= runner.LOG_TAIL_CHARS
    assert result.log_tail.rstrip().endswith("depth:            2")


def test_sigterm_to_worker_still_kills_the_group(tmp_path):
    # A worker process (here: a plain Python process running run_training in its main thread,
    # with SIGTERM at its default, as in a Celery pool child) gets SIGTERM mid-run.
    run_dir = tmp_path / "run"
    worker_script = tmp_path / "worker.py"
    worker_script.write_text(
        textwrap.dedent(
            f"""\
            import sys
            from pathlib import Path
            from workers import runner
            runner.TERM_GRACE_S = 0.5
            runner.run_training({SLEEPER_WITH_GRANDCHILD!r}, Path({str(run_dir)!r}), env={{}},
                                timeout_s=60, poll_interval_s=0.05)
            """
        )
    )
    repo_root = Path(__file__).resolve().parents[1]
    worker = subprocess.Popen(
        [sys.executable, str(worker_script)],
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    try:
        child_pid, grandchild_pid = map(int, wait_for_file(run_dir / "pids.txt").split())
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert not pid_alive(child_pid)
    assert not pid_alive(grandchild_pid)


def test_worker_killed_hard_takes_child_with_it(tmp_path):
    # kill -9 runs no cleanup; PR_SET_PDEATHSIG still takes the direct child down.
    run_dir = tmp_path / "run"
    source = 'import os, time\nopen("pid.txt", "w").write(str(os.getpid()))\ntime.sleep(3600)\n'
    worker_script = tmp_path / "worker.py"
    worker_script.write_text(
        f"from pathlib import Path\nfrom workers import runner\n"
        f"runner.run_training({source!r}, Path({str(run_dir)!r}), env={{}}, timeout_s=60)\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    worker = subprocess.Popen(
        [sys.executable, str(worker_script)],
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    child_pid = None
    try:
        child_pid = int(wait_for_file(run_dir / "pid.txt"))
        worker.kill()
        worker.wait()
        deadline = time.monotonic() + 5
        while pid_alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pid_alive(child_pid)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if child_pid is not None and pid_alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_tail_log(tmp_path):
    path = tmp_path / "train.log"
    assert tail_log(path, 100) == ""
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    tail = tail_log(path, 100)
    assert tail.endswith("line 999\n")
    assert tail.startswith("line ")  # the cut first line is dropped
    assert len(tail.encode()) <= 100
    assert tail_log(path, 10**6) == path.read_text()
