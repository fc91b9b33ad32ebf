"""The standby interpreter (workers/standby.py) with real processes: what train.py sees in it,
that it runs nothing before its hand-over, that it dies with its worker, and in a real Celery
worker that a run starts from it and no standby outlives a cancel or a warm shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import redis
from test_runner import SUMMARY, pid_alive, run
from test_workers import (
    hanging_script,
    new_tag,
    pool_entry,
    submit,
    summary_script,
    wait_for,
    wait_until,
    writable_by_train_py,
)

from app.config import PROJECT_ROOT, load_settings
from app.stack import Stack
from app.web import create_app
from workers.runner import start_standby

# What train.py can see of how it was started, from the run directory.
INTROSPECT = f"""\
    import os, sys
    print(open("data.txt").read(), os.environ["AUTORESEARCH_PROFILE"], __name__, sys.argv, sys.path[0], __file__,
          type(__builtins__).__name__, os.getuid(), os.getcwd())
    print({SUMMARY!r})
    """
EXIT_3 = "print('leaving early')\nimport sys\nsys.exit(3)\n"
RAISES = "def build():\n    raise RuntimeError('injected')\nprint('before')\nbuild()\n"


def standby_of(tmp_path: Path, source: str, *, standby: bool):
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "data.txt").write_text("from the run directory")
    # A standby handed the run at once is still importing: on a loaded machine that takes a while.
    return run(source, tmp_path, env={"AUTORESEARCH_PROFILE": "tiny"}, timeout_s=120,
               standby=start_standby({}) if standby else None)


@pytest.mark.parametrize(("source", "returncode"), [(INTROSPECT, 0), (EXIT_3, 3), (RAISES, 1)])
def test_train_py_in_a_standby_prints_what_a_fresh_one_prints(tmp_path, source, returncode):
    fresh = standby_of(tmp_path, source, standby=False)
    warm = standby_of(tmp_path, source, standby=True)  # the same run directory: the same paths
    assert (fresh.standby, warm.standby) == (False, True)
    assert fresh.returncode == warm.returncode == returncode
    assert warm.log_tail == fresh.log_tail
    assert warm.status == fresh.status and warm.error == fresh.error
    if source is INTROSPECT:
        assert warm.status == "finished"
        assert "from the run directory tiny __main__" in warm.log_tail
    if source is RAISES:
        assert "Traceback (most recent call last)" in warm.error and "RuntimeError: injected" in warm.error
        assert "standby" not in warm.log_tail and "runpy" not in warm.log_tail


def test_a_standby_that_does_not_fit_the_run_is_discarded(tmp_path):
    misfit = start_standby({"PYTHONPATH": "/elsewhere"})
    dead = start_standby({})
    dead.proc.kill()
    for standby in (misfit, dead):
        result = run(f"print({SUMMARY!r})", tmp_path, standby=standby)
        assert result.status == "finished" and not result.standby
        assert not pid_alive(standby.proc.pid)


def test_a_standby_runs_nothing_before_its_hand_over(tmp_path):
    standby = start_standby({})
    pid = standby.proc.pid
    try:
        # Its imports done (libtorch mapped), it waits: in the project folder, its output nowhere,
        # no process started.
        wait_until(lambda: "libtorch" in Path(f"/proc/{pid}/maps").read_text(), 60, "torch to be imported")
        time.sleep(2)
        assert pid_alive(pid)
        assert os.readlink(f"/proc/{pid}/cwd") == str(PROJECT_ROOT)
        assert os.readlink(f"/proc/{pid}/fd/1") == os.devnull
        assert psutil.Process(pid).children() == []
        assert not (tmp_path / "run").exists()
        result = run("import os\nprint('ran in', os.getpid())\n", tmp_path, standby=standby)
    finally:
        standby.discard()
    assert result.standby and f"ran in {pid}" in result.log_tail


def test_a_standby_dies_with_its_worker_and_when_discarded(tmp_path):
    discarded = start_standby({})
    discarded.discard()
    assert discarded.proc.returncode == -signal.SIGKILL and not pid_alive(discarded.proc.pid)

    # A worker killed without any cleanup: the kernel's parent-death signal takes its standby.
    worker = subprocess.Popen(
        [sys.executable, "-c", "import time; from workers.runner import start_standby\n"
                               "print(start_standby({}).proc.pid, flush=True); time.sleep(3600)"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(worker.stdout.readline())
        assert pid_alive(pid)
        worker.kill()
        worker.wait()
        wait_until(lambda: not pid_alive(pid), 5, "the standby to die with its worker")
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()


# ---------------------------------------------------------------------------
# In a real Celery worker


def start_worker(settings, log_dir: Path, client) -> tuple[Stack, str]:
    gpu_id = f"standby{uuid.uuid4().hex[:6]}-gpu0"
    stack = Stack(settings, log_dir)
    stack.start_gpu_worker(0, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
    wait_until(lambda: (pool_entry(client, gpu_id) or {}).get("status") == "idle", 60, "the worker to register")
    return stack, gpu_id


@contextlib.contextmanager
def cpu_worker(database_url, redis_url, tiny_cache, state: Path, **settings_overrides):
    """One CPU worker for stand-in train.py files (their printed number stands), with the API's
    test client: {"client", "settings", "stack", "gpu_id"}."""
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=state, cache_dir=tiny_cache,
        default_profile="tiny", kill_timeout=120.0, heartbeat_interval=1.0, stale_after=4.0, baseline_runs=1,
        trusted_scoring=False, **settings_overrides,
    )
    redis.Redis.from_url(redis_url).flushdb()
    client = create_app(settings).test_client()
    stack, gpu_id = start_worker(settings, state / "logs", client)
    try:
        yield {"client": client, "settings": settings, "stack": stack, "gpu_id": gpu_id}
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def one_worker(database_url, redis_url, tiny_cache, tmp_path_factory):
    with cpu_worker(database_url, redis_url, tiny_cache, tmp_path_factory.mktemp("state")) as worker:
        yield worker


def standbys(worker_pid: int) -> list[psutil.Process]:
    """The worker's standby interpreters (the next run's and the next evaluation's): its pool
    child's children running workers.standby."""
    found = []
    for process in psutil.Process(worker_pid).children(recursive=True):
        try:
            if "workers.standby" in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def worker_log(stack: Stack) -> str:
    return (stack.log_dir / "gpu0.log").read_text(errors="replace")


