"""The run lifecycle under faults, with real processes: Celery workers killed with SIGKILL and
started again under the same GPU id, clean restarts, a cancel whose worker dies, Redis killed,
twenty runs on two workers, and two completions of one experiment at once.

Every scenario ends with the run in a final state within one STALE_AFTER plus one sweep after
the restart, trained by one process at a time and recorded once. "One at a time" is checked by
the training script itself: it holds an exclusive lock on a file of its experiment while it
trains, and crashes loudly if another training of the same experiment holds it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import redis
from conftest_data import registration
from test_workers import pool_entry, wait_for, wait_until, writable_by_train_py

from app import control, embedded
from app.config import load_settings
from app.db import transaction
from app.models import Experiment, Tag
from app.services import experiments as exp_svc
from app.services import lifecycle
from app.stack import Stack, settings_env
from app.web import create_app

STALE_AFTER = 3.0
HEARTBEAT = 0.5


def exclusive_script(lock_dir: Path, seconds: float) -> str:
    """Trains for `seconds` (progress lines every 0.25 s) while holding its experiment's lock."""
    return textwrap.dedent(f"""
        import fcntl, os, sys, time
        lock = open(os.path.join({str(lock_dir)!r}, "lock"), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("TRAINED TWICE AT THE SAME TIME", flush=True)
            sys.exit(3)
        with open(os.path.join({str(lock_dir)!r}, "starts"), "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        steps = int({seconds} / 0.25)
        for step in range(1, steps + 1):
            print(f"step {{step}} | progress {{100 * step / steps:.1f}}% | loss 3.0 | tok/s 1000 | remaining 1s", flush=True)
            time.sleep(0.25)
        print("---")
        for key, value in [("profile", "tiny"), ("val_bpb", "1.5"), ("training_seconds", "{seconds}"),
                           ("total_seconds", "{seconds}"), ("num_steps", str(steps))]:
            print(f"{{key}}: {{value}}")
    """)


