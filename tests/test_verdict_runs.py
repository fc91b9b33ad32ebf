"""Verdicts from runs, end to end: baseline replicates measure the noise floor, a promising but
unclear candidate gets confirmation runs with seeds of its own and ends with one verdict,
`VERDICT_POLICY=single` decides as the seed did, and the migration carries an old database over.

Real Postgres, Redis and CPU Celery workers. The training script is a stand-in whose val_bpb
is scripted per run (a counter file per experiment), so each verdict is known in advance."""

from __future__ import annotations

import dataclasses
import textwrap
import uuid

import pytest
import redis
from conftest_data import registration
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from test_workers import pool_entry, wait_for, wait_until, writable_by_train_py

from app.config import load_settings
from app.stack import Stack
from app.web import create_app


def scripted(values: list[float]) -> str:
    """A train.py whose n-th run prints values[n] (the last one again after that) and its seed."""
    folder = writable_by_train_py()
    return textwrap.dedent(f"""
        import fcntl, os
        with open(os.path.join({str(folder)!r}, "count"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            n = len(f.read())
            f.write("x")
        values = {values!r}
        print("step 1 | progress 100.0% | loss 3.0 | tok/s 1000 | remaining 0s")
        print("---")
        print("profile: tiny")
        print(f"val_bpb: {{values[min(n, len(values) - 1)]}}")
        print(f"seed: {{os.environ['AUTORESEARCH_SEED']}}")
        print("training_seconds: 1.0")
    """)


