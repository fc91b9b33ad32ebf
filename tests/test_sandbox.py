"""The sandboxed child, with a real CPU worker and the tiny profile: what train.py can and cannot
reach (credentials, the validation split, the worker's clock), and that the baseline still trains."""

from __future__ import annotations

import dataclasses
import math
import os
import pwd
import textwrap
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import redis
from test_workers import TRAIN_PY, new_tag, pool_entry, submit, wait_for, wait_until

from app.config import load_settings
from app.stack import Stack
from app.web import create_app
from run_profiles import PROFILES
from workers import sandbox
from workers.runner import allowed_environment

KILL_TIMEOUT_S = 240.0  # far beyond the tiny profile's deadline: the deadline, not this, ends a sleeper
TOKEN = f"secret-token-{uuid.uuid4().hex}"
FLOWER_AUTH = f"admin:{TOKEN}-flower"
CLOUD_SECRET = f"cloud-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def sandboxed(database_url, redis_url, tiny_cache, tmp_path_factory):
    """One CPU worker whose environment holds an API token, Flower's credentials and a cloud key."""
    state = tmp_path_factory.mktemp("state")
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=state, cache_dir=tiny_cache,
        default_profile="tiny", kill_timeout=KILL_TIMEOUT_S, heartbeat_interval=1.0, stale_after=4.0,
        baseline_runs=1,
    )
    worker_settings = dataclasses.replace(settings, api_token=TOKEN)
    redis.Redis.from_url(redis_url).flushdb()
    gpu_id = f"sandbox{uuid.uuid4().hex[:6]}-gpu0"
    stack = Stack(worker_settings, state / "logs")
    secrets = {"FLOWER_BASIC_AUTH": FLOWER_AUTH, "AWS_SECRET_ACCESS_KEY": CLOUD_SECRET, "NVIDIA_API_KEY": CLOUD_SECRET}
    saved = {name: os.environ.get(name) for name in secrets}
    os.environ.update(secrets)  # the worker inherits the test's environment
    try:
        stack.start_gpu_worker(0, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    client = create_app(settings).test_client()  # the API itself asks for no token here
    try:
        wait_until(lambda: (pool_entry(client, gpu_id) or {}).get("status") == "idle", 60, "the worker to register")
        yield {"client": client, "settings": settings}
    finally:
        stack.stop_all()


def run_log_file(settings, record: dict) -> str:
    run = record["runs"][-1]
    return (settings.runs_dir / record["id"] / run["id"] / "train.log").read_text()


def stored_log(client, experiment_id: str) -> str:
    return client.get(f"/api/experiment/{experiment_id}/log").get_json()["log"]


def test_train_py_sees_no_credential_or_service_url(sandboxed):
    client, settings = sandboxed["client"], sandboxed["settings"]
    dump = textwrap.dedent("""
        import os, pwd
        print("ENV", sorted(os.environ.items()))
        print("USER", os.getuid(), pwd.getpwuid(os.getuid()).pw_name)
    """)
    record = wait_for(client, submit(client, new_tag(client), dump, "environment dump"))
    for log in (stored_log(client, record["id"]), run_log_file(settings, record)):
        assert "ENV [" in log and "AUTORESEARCH_PROFILE" in log  # the dump is there
        for secret in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "API_TOKEN", "FLOWER_BASIC_AUTH",
                       "AWS_SECRET_ACCESS_KEY", "NVIDIA_API_KEY", "AUTORESEARCH_STATE",
                       settings.database_url, settings.broker_url, TOKEN, CLOUD_SECRET):
            assert secret not in log
        # Not even the database's address in another spelling.
        assert "postgres" not in log.lower() and "redis://" not in log
        if os.geteuid() == 0:
            account = pwd.getpwnam(sandbox.SANDBOX_USER)
            assert f"USER {account.pw_uid} {sandbox.SANDBOX_USER}" in log
    assert record["status"] == "crash"  # it printed no summary: nothing to score


