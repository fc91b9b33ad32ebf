"""Postgres goes away in the middle of a run: the run goes on, and its result is recorded once
the database is back (embedded Postgres of our own, so the machine's server is left alone)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import redis
from conftest_data import registration
from test_workers import pool_entry, submit, summary_script, wait_for, wait_until

from app import embedded
from app.config import load_settings
from app.db import forget_engines
from app.migrate import upgrade
from app.stack import Stack
from app.web import create_app


def one_worker(state: Path, database_url: str, broker_url: str, cache: Path, name: str):
    """A CPU worker against these servers, registered and idle; the API as a test client."""
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=broker_url, result_backend=broker_url,
        external_database=True, external_broker=True, state_dir=state / "state", cache_dir=cache,
        default_profile="tiny", kill_timeout=120, heartbeat_interval=1.0,
        trusted_scoring=False,  # stand-in train.py files: their printed number stands
    )
    gpu_id = f"{name}-{uuid.uuid4().hex[:6]}"
    stack = Stack(settings, state / "logs")
    stack.start_gpu_worker(0, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
    client = create_app(settings).test_client()
    try:
        wait_until(lambda: (pool_entry(client, gpu_id) or {}).get("status") == "idle", 60, "the worker")
    except BaseException:
        stack.stop_all()
        raise
    return stack, client, gpu_id


def test_result_survives_a_postgres_restart_mid_run(redis_url, tiny_cache):
    state = Path(tempfile.mkdtemp(prefix="ar-resilience-"))
    port = embedded.free_port()
    database_url, stop_postgres = embedded.start_postgres(state, port)
    upgrade(database_url)
    redis.Redis.from_url(redis_url).flushdb()
    stack, client, gpu_id = one_worker(state, database_url, redis_url, tiny_cache, "resilient")
    try:
        client.post("/api/experiment/setup", json={"tag": "resilient", "profile": "tiny"})
        experiment_id = submit(client, "resilient", summary_script(sleep_s=6), "outlives a database restart")
        wait_until(lambda: client.get(f"/api/experiment/{experiment_id}").get_json()["status"] == "running", 30,
                   "the run to start")

        stop_postgres()
        forget_engines()
        time.sleep(9)  # the run finishes while the database is down; the worker keeps retrying
        database_url_again, stop_postgres = embedded.start_postgres(state, port)
        assert database_url_again == database_url

        record = wait_for(client, experiment_id, timeout_s=90)
        assert record["status"] == "keep" and record["val_bpb"] == 1.5
        assert record["gpu_id"] == gpu_id
        assert client.post("/api/report/summary", json={"tag": "resilient"}).get_json()["stats"]["total"] == 1
    finally:
        stack.stop_all()
        forget_engines()
        stop_postgres()
        shutil.rmtree(state, ignore_errors=True)


def test_submit_with_the_broker_down_is_a_503_and_leaves_no_queued_row(settings, db):
    dead = f"redis://127.0.0.1:{embedded.free_port()}/0"
    client = create_app(dataclasses.replace(settings, broker_url=dead, result_backend=dead)).test_client()
    client.post("/api/experiment/setup", json={"tag": "nobroker", "profile": "tiny"})
    response = client.post("/api/experiment/submit", json=registration("nobroker", train_py=summary_script()))
    assert response.status_code == 503 and "broker" in response.get_json()["error"]
    experiment_id = response.get_json()["experiment_id"]
    assert client.get(f"/api/experiment/{experiment_id}").get_json()["status"] == "cancelled"


def test_no_gpu_is_judged_silent_right_after_a_postgres_restart():
    """Heartbeats cannot land while the database is down; after it comes back the workers get
    STALE_AFTER to beat again before the sweep may take their runs away."""
    from app.db import transaction
    from app.services import pool

    state = Path(tempfile.mkdtemp(prefix="ar-restart-"))
    port = embedded.free_port()
    database_url, stop_postgres = embedded.start_postgres(state, port)
    try:
        upgrade(database_url)
        with transaction(database_url) as session:
            pool.register_gpu(session, gpu_id="quiet", gpu_index=0, gpu_name="cpu", vram_mb=0.0)
        stop_postgres()
        forget_engines()
        time.sleep(4)
        database_url, stop_postgres = embedded.start_postgres(state, port)
        with transaction(database_url) as session:
            assert pool.mark_stale_offline(session, stale_after=3) == []
        time.sleep(3.5)
        with transaction(database_url) as session:
            assert [g.id for g in pool.mark_stale_offline(session, stale_after=3)] == ["quiet"]
    finally:
        forget_engines()
        stop_postgres()
        shutil.rmtree(state, ignore_errors=True)


def test_worker_reconnects_after_a_redis_restart_and_the_queue_survives(database_url, tiny_cache):
    """Embedded Redis (append-only) restarts with a message queued for a busy worker: the
    worker reconnects and the queued experiment still runs."""
    state = Path(tempfile.mkdtemp(prefix="ar-redis-restart-"))
    port = embedded.free_port()
    broker_url, stop_redis = embedded.start_redis(state, port)
    stack, client, gpu_id = one_worker(state, database_url, broker_url, tiny_cache, "reconnect")
    try:
        tag = f"redis{uuid.uuid4().hex[:6]}"
        client.post("/api/experiment/setup", json={"tag": tag, "profile": "tiny"})
        busy = submit(client, tag, summary_script(sleep_s=5), "keeps the worker busy")
        queued = submit(client, tag, summary_script(), "waits in the queue")
        wait_until(lambda: client.get(f"/api/experiment/{busy}").get_json()["status"] == "running", 30, "busy run")

        stop_redis()
        time.sleep(2)
        broker_url_again, stop_redis = embedded.start_redis(state, port)
        assert broker_url_again == broker_url

        assert wait_for(client, busy, timeout_s=90)["status"] == "keep"
        assert wait_for(client, queued, timeout_s=90)["status"] in ("keep", "discard")
    finally:
        stack.stop_all()
        stop_redis()
        shutil.rmtree(state, ignore_errors=True)
