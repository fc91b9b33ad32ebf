"""Which run a worker stages, and its hand-over, against real Postgres (lifecycle.stage_next,
take_staged; the processes are tests/test_staged_start.py's)."""

from __future__ import annotations

import pytest
from conftest_data import registration
from sqlalchemy import select, update

from app.db import transaction
from app.models import RUNNING, TRAINING, WORKER_GPU, Experiment, Gpu, Run
from app.services import experiments as exp_svc
from app.services import lifecycle, pool, runs

TAG = "staging"
HOLDS = "import prepare\nloader = prepare.make_dataloader(None, 1, 1, 'train')\n"
FEEDS_ITSELF = "print('step 0 | progress 1.0% | loss 3.0')\n"
HOLDER = lifecycle.Holder(gpu_id="staging-gpu0", token="incarnation", gpu_index=0, gpu_model="cpu", host="h",
                          fingerprint={"setup": "cpu"})
QUEUES = lifecycle.worker_queues(HOLDER.gpu_id)


@pytest.fixture
def queued(db):
    """A run whose train.py feeds itself, then one that takes batches from prepare's loader, both on
    the shared queue; the worker registered, and a second worker that is idle."""
    with transaction(db) as session:
        exp_svc.setup_tag(session, name=TAG, profile="tiny")
        for gpu_id in (HOLDER.gpu_id, "staging-gpu1"):
            pool.register_gpu(session, gpu_id=gpu_id, gpu_index=0, gpu_name="cpu", vram_mb=0.0, kind=WORKER_GPU)
        ids = []
        for source in (FEEDS_ITSELF, HOLDS):
            experiment, dispatches = runs.submit(session, policy=lifecycle.Policy(), acknowledge_crashes=False,
                                                 gpu_index=None, train_py=source, **registration(TAG))
            ids.append(dispatches[0].run_id)
    return ids


def stage(db):
    with transaction(db) as session:
        return lifecycle.stage_next(session, holder=HOLDER, lease_s=60.0, queues=QUEUES)


def test_a_shared_run_waits_for_an_idle_worker_instead_of_being_staged(db, queued):
    assert stage(db) is None


def test_the_oldest_run_that_can_hold_is_staged_and_its_message_comes_back_to_this_worker(db, queued):
    feeds_itself, holds = queued
    with transaction(db) as session:
        session.execute(update(Gpu).where(Gpu.id == "staging-gpu1").values(status=TRAINING))
    claim, dispatch = stage(db)
    assert claim.run_id == holds and claim.train_py == HOLDS
    assert dispatch.queue == lifecycle.gpu_queue(HOLDER.gpu_id)
    with transaction(db) as session:
        run = session.get(Run, holds)
        assert (run.status, run.lease_token, run.gpu_granted_at, run.queue) == (RUNNING, HOLDER.token, None, "train")
        assert run.task_id == dispatch.task_id
        assert session.get(Gpu, HOLDER.gpu_id).current_run_id is None  # the GPU still shows the run ahead
        # The one that feeds itself stays for its turn.
        assert session.scalar(select(Run.status).where(Run.id == feeds_itself)) == "queued"
    assert stage(db) is None  # nothing else can hold

    with transaction(db) as session:
        taken = lifecycle.take_staged(session, run_id=holds, holder=HOLDER, staging={"held": True})
    assert taken is not None and taken.run_id == holds
    with transaction(db) as session:
        run = session.get(Run, holds)
        assert run.gpu_granted_at is not None and run.staging == {"held": True}
        assert session.get(Gpu, HOLDER.gpu_id).current_run_id == holds
        # Another incarnation, or a second message, takes nothing.
        other = lifecycle.Holder(gpu_id=HOLDER.gpu_id, token="later", fingerprint=HOLDER.fingerprint)
        assert lifecycle.take_staged(session, run_id=holds, holder=other, staging=None) is None
        assert lifecycle.take_staged(session, run_id=holds, holder=HOLDER, staging=None) is None


def test_a_staged_run_whose_message_was_lost_gets_one_on_its_workers_queue(db, queued):
    _, holds = queued
    with transaction(db) as session:
        session.execute(update(Gpu).where(Gpu.id == "staging-gpu1").values(status=TRAINING))
    stage(db)
    with transaction(db) as session:
        resent = runs.redispatch_lost_messages(session, present_task_ids=set(), min_age_s=0.0)
    assert [(d.run_id, d.queue) for d in resent if d.run_id == holds] == [(holds, lifecycle.gpu_queue(HOLDER.gpu_id))]


def test_a_staged_run_goes_back_to_its_queue_once_another_worker_is_idle(db, queued):
    _, holds = queued
    with transaction(db) as session:
        session.execute(update(Gpu).where(Gpu.id == "staging-gpu1").values(status=TRAINING))
    claim, _ = stage(db)
    with transaction(db) as session:
        assert lifecycle.unstage_for_idle(session, run_id=holds, holder=HOLDER) is None  # the other one is busy
        session.execute(update(Gpu).where(Gpu.id == "staging-gpu1").values(status="idle"))
    with transaction(db) as session:
        given_back = lifecycle.unstage_for_idle(session, run_id=holds, holder=HOLDER)
    assert (given_back.run_id, given_back.queue) == (holds, "train")
    with transaction(db) as session:
        run = session.get(Run, holds)
        assert (run.status, run.lease_token, run.claimed_at, run.task_id) == ("queued", None, None, given_back.task_id)
        assert session.get(Experiment, claim.experiment_id).status == "queued"
        # Taken by the idle worker as any queued run; the worker that staged it holds nothing.
        other = lifecycle.Holder(gpu_id="staging-gpu1", token="other", fingerprint=HOLDER.fingerprint)
        assert lifecycle.claim(session, run_id=holds, holder=other, lease_s=60.0) is not None
        assert lifecycle.take_staged(session, run_id=holds, holder=HOLDER, staging=None) is None
