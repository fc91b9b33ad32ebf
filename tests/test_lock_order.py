"""The lifecycle's lock order (tag, experiment, runs, GPU rows) against real Postgres.

Each test holds, in a second connection, the locks a concurrent lifecycle call takes first
(the tag and experiment rows), starts the call under test in a thread, and then touches the run
row as that concurrent call would next. Taken out of order, the two transactions deadlock and
Postgres aborts one of them within its deadlock_timeout; taken in order, the call under test
waits for the tag and then finds the run already changed.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest_data import registration
from sqlalchemy import create_engine, select, text

from app.db import transaction
from app.models import QUEUED, RUNNING, WORKER_GPU, Run
from app.services import experiments as exp_svc
from app.services import lifecycle, pool, runs

TAG = "locks"
TRAIN_PY = "print('val_bpb: 1.0')\n"


@pytest.fixture
def queued_run(db):
    with transaction(db) as session:
        exp_svc.setup_tag(session, name=TAG, profile="tiny")
        experiment, dispatches = runs.submit(session, policy=lifecycle.Policy(), acknowledge_crashes=False,
                                             gpu_index=None, train_py=TRAIN_PY, **registration(TAG))
    return experiment.id, dispatches[0].run_id


def holding_tag_and_experiment(database_url: str, experiment_id: str):
    """A connection in a transaction that has locked the tag and the experiment, as
    request_cancel, finish_run and lose_run do first."""
    connection = create_engine(database_url).connect()
    transaction_ = connection.begin()
    connection.execute(text("SELECT 1 FROM tags WHERE name = :tag FOR UPDATE"), {"tag": TAG})
    connection.execute(text("SELECT 1 FROM experiments WHERE id = :id FOR UPDATE"), {"id": experiment_id})
    return connection, transaction_


def in_thread(call):
    """Run `call` in a thread; returns the thread and a dict that gets its result or error."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = call()
        except Exception as exc:  # the deadlock, should it happen, is what the test reports
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    time.sleep(0.5)  # long enough for the call to reach the lock it waits for
    return thread, outcome


def test_sweep_waits_for_the_tag_before_it_locks_an_expired_run(db, queued_run):
    experiment_id, run_id = queued_run
    with transaction(db) as session:
        session.execute(text("UPDATE runs SET status = :running, lease_holder = 'gone', lease_token = 't', "
                             "lease_expires_at = now() - interval '10 seconds' WHERE id = :id"),
                        {"running": RUNNING, "id": run_id})
    connection, held = holding_tag_and_experiment(db, experiment_id)
    try:
        def sweep():
            with transaction(db) as session:
                return runs.sweep_leases(session, policy=lifecycle.Policy(lease_s=0.0))

        thread, outcome = in_thread(sweep)
        # The worker renews the lease in time, under the locks it took first.
        connection.execute(text("UPDATE runs SET lease_expires_at = now() + interval '60 seconds' WHERE id = :id"),
                           {"id": run_id})
        held.commit()
    finally:
        connection.close()
    thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"] == []
    with transaction(db) as session:
        assert session.scalar(select(Run.status).where(Run.id == run_id)) == RUNNING


def test_claim_waits_for_the_tag_before_it_locks_the_run(db, queued_run):
    experiment_id, run_id = queued_run
    holder = lifecycle.Holder(gpu_id="locks-gpu", token="incarnation", gpu_index=0, gpu_model="cpu", host="h",
                              fingerprint={"setup": "cpu"})
    with transaction(db) as session:
        pool.register_gpu(session, gpu_id=holder.gpu_id, gpu_index=0, gpu_name="cpu", vram_mb=0.0,
                          kind=WORKER_GPU)
        # Pinned already, as after the tag's first claim: claim's pinning statement locks nothing.
        session.execute(text("UPDATE tags SET fingerprint = CAST(:pin AS json) WHERE name = :tag"),
                        {"pin": json.dumps(holder.fingerprint), "tag": TAG})
    connection, held = holding_tag_and_experiment(db, experiment_id)
    try:
        def claim():
            with transaction(db) as session:
                return lifecycle.claim(session, run_id=run_id, holder=holder, lease_s=60.0)

        thread, outcome = in_thread(claim)
        # A cancel ends the queued run under the locks it took first.
        connection.execute(text("UPDATE runs SET status = 'cancelled' WHERE id = :id AND status = :queued"),
                           {"id": run_id, "queued": QUEUED})
        held.commit()
    finally:
        connection.close()
    thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"] is None