def test_the_next_run_starts_from_the_standby(one_worker):
    client, stack, gpu_id = one_worker["client"], one_worker["stack"], one_worker["gpu_id"]
    tag = new_tag(client)
    records = [wait_for(client, submit(client, tag, summary_script(), f"run {i}", gpu_id=gpu_id)) for i in (1, 2)]
    assert [r["status"] for r in records] == ["keep", "discard"]
    second_run = records[1]["runs"][0]["id"]
    wait_until(lambda: f"run {second_run}: train.py ran in the standby interpreter" in worker_log(stack), 10,
               "the worker's log line")
    # The next one waits already, its imports under way, next to the evaluator's.
    wait_until(lambda: len(standbys(stack.processes["gpu0"].pid)) == 2, 10, "the next standby")


def test_a_cancelled_run_leaves_only_the_next_standby(one_worker):
    client, stack, gpu_id = one_worker["client"], one_worker["stack"], one_worker["gpu_id"]
    worker_pid = stack.processes["gpu0"].pid
    waiting = standbys(worker_pid)
    assert len(waiting) == 2
    pid_file = writable_by_train_py() / "pids"
    experiment_id = submit(client, new_tag(client), hanging_script(pid_file), "to cancel", gpu_id=gpu_id)
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 60, "the run to start")
    train_pid, grandchild = map(int, pid_file.read_text().split())
    assert train_pid in {p.pid for p in waiting}  # train.py runs in a standby that waited
    assert client.post("/api/experiment/cancel", json={"experiment_id": experiment_id}).status_code == 200
    assert wait_for(client, experiment_id, timeout_s=30)["status"] == "cancelled"
    assert not pid_alive(train_pid) and not pid_alive(grandchild)
    # Besides its pool child, the worker has the next run's and the next evaluation's standbys
    # and nothing else.
    wait_until(lambda: len(standbys(worker_pid)) == 2, 10, "the next standby")
    pool_child, = psutil.Process(worker_pid).children()
    assert {p.pid for p in pool_child.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE} == \
        {p.pid for p in standbys(worker_pid)}


@pytest.mark.parametrize("training", [False, True])
def test_a_warm_shutdown_leaves_no_standby(one_worker, tmp_path, training):
    client = one_worker["client"]
    stack, gpu_id = start_worker(one_worker["settings"], tmp_path / "logs", client)
    try:
        worker_pid = stack.processes["gpu0"].pid
        pids = [p.pid for p in wait_until(lambda: standbys(worker_pid), 30, "the first run's standby")]
        if training:  # train.py runs in that standby, with a grandchild, when the worker is told to stop
            pid_file = writable_by_train_py() / "pids"
            submit(client, new_tag(client), hanging_script(pid_file), "handed back", gpu_id=gpu_id)
            wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 60, "the run to start")
            pids += map(int, pid_file.read_text().split())
        stack.stop("gpu0")  # SIGTERM, as `up` stops it
    finally:
        stack.stop_all()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10, "the standby to go")


def test_standby_interpreter_can_be_switched_off():
    assert load_settings({}).standby_interpreter
    assert not load_settings({"STANDBY_INTERPRETER": "0"}).standby_interpreter
