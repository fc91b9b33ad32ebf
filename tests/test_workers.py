"""Dispatch end to end: the Flask API, real Postgres and Redis, real `celery worker -P prefork
-c 1` processes, and the project's real train.py in the tiny profile."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import redis
from conftest_data import registration

from app.config import PROJECT_ROOT
from app.db import transaction
from app.models import FINISHED_STATUSES, Tag
from app.stack import Stack, settings_env
from app.web import create_app

TRAIN_PY = (PROJECT_ROOT / "train.py").read_text()
RUN_TIMEOUT_S = 240  # generous: two real tiny runs share two cores
FINISHED = set(FINISHED_STATUSES)


def summary_script(profile: str = "tiny", sleep_s: float = 0.0, progress: bool = True) -> str:
    """A stand-in train.py that prints the summary block (after one progress line, unless
    `progress` is off): for dispatch tests where the training itself is not the point."""
    line = "step 1 | progress 100.0% | loss 3.0 | lrm 1.00 | dt 10ms | tok/s 1000 | mfu 0.0% | remaining 0s"
    return textwrap.dedent(f"""
        import time
        time.sleep({sleep_s})
        print({line if progress else ""!r})
        print("---")
        for key, value in [("profile", "{profile}"), ("val_bpb", "1.5"), ("training_seconds", "1.0"),
                           ("total_seconds", "1.2"), ("peak_vram_mb", "0.0"), ("mfu_percent", "0.00"),
                           ("total_tokens_M", "0.1"), ("num_steps", "1"), ("num_params_M", "0.1"), ("depth", "1")]:
            print(f"{{key}}: {{value}}")
    """)


def hanging_script(pid_file: Path) -> str:
    """Hangs forever, with a grandchild that hangs too; both pids go to pid_file."""
    return textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        with open({str(pid_file)!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}")
        step = 0
        while True:
            step += 1
            print(f"step {{step}} | progress 1.0% | loss 5.0 | lrm 1.00 | dt 100ms | tok/s 500 | mfu 0.0% | remaining 99s", flush=True)
            time.sleep(0.5)
    """)


