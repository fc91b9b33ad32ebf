"""Staged start (issue 15): the next run starts while the GPU still trains the current one and
holds at prepare's training loader until its turn. With real processes (workers/runner.py,
stage_training) and a real Celery worker on the CPU: a staged run trains nothing before the
run ahead of it has been recorded, and a cancel or a shutdown leaves no process of it behind."""

from __future__ import annotations

import re
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
from test_runner import SUMMARY, pid_alive
from test_standby import cpu_worker, start_worker
from test_workers import new_tag, submit, wait_for, wait_until, writable_by_train_py

import prepare
from app.config import PROJECT_ROOT, load_settings
from workers import runner, sandbox
from workers.runner import run_training, stage_training, start_standby


def probe_script(pid_file: Path | None = None) -> str:
    """A train.py that takes three batches from prepare's training loader, saying when it got
    each, after writing its pid to `pid_file`."""
    return textwrap.dedent(f"""
        import os, time
        import prepare
        pid_file = {str(pid_file) if pid_file else None!r}
        if pid_file:
            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
        loader = prepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, prepare.MAX_SEQ_LEN, "train",
                                         device="cpu")
        for batch in range(3):
            next(loader)
            print(f"batch {{batch}} at {{time.time():.3f}}", flush=True)
        loader.close()  # its producer thread must not be running while the interpreter exits
        print("step 0 | progress 100.0% | loss 3.0 | dt 10ms | tok/s 1000 | remaining 0s", flush=True)
        print({SUMMARY!r})
        """)


def steady_script(seconds: float) -> str:
    """A train.py that trains for `seconds`, with a progress line every 0.25 s, then ends
    with its summary; forever where `seconds` is 0."""
    return textwrap.dedent(f"""
        import time
        start = time.time()
        step = 0
        while {seconds} == 0 or time.time() - start < {seconds}:
            print(f"step {{step}} | progress 50.0% | loss 4.0 | dt 250ms | tok/s 1000 | remaining 5s", flush=True)
            step += 1
            time.sleep(0.25)
        print({SUMMARY!r})
        """)


def batch_times(log: str) -> dict[int, float]:
    return {int(n): float(t) for n, t in re.findall(r"^batch (\d) at ([\d.]+)$", log, re.MULTILINE)}


@pytest.fixture
def run_env(tiny_cache, tmp_path):
    sandbox_dir = load_settings({"AUTORESEARCH_STATE": str(tmp_path / "state")}).sandbox_dir
    return {"env": {"PYTHONPATH": str(PROJECT_ROOT), "AUTORESEARCH_PROFILE": "tiny",
                    "AUTORESEARCH_CACHE": str(sandbox.cache_view(tiny_cache, sandbox_dir))},
            "sandbox_dir": sandbox_dir}


def test_prepare_reads_the_variables_the_runner_sets():
    assert prepare._StagingGate.FD_VARIABLE == runner.STAGE_FD_VARIABLE
    assert prepare._StagingGate.BATCHES_VARIABLE == runner.STAGE_BATCHES_VARIABLE


@pytest.mark.parametrize(("batches", "standby"), [(1, False), (0, False), (1, True)])
def test_a_staged_run_holds_before_its_batch_until_let_go(tmp_path, run_env, batches, standby):
    env, sandbox_dir = run_env["env"], run_env["sandbox_dir"]
    staged = stage_training("run-probe", probe_script(), tmp_path / "run", env=env, batches=batches,
                            sandbox_dir=sandbox_dir,
                            standby=start_standby(env, sandbox_dir=sandbox_dir) if standby else None)
    try:
        assert staged.started.standby == standby
        ready = wait_until(staged.poll_ready, 120, "the staged run to hold")
        assert set(ready) == {"peak_reserved_mb", "held_reserved_mb"}  # 0 on the CPU
        time.sleep(1.0)  # held, not merely slow
        assert list(batch_times(staged.started.log_path.read_text())) == list(range(batches))
        assert staged.usable()
        let_go = time.time()
        result = run_training("", tmp_path / "run", env={}, timeout_s=60, staged=staged, sandbox_dir=sandbox_dir)
    finally:
        staged.discard()
    assert result.status == "finished" and result.standby == standby
    times = batch_times(result.log_tail)
    assert sorted(times) == [0, 1, 2]
    assert all(times[n] >= let_go for n in range(batches, 3))
    assert re.search(rf"^staged: held [\d.]+s for the GPU before batch {batches}$", result.log_tail, re.MULTILINE)
    assert staged.record()["held"] and staged.record()["batches"] == batches


def test_a_discarded_staged_run_leaves_no_process(tmp_path, run_env):
    pid_file = writable_by_train_py() / "pid"
    staged = stage_training("run-probe", probe_script(pid_file), tmp_path / "run", env=run_env["env"], batches=1,
                            sandbox_dir=run_env["sandbox_dir"])
    wait_until(staged.poll_ready, 120, "the staged run to hold")
    pid = int(pid_file.read_text())
    staged.discard()
    assert not pid_alive(pid) and staged.started.proc.returncode is not None