def test_train_py_cannot_read_the_validation_shard(sandboxed, tiny_cache):
    client = sandboxed["client"]
    snoop = textwrap.dedent(f"""
        import os
        import prepare
        print("TRAIN SHARDS", len(prepare.split_paths("train")))
        print("TOKENIZER", prepare.Tokenizer.from_directory().get_vocab_size())
        candidates = [os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME),
                      os.path.join({str(tiny_cache)!r}, "data", prepare.VAL_FILENAME)]
        read = 0
        for path in candidates:
            try:
                with open(path, "rb") as f:
                    read += len(f.read())
            except OSError as e:
                print("REFUSED", type(e).__name__, path)
        try:
            prepare.split_paths("val")
        except FileNotFoundError:
            print("NO VAL SPLIT")
        if read:
            print("READ THE VALIDATION SHARD", read)
        raise SystemExit(3)
    """)
    record = wait_for(client, submit(client, new_tag(client), snoop, "val snoop"))
    log = stored_log(client, record["id"])
    assert record["status"] == "crash"
    assert "TRAIN SHARDS" in log and "TOKENIZER 8192" in log  # the view holds what training needs
    assert "NO VAL SPLIT" in log
    assert "READ THE VALIDATION SHARD" not in log
    assert log.count("REFUSED") == 2
    if os.geteuid() == 0:
        assert "REFUSED PermissionError" in log  # the real cache's shard, by its absolute path
    view = Path(sandbox.cache_view(tiny_cache, sandboxed["settings"].sandbox_dir))
    assert not list(view.rglob("shard_06542*")) and "val" not in (view / "manifest.json").read_text()


def test_train_py_that_overstays_its_budget_is_killed_on_the_workers_clock(sandboxed):
    client, settings = sandboxed["client"], sandboxed["settings"]
    deadline = PROFILES["tiny"]["TIME_BUDGET"] + PROFILES["tiny"]["STARTUP_ALLOWANCE"]
    assert settings.run_deadline_s("tiny") == deadline < KILL_TIMEOUT_S
    sleeper = 'import time\nprint("step 1 | progress 1.0% | loss 5.0", flush=True)\ntime.sleep(3600)\n'
    record = wait_for(client, submit(client, new_tag(client), sleeper, "overstays"), timeout_s=deadline + 60)
    assert record["status"] == "timeout"
    assert f"time limit of {deadline:g} s" in record["error"]
    run = record["runs"][-1]
    ran_s = (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["claimed_at"])).total_seconds()
    assert deadline <= ran_s < deadline + 30  # the deadline plus the kill's grace, far below KILL_TIMEOUT


def test_the_unchanged_train_py_trains_in_the_sandbox(sandboxed):
    client, settings = sandboxed["client"], sandboxed["settings"]
    record = wait_for(client, submit(client, new_tag(client), TRAIN_PY, "baseline"))
    assert record["status"] == "keep", record["error"]
    assert math.isfinite(record["val_bpb"]) and record["val_bpb"] > 0  # scored by the worker
    log = run_log_file(settings, record)
    assert "num_steps:" in log and record["num_steps"] > 0
    assert "val_bpb:" not in log  # the child has no validation split to print a number from


def test_the_allow_list_keeps_what_a_gpu_run_needs_and_drops_the_rest():
    worker = {"PATH": "/usr/bin", "LC_ALL": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "3", "NVIDIA_VISIBLE_DEVICES": "all",
              "LD_LIBRARY_PATH": "/usr/local/cuda/lib64", "TORCHINDUCTOR_CACHE_DIR": "/c", "TRITON_CACHE_DIR": "/t",
              "OMP_NUM_THREADS": "4", "DATABASE_URL": "postgresql://u:p@h/d", "CELERY_BROKER_URL": "redis://h",
              "API_TOKEN": "t", "NVIDIA_API_KEY": "k", "CUDA_TOKEN_URL": "x", "AUTORESEARCH_STATE": "/s",
              "PYTHONPATH": "/elsewhere"}
    assert allowed_environment(worker) == {
        "PATH": "/usr/bin", "LC_ALL": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "3", "NVIDIA_VISIBLE_DEVICES": "all",
        "LD_LIBRARY_PATH": "/usr/local/cuda/lib64", "TORCHINDUCTOR_CACHE_DIR": "/c", "TRITON_CACHE_DIR": "/t",
        "OMP_NUM_THREADS": "4"}