def writable_by_train_py() -> Path:
    """A folder a sandboxed train.py can write to: under a root worker it runs as another user,
    who cannot reach pytest's folders."""
    folder = Path(tempfile.mkdtemp(prefix="ar-pids-"))
    os.chmod(folder, 0o777)
    return folder


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes: it holds no memory, GPU or otherwise.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def cluster(database_url, redis_url, tiny_cache, tmp_path_factory):
    """Two CPU workers, GPU indexes 0 and 1, both on the shared `train` queue too."""
    from app.config import load_settings

    state = tmp_path_factory.mktemp("state")
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=state, cache_dir=tiny_cache,
        default_profile="tiny", kill_timeout=RUN_TIMEOUT_S, heartbeat_interval=1.0, stale_after=4.0,
        baseline_runs=1,
        # Stand-in train.py scripts print a summary and export no model: the worker takes their number.
        trusted_scoring=False,
    )
    redis.Redis.from_url(redis_url).flushdb()
    run_id = uuid.uuid4().hex[:6]
    stack = Stack(settings, state / "logs")
    gpu_ids = {i: f"test{run_id}-gpu{i}" for i in (0, 1)}
    for index, gpu_id in gpu_ids.items():
        stack.start_gpu_worker(index, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
    app = create_app(settings)
    client = app.test_client()
    try:
        wait_until(lambda: all(pool_entry(client, g) and pool_entry(client, g)["status"] == "idle"
                               for g in gpu_ids.values()), 60, "workers to register")
        yield {"client": client, "settings": settings, "stack": stack, "gpu_ids": gpu_ids, "run_id": run_id}
    finally:
        stack.stop_all()


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def pool_entry(client, gpu_id: str) -> dict | None:
    workers = client.get("/api/pool/list").get_json()["workers"]
    return next((w for w in workers if w["id"] == gpu_id), None)


def new_tag(client) -> str:
    tag = f"w{uuid.uuid4().hex[:10]}"
    assert client.post("/api/experiment/setup", json={"tag": tag, "profile": "tiny"}).status_code == 200
    return tag


def submit(client, tag: str, source: str, description: str = "run", **extra) -> str:
    response = client.post("/api/experiment/submit", json={
        "tag": tag, "commit_sha": uuid.uuid4().hex[:12], "description": description, "hypothesis": "h",
        "category": "other", "train_py": source, **extra,
    })
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "queued"
    return response.get_json()["experiment_id"]


def wait_for(client, experiment_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = client.post("/api/experiment/wait", json={"experiment_id": experiment_id, "timeout_s": 5}).get_json()
        if record["status"] in FINISHED:
            return record
    raise AssertionError(f"{experiment_id} did not finish: {record}")


def tag_row(settings, tag: str) -> Tag:
    with transaction(settings.database_url) as session:
        return session.get(Tag, tag)


def test_two_workers_train_two_real_runs_at_once_and_keep_the_better(cluster):
    client, gpu_ids = cluster["client"], cluster["gpu_ids"]
    tag = new_tag(client)
    first = submit(client, tag, TRAIN_PY, "baseline")
    second = submit(client, tag, TRAIN_PY.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05"), "lr")

    # While both train, both workers are `training` and keep heartbeating.
    def both_training():
        entries = [pool_entry(client, gpu_ids[i]) for i in (0, 1)]
        return entries if all(e["status"] == "training" for e in entries) else None

    before = both_training() or wait_until(both_training, 60, "both workers training")
    time.sleep(2.5)
    after = [pool_entry(client, gpu_ids[i]) for i in (0, 1)]
    for old, new in zip(before, after, strict=True):
        assert new["status"] == "training"
        assert new["last_heartbeat"] > old["last_heartbeat"]
        assert "name" in new["telemetry"]

    records = [wait_for(client, first), wait_for(client, second)]
    # Each first run on its own GPU (a promising one may then get a confirmation run on either).
    assert {r["runs"][0]["gpu_id"] for r in records} == {gpu_ids[0], gpu_ids[1]}
    for r in records:
        assert r["status"] in ("keep", "discard")
        assert r["profile"] == "tiny"
        assert math.isfinite(r["val_bpb"]) and r["val_bpb"] > 0
        assert r["num_steps"] > 0 and r["num_params_m"] > 0 and r["total_seconds"] > 0
        # Each run's curve, and step 0's wall time (the compile time) from its log.
        for run in r["runs"]:
            assert run["curve"] and run["compile_seconds"] > 0
    # The runs overlapped in time.
    a, b = records
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]
    # The first to finish is kept; the other only if better (by the default policy's verdict).
    records.sort(key=lambda r: r["finished_at"])
    assert records[0]["status"] == "keep"
    if records[1]["status"] == "keep":
        assert records[1]["val_bpb"] < records[0]["val_bpb"]
    row = tag_row(cluster["settings"], tag)
    assert row.total_experiments == 2 and row.kept_experiments + row.discarded_experiments == 2
    assert row.best_val_bpb == min(r["val_bpb"] for r in records if r["status"] == "keep")
    # The stored log tail: train.py's summary (its val_bpb is the worker's evaluator's, not printed
    # by a sandboxed train.py, which has no validation split).
    log = client.get(f"/api/experiment/{first}/log").get_json()["log"]
    assert "num_steps:" in log and "training_seconds:" in log
    for i in (0, 1):
        wait_until(lambda i=i: pool_entry(client, gpu_ids[i])["status"] == "idle", 10, "workers idle again")


def test_train_py_that_raises_ends_crash_with_the_traceback(cluster):
    client = cluster["client"]
    tag = new_tag(client)
    broken = TRAIN_PY.replace("import torch\n", "import torch\nraise RuntimeError('injected failure in train.py')\n", 1)
    assert broken != TRAIN_PY
    record = wait_for(client, submit(client, tag, broken, "broken"))
    assert record["status"] == "crash"
    assert "Traceback" in record["error"]
    assert "RuntimeError: injected failure in train.py" in record["error"]
    assert tag_row(cluster["settings"], tag).consecutive_crashes == 1


def test_profile_mismatch_is_a_crash(cluster):
    client = cluster["client"]
    tag = new_tag(client)
    record = wait_for(client, submit(client, tag, summary_script(profile="h100"), "changed profile"))
    assert record["status"] == "crash"
    assert "profile" in record["error"]


def test_hanging_train_py_times_out_and_leaves_no_process(cluster, tmp_path):
    client = cluster["client"]
    # A worker of its own with a short kill timeout; the cluster's are busy with nothing now.
    gpu_id = f"test{cluster['run_id']}-gpu5"
    short = Stack(dataclasses.replace(cluster["settings"], kill_timeout=6.0), tmp_path / "logs")
    short.start_gpu_worker(5, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
    try:
        wait_until(lambda: (pool_entry(client, gpu_id) or {}).get("status") == "idle", 60, "the worker")
        tag = new_tag(client)
        pid_file = writable_by_train_py() / "pids"
        record = wait_for(client, submit(client, tag, hanging_script(pid_file), "hang", gpu_index=5), timeout_s=60)
    finally:
        short.stop_all()
    assert record["status"] == "timeout"
    assert record["gpu_id"] == gpu_id
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids)
    row = tag_row(cluster["settings"], tag)
    assert row.crashed_experiments == 1 and row.consecutive_crashes == 1


def test_running_experiment_is_cancelled_and_its_group_is_gone(cluster, tmp_path):
    client = cluster["client"]
    tag = new_tag(client)
    pid_file = writable_by_train_py() / "pids"
    experiment_id = submit(client, tag, hanging_script(pid_file), "to cancel", gpu_index=1)
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 60, "the run to start")
    running = wait_until(
        lambda: (r := client.get(f"/api/experiment/{experiment_id}").get_json())["progress"] and r, 30,
        "live progress")
    assert running["status"] == "running" and running["progress"]["step"] >= 1
    assert client.post("/api/experiment/cancel", json={"experiment_id": experiment_id}).status_code == 200
    record = wait_for(client, experiment_id, timeout_s=30)
    assert record["status"] == "cancelled"
    pids = [int(p) for p in pid_file.read_text().split()]
    assert not any(alive(pid) for pid in pids)
    assert tag_row(cluster["settings"], tag).total_experiments == 0  # a cancel is no verdict


def test_queued_experiment_cancelled_before_it_runs(cluster):
    client = cluster["client"]
    tag = new_tag(client)
    # Pinned behind a slow run on GPU 1, so the second one is still queued when cancelled.
    slow = submit(client, tag, summary_script(sleep_s=4), "slow", gpu_index=1)
    queued = submit(client, tag, summary_script(), "queued", gpu_index=1)
    assert client.post("/api/experiment/cancel", json={"experiment_id": queued}).get_json()["status"] == "cancelled"
    assert wait_for(client, slow)["status"] == "keep"
    time.sleep(1)
    record = client.get(f"/api/experiment/{queued}").get_json()
    assert record["status"] == "cancelled" and record["started_at"] is None


def test_pinned_experiments_run_only_on_their_gpu(cluster):
    client, gpu_ids = cluster["client"], cluster["gpu_ids"]
    tag = new_tag(client)
    ids = [submit(client, tag, summary_script(sleep_s=0.5), f"pinned {i}", gpu_index=1) for i in range(3)]
    records = [wait_for(client, i) for i in ids]
    assert {r["gpu_id"] for r in records} == {gpu_ids[1]}
    assert {r["gpu_index"] for r in records} == {1}


def test_submit_to_an_offline_gpu_or_a_tripped_tag_is_refused(cluster):
    client = cluster["client"]
    tag = new_tag(client)
    response = client.post("/api/experiment/submit",
                           json=registration(tag, train_py=summary_script(), gpu_index=42))
    assert response.status_code == 409 and "gpu_index" in str(response.get_json())
    broken = "raise SystemExit('broken on purpose')\n"
    for _ in range(3):
        assert wait_for(client, submit(client, tag, broken, "broken"))["status"] == "crash"
    refused = client.post("/api/experiment/submit", json=registration(tag, train_py=summary_script()))
    assert refused.status_code == 409 and "acknowledge_crashes" in refused.get_json()["error"]
    accepted = submit(client, tag, summary_script(), "after fix", acknowledge_crashes=True)
    assert wait_for(client, accepted)["status"] == "keep"


def test_duplicate_message_never_runs_a_finished_experiment_twice(cluster):
    from app.dispatch import send_all
    from app.services.lifecycle import Dispatch, gpu_queue

    client = cluster["client"]
    tag = new_tag(client)
    experiment_id = submit(client, tag, summary_script(), "once")
    record = wait_for(client, experiment_id)
    assert record["status"] == "keep"
    # What a redelivery looks like to a worker: the same run again, on both queues.
    run_id = record["runs"][0]["id"]
    send_all([Dispatch(run_id, str(uuid.uuid4()), "train"),
              Dispatch(run_id, str(uuid.uuid4()), gpu_queue(cluster["gpu_ids"][0]))], cluster["settings"].broker_url)
    time.sleep(3)
    again = client.get(f"/api/experiment/{experiment_id}").get_json()
    assert again["finished_at"] == record["finished_at"] and again["status"] == "keep"
    row = tag_row(cluster["settings"], tag)
    assert row.total_experiments == 1 and row.kept_experiments == 1


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_killed_pool_child_requeues_the_run(cluster):
    """The pool child (not the worker) dies mid-run: the parent sees the task fail and queues
    the run again; the worker's fresh child trains it; it is recorded once."""
    client, stack = cluster["client"], cluster["stack"]
    tag = new_tag(client)
    experiment_id = submit(client, tag, summary_script(sleep_s=4), "child dies", gpu_index=1)
    wait_until(lambda: client.get(f"/api/experiment/{experiment_id}").get_json()["status"] == "running", 30,
               "the run to start")
    pool_children = children_of(stack.processes["gpu1"].pid)
    assert len(pool_children) == 1
    os.kill(pool_children[0], signal.SIGKILL)
    record = wait_for(client, experiment_id, timeout_s=60)
    assert record["status"] == "keep"
    assert [(r["attempt"], r["status"]) for r in record["runs"]] == [(1, "lost"), (2, "finished")]
    row = tag_row(cluster["settings"], tag)
    assert row.total_experiments == 1 and row.kept_experiments == 1


def test_sigkilled_worker_loses_nothing_and_records_once(cluster, monkeypatch):
    """A worker dies with SIGKILL mid-run. Its heartbeats stop, the sweep marks its GPU offline
    and queues the run again; the surviving worker trains it; it is recorded exactly once."""
    from app import control

    client, stack, gpu_ids = cluster["client"], cluster["stack"], cluster["gpu_ids"]
    for key, value in settings_env(cluster["settings"]).items():
        monkeypatch.setenv(key, value)
    tag = new_tag(client)
    slow_real = TRAIN_PY.replace("import torch\n", "import torch\nimport time; time.sleep(3)\n", 1)
    experiment_id = submit(client, tag, slow_real, "survives a dead worker", gpu_index=None)
    running = wait_until(
        lambda: (r := client.get(f"/api/experiment/{experiment_id}").get_json())["status"] == "running" and r,
        60, "the run to start")
    victim = next(name for name, gid in (("gpu0", gpu_ids[0]), ("gpu1", gpu_ids[1])) if gid == running["gpu_id"])
    survivor_gpu = gpu_ids[1] if victim == "gpu0" else gpu_ids[0]
    stack.stop(victim, signal.SIGKILL)

    # Silent for longer than STALE_AFTER: the lease runs out, the sweep queues the run again.
    time.sleep(cluster["settings"].stale_after + 1.5)
    assert len(control.sweep()["requeued"]) == 1
    assert pool_entry(client, running["gpu_id"])["status"] == "offline"

    record = wait_for(client, experiment_id)
    assert record["status"] == "keep"
    assert record["gpu_id"] == survivor_gpu
    assert [(r["attempt"], r["status"]) for r in record["runs"]] == [(1, "lost"), (2, "finished")]
    row = tag_row(cluster["settings"], tag)
    assert row.total_experiments == 1 and row.kept_experiments == 1
    # A second sweep finds nothing more to do.
    assert control.sweep()["requeued"] == []