@pytest.fixture
def faults(database_url, redis_url, tiny_cache, tmp_path, monkeypatch, db):
    """Settings with short leases, a way to start CPU workers under fixed GPU ids, and the API."""
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=tmp_path / "state", cache_dir=tiny_cache,
        default_profile="tiny", kill_timeout=120, heartbeat_interval=HEARTBEAT, stale_after=STALE_AFTER,
        baseline_runs=1,
        # Stand-in train.py scripts print a summary and export no model: the worker takes their number.
        trusted_scoring=False,
    )
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)  # control.sweep() reads its settings from the environment
    redis.Redis.from_url(redis_url).flushdb()
    stacks: list[Stack] = []
    client = create_app(settings).test_client()

    def start_worker(gpu_id: str, index: int = 0, broker_url: str | None = None) -> Stack:
        worker_settings = dataclasses.replace(settings, broker_url=broker_url or settings.broker_url,
                                              result_backend=broker_url or settings.broker_url)
        stack = Stack(worker_settings, tmp_path / f"logs-{len(stacks)}")
        stack.start_gpu_worker(index, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
        stacks.append(stack)
        # Registered, whatever it does next: a restarted worker may take a queued run at once.
        wait_until(lambda: pool_entry(client, gpu_id), 60, f"{gpu_id} to register")
        return stack

    yield {"settings": settings, "client": client, "start_worker": start_worker}
    for stack in stacks:
        stack.stop_all()


@pytest.fixture
def lock_dir() -> Path:
    """Where the training script keeps its lock: a folder a sandboxed train.py can write to."""
    return writable_by_train_py()


def new_tag(client) -> str:
    tag = f"f{uuid.uuid4().hex[:10]}"
    assert client.post("/api/experiment/setup", json={"tag": tag, "profile": "tiny"}).status_code == 200
    return tag


def submit(client, tag: str, source: str, **extra) -> str:
    response = client.post("/api/experiment/submit", json=registration(tag, train_py=source, **extra))
    assert response.status_code == 200, response.get_json()
    return response.get_json()["experiment_id"]


def running(client, experiment_id: str) -> dict:
    return wait_until(
        lambda: (r := client.get(f"/api/experiment/{experiment_id}").get_json())["progress"] and r, 60,
        "the run to train")


def sigkill_tree(popen, *, parent_only: bool = False) -> None:
    """SIGKILL a process and everything under it (or the process alone), all at once."""
    process = psutil.Process(popen.pid)
    victims = [process] if parent_only else [process, *process.children(recursive=True)]
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    popen.wait(10)
    psutil.wait_procs(victims, timeout=10)


def tag_row(settings, tag: str) -> Tag:
    with transaction(settings.database_url) as session:
        return session.get(Tag, tag)


def sweep_until_final(client, experiment_id: str, timeout_s: float) -> dict:
    """Beat's sweep, called the way beat calls it, until the experiment is final."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        control.sweep()
        record = client.get(f"/api/experiment/{experiment_id}").get_json()
        if record["status"] in ("keep", "discard", "crash", "timeout", "cancelled"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"{experiment_id} not final after {timeout_s}s: {record['status']}")


def assert_trained_once_at_a_time(lock_dir: Path, record: dict) -> None:
    assert record["status"] in ("keep", "discard"), record
    assert "TRAINED TWICE" not in (record["error"] or "")
    finished = [r for r in record["runs"] if r["status"] == "finished"]
    assert len(finished) == 1


# Every process: what the OOM killer or a host crash leaves. (The parent alone dying is the same
# case for the lease, with the pool child stopping train.py when it sees its parent gone.)
@pytest.mark.parametrize("victims", ["every process of the worker"])
def test_sigkilled_worker_restarted_within_5s_under_the_same_id_ends_its_run(faults, lock_dir, victims):
    """The restarted worker gives up what its previous incarnation held at once: the run is
    queued again as attempt 2 and finishes, instead of staying `running` for good."""
    client, start_worker = faults["client"], faults["start_worker"]
    gpu_id = f"restart-{uuid.uuid4().hex[:6]}"
    stack = start_worker(gpu_id)
    tag = new_tag(client)
    experiment_id = submit(client, tag, exclusive_script(lock_dir, seconds=4))
    running(client, experiment_id)
    sigkill_tree(stack.processes.pop("gpu0"), parent_only=victims == "the worker's parent only")
    time.sleep(2)
    restarted_at = time.monotonic()
    start_worker(gpu_id)
    record = sweep_until_final(client, experiment_id, timeout_s=STALE_AFTER + 30)
    assert time.monotonic() - restarted_at < STALE_AFTER + 30
    assert_trained_once_at_a_time(lock_dir, record)
    assert [(r["attempt"], r["status"]) for r in record["runs"]] == [(1, "lost"), (2, "finished")]
    assert tag_row(faults["settings"], tag).total_experiments == 1


def test_autoresearch_worker_killed_and_restarted_within_5s(faults, tmp_path, lock_dir):
    """`autoresearch worker` execs Celery: the same as a worker of `up`, started by the command."""
    import subprocess
    import sys

    client, settings = faults["client"], faults["settings"]
    gpu_id = f"cmd-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **settings_env(settings)}

    def start():
        with open(tmp_path / f"worker-{time.monotonic_ns()}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--gpu", "0", "--cpu",
                                        "--gpu-id", gpu_id], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        wait_until(lambda: (pool_entry(client, gpu_id) or {}).get("status") == "idle", 60, "the worker")
        return process

    worker = start()
    try:
        tag = new_tag(client)
        experiment_id = submit(client, tag, exclusive_script(lock_dir, seconds=4))
        running(client, experiment_id)
        sigkill_tree(worker)
        time.sleep(2)
        worker = start()
        record = sweep_until_final(client, experiment_id, timeout_s=STALE_AFTER + 30)
        assert_trained_once_at_a_time(lock_dir, record)
        assert [r["status"] for r in record["runs"]] == ["lost", "finished"]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)


def test_cancel_then_worker_sigkill_ends_cancelled_and_changes_no_counter(faults, lock_dir):
    client, start_worker = faults["client"], faults["start_worker"]
    stack = start_worker(f"cancel-{uuid.uuid4().hex[:6]}")
    tag = new_tag(client)
    experiment_id = submit(client, tag, exclusive_script(lock_dir, seconds=30))
    running(client, experiment_id)
    assert client.post("/api/experiment/cancel", json={"experiment_id": experiment_id}).status_code == 200
    sigkill_tree(stack.processes.pop("gpu0"))
    record = sweep_until_final(client, experiment_id, timeout_s=STALE_AFTER + 15)
    assert record["status"] == "cancelled"
    assert [r["status"] for r in record["runs"]] == ["cancelled"]
    row = tag_row(faults["settings"], tag)
    assert (row.total_experiments, row.crashed_experiments, row.consecutive_crashes) == (0, 0, 0)


def test_three_clean_restarts_during_one_run_charge_no_attempt(faults, lock_dir):
    client, start_worker = faults["client"], faults["start_worker"]
    gpu_id = f"clean-{uuid.uuid4().hex[:6]}"
    stack = start_worker(gpu_id)
    tag = new_tag(client)
    experiment_id = submit(client, tag, exclusive_script(lock_dir, seconds=6))
    for _ in range(3):
        running(client, experiment_id)
        stack.stop("gpu0")  # SIGTERM, as Ctrl-C of `up` does: a warm shutdown
        stack = start_worker(gpu_id)
    record = wait_for(client, experiment_id, timeout_s=90)
    assert_trained_once_at_a_time(lock_dir, record)
    assert [(r["attempt"], r["status"]) for r in record["runs"]] == [
        (1, "released"), (1, "released"), (1, "released"), (1, "finished")]
    row = tag_row(faults["settings"], tag)
    assert (row.total_experiments, row.kept_experiments, row.consecutive_crashes) == (1, 1, 0)


def test_redis_killed_with_one_run_queued_and_one_running(faults):
    """SIGKILL of an embedded Redis (append-only file): the worker reconnects, the running run
    is recorded, the queued one still runs (resent by the sweep if its message was lost)."""
    start_worker, settings = faults["start_worker"], faults["settings"]
    state = Path(tempfile.mkdtemp(prefix="ar-redis-kill-"))
    port = embedded.free_port()
    broker_url, stop_redis = embedded.start_redis(state, port)
    api = create_app(dataclasses.replace(settings, broker_url=broker_url, result_backend=broker_url)).test_client()
    try:
        start_worker(f"redis-{uuid.uuid4().hex[:6]}", broker_url=broker_url)
        tag = new_tag(api)
        locks = {"busy": writable_by_train_py(), "queued": writable_by_train_py()}
        busy = submit(api, tag, exclusive_script(locks["busy"], seconds=5))
        queued = submit(api, tag, exclusive_script(locks["queued"], seconds=1))
        running(api, busy)
        pid = int((state / "redis" / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        time.sleep(2)
        assert start_redis_again(state, port) == broker_url
        with transaction(settings.database_url) as session:
            from app.dispatch import send_all, task_ids_in_broker
            from app.services import runs

            lost = runs.redispatch_lost_messages(session, present_task_ids=task_ids_in_broker(broker_url),
                                                 min_age_s=0)
        send_all(lost, broker_url)
        for experiment_id, lock_dir in ((busy, locks["busy"]), (queued, locks["queued"])):
            assert_trained_once_at_a_time(lock_dir, wait_for(api, experiment_id, timeout_s=90))
        assert tag_row(settings, tag).total_experiments == 2
    finally:
        stop_redis()


def start_redis_again(state: Path, port: int) -> str:
    url, _ = embedded.start_redis(state, port)
    return url


def test_twenty_submissions_on_two_workers_each_finish_exactly_once(faults):
    client, start_worker = faults["client"], faults["start_worker"]
    suffix = uuid.uuid4().hex[:6]
    start_worker(f"twenty-a-{suffix}", index=0)
    start_worker(f"twenty-b-{suffix}", index=1)
    tag = new_tag(client)
    locks = [writable_by_train_py() for _ in range(20)]
    ids = [submit(client, tag, exclusive_script(lock, seconds=0.5)) for lock in locks]
    records = [wait_for(client, experiment_id, timeout_s=180) for experiment_id in ids]
    for lock, record in zip(locks, records, strict=True):
        assert_trained_once_at_a_time(lock, record)
        assert (lock / "starts").read_text().count("\n") == 1
    assert len({r["gpu_id"] for r in records}) == 2
    row = tag_row(faults["settings"], tag)
    assert row.total_experiments == 20 and row.kept_experiments + row.discarded_experiments == 20


def test_a_completion_holding_a_reference_cannot_decide_twice(client, settings):
    """Two completions of one experiment at once, each holding the Experiment object it loaded
    before deciding: one verdict, and the other answers 409."""
    client.post("/api/experiment/setup", json={"tag": "twice", "profile": "tiny"})
    experiment_id = client.post("/api/experiment/register", json=registration("twice")).get_json()["experiment_id"]
    policy = lifecycle.Policy.from_settings(settings)
    loaded = threading.Barrier(2)
    answers: list = []

    def complete(value: float) -> None:
        try:
            with transaction(settings.database_url) as session:
                held = exp_svc.get_experiment(session, experiment_id)
                assert held.status == "running"
                loaded.wait(10)
                answers.append(lifecycle.complete_manual(session, experiment_id=experiment_id,
                                                         metrics={"val_bpb": value}, policy=policy))
        except Exception as exc:  # the loser's Conflict, collected for the assertion
            answers.append(exc)

    threads = [threading.Thread(target=complete, args=(value,)) for value in (1.1, 1.2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    verdicts = [a for a in answers if isinstance(a, dict)]
    refused = [a for a in answers if not isinstance(a, dict)]
    assert len(verdicts) == 1 and len(refused) == 1
    assert getattr(refused[0], "status", None) == 409
    record = client.get(f"/api/experiment/{experiment_id}").get_json()
    assert record["status"] == "keep" and record["val_bpb"] == verdicts[0]["val_bpb"]
    assert [r["status"] for r in record["runs"]] == ["finished"]
    with transaction(settings.database_url) as session:
        assert session.get(Tag, "twice").total_experiments == 1
        assert session.get(Experiment, experiment_id).status == "keep"