def test_a_staged_run_that_takes_no_batch_is_not_usable(tmp_path, run_env):
    """Nothing holds a train.py that never asks prepare's training loader for a batch: once it
    shows progress or ends, it cannot stand for the run."""
    staged = stage_training("run-steady", steady_script(1.0), tmp_path / "run", env=run_env["env"], batches=1,
                            sandbox_dir=run_env["sandbox_dir"])
    try:
        wait_until(staged.trains_unheld, 60, "its first progress line")
        assert not staged.usable() and staged.poll_ready() is None
    finally:
        staged.discard()


# ---------------------------------------------------------------------------
# In a real Celery worker


@pytest.fixture(scope="module")
def staging_worker(database_url, redis_url, tiny_cache, tmp_path_factory):
    with cpu_worker(database_url, redis_url, tiny_cache, tmp_path_factory.mktemp("state"),
                    staged_start_lead_s=60.0) as worker:
        yield worker


def run_of(client, experiment_id: str) -> dict:
    return client.get(f"/api/experiment/{experiment_id}").get_json()["runs"][-1]


def staged_run(client, experiment_id: str) -> dict | None:
    """Its run, once claimed as staged and waiting for the GPU."""
    runs = client.get(f"/api/experiment/{experiment_id}").get_json()["runs"]
    run = runs[-1] if runs else None
    return run if run and run["claimed_at"] and run["gpu_granted_at"] is None and run["status"] == "running" else None


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_the_next_run_is_staged_and_trains_only_after_the_run_ahead_is_recorded(staging_worker):
    client, gpu_id = staging_worker["client"], staging_worker["gpu_id"]
    tag = new_tag(client)
    ahead = submit(client, tag, steady_script(6.0), "ahead", gpu_id=gpu_id)
    behind = submit(client, tag, probe_script(), "behind", gpu_id=gpu_id)
    wait_until(lambda: staged_run(client, behind), 60, "the second run to be staged")
    first, second = wait_for(client, ahead), wait_for(client, behind)
    assert first["status"] == "keep" and second["status"] in {"keep", "discard"}, (second["error"], second["runs"])
    first_run, second_run = first["runs"][0], second["runs"][0]
    assert second_run["staging"]["held"] and second_run["staging"]["batches"] == 1
    # It got the GPU once the run ahead had been recorded, and trained on nothing before.
    assert at(second_run["gpu_granted_at"]) >= at(first_run["finished_at"])
    log = client.get(f"/api/experiment/{behind}/log").get_json()["log"]
    times = batch_times(log)
    assert times[0] < at(first_run["finished_at"]) <= times[1] <= times[2]


def test_a_cancelled_staged_run_leaves_no_process(staging_worker):
    client, gpu_id = staging_worker["client"], staging_worker["gpu_id"]
    tag = new_tag(client)
    pid_file = writable_by_train_py() / "pid"
    ahead = submit(client, tag, steady_script(0), "ahead, until cancelled", gpu_id=gpu_id)
    behind = submit(client, tag, probe_script(pid_file), "staged, then cancelled", gpu_id=gpu_id)
    wait_until(lambda: staged_run(client, behind), 60, "the second run to be staged")
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, "the staged process to start")
    pid = int(pid_file.read_text())
    assert client.post("/api/experiment/cancel", json={"experiment_id": behind}).status_code == 200
    record = wait_for(client, behind, timeout_s=30)
    assert record["status"] == "cancelled" and record["runs"][0]["status"] == "cancelled"
    assert "staged" in record["runs"][0]["error"]
    wait_until(lambda: not pid_alive(pid), 10, "the staged process to end")
    assert run_of(client, ahead)["status"] == "running"  # the run ahead trains on
    assert client.post("/api/experiment/cancel", json={"experiment_id": ahead}).status_code == 200
    assert wait_for(client, ahead, timeout_s=30)["status"] == "cancelled"


def test_a_worker_that_stops_hands_back_its_staged_run_and_leaves_no_process(staging_worker, tmp_path):
    client, settings = staging_worker["client"], staging_worker["settings"]
    stack, gpu_id = start_worker(settings, tmp_path / "logs", client)
    pid_file = writable_by_train_py() / "pid"
    try:
        tag = new_tag(client)
        ahead = submit(client, tag, steady_script(0), "ahead", gpu_id=gpu_id)
        behind = submit(client, tag, probe_script(pid_file), "staged", gpu_id=gpu_id)
        wait_until(lambda: staged_run(client, behind), 60, "the second run to be staged")
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, "the staged process to start")
        pid = int(pid_file.read_text())
        stack.stop("gpu0")  # SIGTERM, as `up` stops it
    finally:
        stack.stop_all()
    wait_until(lambda: not pid_alive(pid), 10, "the staged process to end")
    for experiment_id in (ahead, behind):
        runs = client.get(f"/api/experiment/{experiment_id}").get_json()["runs"]
        # Handed back: the attempt is released and a new one waits in the queue.
        assert [r["status"] for r in runs] == ["released", "queued"], runs
    for experiment_id in (ahead, behind):
        client.post("/api/experiment/cancel", json={"experiment_id": experiment_id})


def test_staged_start_can_be_switched_off():
    assert load_settings({}).staged_start_lead_s == 90.0
    assert load_settings({"STAGED_START_LEAD_S": "0"}).staged_start_lead_s == 0.0