@pytest.fixture
def pool(database_url, redis_url, tiny_cache, tmp_path, db):
    """Two CPU workers with BASELINE_RUNS=3 and the given verdict policy."""

    def start(policy: str):
        settings = dataclasses.replace(
            load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
            external_database=True, external_broker=True, state_dir=tmp_path / "state", cache_dir=tiny_cache,
            default_profile="tiny", heartbeat_interval=1.0, stale_after=5.0, baseline_runs=3, verdict_policy=policy,
            trusted_scoring=False,  # the scripted val_bpb is the point here: the printed number stands
        )
        redis.Redis.from_url(redis_url).flushdb()
        stack = Stack(settings, tmp_path / "logs")
        suffix = uuid.uuid4().hex[:6]
        ids = [f"verdict{i}-{suffix}" for i in (0, 1)]
        for index, gpu_id in enumerate(ids):
            stack.start_gpu_worker(index, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
        client = create_app(settings).test_client()
        started.append(stack)
        wait_until(lambda: all(pool_entry(client, g) for g in ids), 60, "workers to register")
        return client

    started: list[Stack] = []
    yield start
    for stack in started:
        stack.stop_all()


def new_tag(client) -> str:
    tag = f"v{uuid.uuid4().hex[:10]}"
    assert client.post("/api/experiment/setup", json={"tag": tag, "profile": "tiny"}).status_code == 200
    return tag


def submit(client, tag: str, source: str) -> str:
    response = client.post("/api/experiment/submit", json=registration(tag, train_py=source))
    assert response.status_code == 200, response.get_json()
    return response.get_json()["experiment_id"]


def test_baseline_replicates_then_a_confirmed_candidate_ends_with_one_verdict(pool):
    client = pool("sequential")
    tag = new_tag(client)
    baseline = wait_for(client, submit(client, tag, scripted([1.500, 1.501, 1.502])))
    assert baseline["status"] == "keep"
    assert [r["purpose"] for r in baseline["runs"]] == ["baseline"] * 3
    assert baseline["run_count"] == 3 and baseline["val_bpb"] == pytest.approx(1.501)

    noise = client.post("/api/report/summary", json={"tag": tag}).get_json()["noise"]
    assert noise["runs"] == 3 and noise["sigma"] == pytest.approx(0.001)
    assert noise["by_gpu_model"]["cpu"]["sigma"] == pytest.approx(0.001)

    # Half a sigma better: promising, not clear. The sequential test runs it again until it is.
    candidate = wait_for(client, submit(client, tag, scripted([1.5005])))
    assert candidate["status"] == "keep", candidate
    runs = candidate["runs"]
    assert [r["purpose"] for r in runs] == ["first", "confirm", "confirm"]
    assert all(r["status"] == "finished" for r in runs)
    assert len({r["seed"] for r in runs}) == 3
    assert 0 < candidate["z"] < 2 and candidate["sigma"] == pytest.approx(noise_after(client, tag))
    assert candidate["run_count"] == 3 and candidate["val_bpb"] == pytest.approx(1.5005)
    # The run trained with the seed the server chose for it (the log shown is the newest run's).
    assert f"seed: {runs[-1]['seed']}" in client.get(f"/api/experiment/{candidate['id']}/log").get_json()["log"]

    # A clearly worse one is dropped after its first run: no confirmation spent on it.
    worse = wait_for(client, submit(client, tag, scripted([1.510])))
    assert worse["status"] == "discard" and worse["run_count"] == 1 and worse["z"] < 0
    summary = client.post("/api/report/summary", json={"tag": tag}).get_json()
    assert summary["best"]["experiment_id"] == candidate["id"]
    assert summary["stats"]["total"] == 3 and summary["stats"]["kept"] == 2


def noise_after(client, tag: str) -> float:
    return client.post("/api/report/summary", json={"tag": tag}).get_json()["noise"]["sigma"]


def test_single_policy_decides_as_the_seed_did(pool):
    """One run each, strict less-than against the best's one run, the first always kept."""
    client = pool("single")
    tag = new_tag(client)
    values = [1.50, 1.49, 1.49, 1.495, 1.48]
    expected = ["keep", "keep", "discard", "discard", "keep"]
    decided = []
    for value in values:
        record = wait_for(client, submit(client, tag, scripted([value])))
        assert record["run_count"] == 1 and [r["purpose"] for r in record["runs"]] == ["first"]
        decided.append(record["status"])
    assert decided == expected
    best = client.post("/api/experiment/best", json={"tag": tag}).get_json()["best"]
    assert best["val_bpb"] == 1.48


def test_migration_carries_a_database_of_the_old_schema_over(service_urls):
    """A database made by revision 0001 with data in every status is upgraded to the newest
    schema: one run per old experiment, the running one's lease already expired."""
    from alembic import command
    from alembic.config import Config

    from app.config import PROJECT_ROOT
    from app.db import transaction
    from app.models import Run
    from app.services import experiments as exp_svc

    server = make_url(service_urls[0])
    name = f"autoresearch_migrate_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    try:
        command.upgrade(config, "0001")
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tags VALUES ('old', 'autoresearch/old', 'tiny', now(), 1.4, 'e-keep', "
                              "3, 1, 1, 1, 1)"))
            for eid, status, train_py, attempts, val_bpb in [
                ("e-keep", "keep", "print(1)", 1, 1.4), ("e-discard", "discard", None, 0, 1.5),
                ("e-crash", "crash", "print(1)", 2, None), ("e-running", "running", "print(1)", 1, None),
                ("e-queued", "queued", "print(1)", 0, None),
            ]:
                conn.execute(text(
                    "INSERT INTO experiments (id, tag, commit_sha, train_py, description, hypothesis, category, "
                    "diff_summary, status, val_bpb, near_miss, gpu_id, task_id, cancel_requested, attempts, "
                    "created_at, started_at) VALUES (:id, 'old', 'abc1234', :train_py, 'd', 'h', 'other', '', "
                    ":status, :val_bpb, false, 'gpu0@old', :task, false, :attempts, now(), now())"),
                    {"id": eid, "status": status, "train_py": train_py, "attempts": attempts, "val_bpb": val_bpb,
                     "task": f"task-{eid}"})
        engine.dispose()

        command.upgrade(config, "head")
        with transaction(url) as session:
            runs = {r.experiment_id: r for r in session.query(Run)}
            assert set(runs) == {"e-keep", "e-discard", "e-crash", "e-running", "e-queued"}
            assert {eid: r.status for eid, r in runs.items()} == {
                "e-keep": "finished", "e-discard": "finished", "e-crash": "crash", "e-running": "running",
                "e-queued": "queued"}
            # An old message names the experiment: the run that replaced it has the same id.
            assert runs["e-queued"].id == "e-queued" and runs["e-queued"].task_id == "task-e-queued"
            assert runs["e-queued"].attempt == 1 and runs["e-crash"].attempt == 2
            assert runs["e-discard"].scored_by == "agent" and runs["e-keep"].scored_by == "worker"
            assert runs["e-running"].lease_expires_at is not None and runs["e-running"].lease_holder == "gpu0@old"
            assert runs["e-keep"].val_bpb == 1.4
            record = exp_svc.experiment_public(exp_svc.get_experiment(session, "e-keep"))
            assert record["run_count"] == 1 and record["gpu_id"] == "gpu0@old"
            assert exp_svc.get_experiment(session, "e-keep").dispatched
        command.downgrade(config, "0001")
        command.upgrade(config, "head")
    finally:
        from app.db import forget_engines

        forget_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
