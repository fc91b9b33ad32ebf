"""The dispatched lifecycle: queue, claim, progress, cancel, and recovery of runs whose
worker went silent. Keep/discard and crashes go through app.services.experiments."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput
from app.models import CRASH, OFFLINE, QUEUED, RUNNING, Experiment, Gpu
from app.services import experiments as exp_svc

# A run whose worker died is queued again this many times in all, then recorded as a crash:
# a train.py that takes its worker down with it must not take down every worker in turn.
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Dispatch:
    """A message to send once the transaction that made it has committed."""

    experiment_id: str
    task_id: str
    queue: str


def queue_for(gpu_index: int | None) -> str:
    return "train" if gpu_index is None else f"gpu.{gpu_index}"


def check_pinnable(session: Session, gpu_index: int) -> None:
    online = session.scalar(
        select(func.count()).select_from(Gpu).where(Gpu.gpu_index == gpu_index, Gpu.status != OFFLINE)
    )
    if not online:
        raise Conflict(f"GPU {gpu_index} is offline or not registered; submit without gpu_index or start its worker",
                       fields={"gpu_index": gpu_index})


def submit(session: Session, *, rules: exp_svc.Rules, acknowledge_crashes: bool, gpu_index: int | None,
           train_py: str, **fields) -> tuple[exp_svc.Experiment, Dispatch]:
    tag = exp_svc.get_tag(session, fields["tag"], lock=True)
    if acknowledge_crashes:
        tag.consecutive_crashes = 0
    if exp_svc.crash_limit_reached(tag, rules):
        raise Conflict(
            f"tag '{tag.name}' hit {tag.consecutive_crashes} consecutive crashes; fix train.py, then submit "
            "with \"acknowledge_crashes\": true",
            fields={"tag": tag.name}, consecutive_crashes=tag.consecutive_crashes,
        )
    if gpu_index is not None:
        check_pinnable(session, gpu_index)
    if not train_py.strip():
        raise InvalidInput("train_py is empty", fields={"train_py": ""})
    experiment = exp_svc.register(session, train_py=train_py, status=QUEUED, pinned_gpu=gpu_index, **fields)
    experiment.task_id = str(uuid.uuid4())
    session.flush()
    return experiment, Dispatch(experiment.id, experiment.task_id, queue_for(gpu_index))


@dataclass(frozen=True)
class Claim:
    experiment_id: str
    attempt: int
    tag: str
    profile: str
    train_py: str


def claim(session: Session, *, experiment_id: str, gpu_id: str, gpu_index: int) -> Claim | None:
    """Take a queued experiment for this worker. A conditional update, so a redelivered or
    duplicate message finds nothing to take and never runs the experiment a second time."""
    row = session.execute(
        text(
            """
            UPDATE experiments e SET status = :running, started_at = now(), gpu_id = :gpu_id,
                   gpu_index = :gpu_index, attempts = e.attempts + 1, progress = NULL, error = NULL
            FROM tags t
            WHERE e.id = :id AND e.status = :queued AND NOT e.cancel_requested AND t.name = e.tag
            RETURNING e.id, e.attempts, e.tag, t.profile, e.train_py
            """
        ),
        {"running": RUNNING, "queued": QUEUED, "gpu_id": gpu_id, "gpu_index": gpu_index, "id": experiment_id},
    ).one_or_none()
    if row is None:
        return None
    return Claim(row.id, row.attempts, row.tag, row.profile, row.train_py)


def set_log_path(session: Session, *, experiment_id: str, log_path: str) -> None:
    session.execute(update(Experiment).where(Experiment.id == experiment_id).values(log_path=log_path))


def record_progress(session: Session, *, experiment_id: str, attempt: int, progress: dict) -> bool:
    """Store live progress; returns whether a cancel was requested meanwhile."""
    row = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.attempts == attempt, Experiment.status == RUNNING)
        .values(progress=progress)
        .returning(Experiment.cancel_requested)
    ).one_or_none()
    return bool(row and row.cancel_requested)


def cancel_requested(session: Session, *, experiment_id: str) -> bool:
    return bool(session.scalar(select(Experiment.cancel_requested).where(Experiment.id == experiment_id)))


def request_cancel(session: Session, *, experiment_id: str) -> Experiment:
    """Queued: cancelled at once (its message finds nothing to claim). Running: flagged; the
    worker kills the process group within a poll and records the cancellation."""
    experiment = exp_svc.get_experiment(session, experiment_id, lock=True)
    exp_svc.check_open(experiment)
    experiment.cancel_requested = True
    if experiment.status == QUEUED:
        exp_svc.mark_cancelled(session, experiment_id=experiment_id, reason="cancelled while queued")
    session.flush()
    return experiment


def requeue_or_fail(session: Session, *, experiment_id: str, attempt: int, rules: exp_svc.Rules,
                    reason: str) -> Dispatch | None:
    """A run lost with its worker: queue it again with a fresh message (a redelivered old one
    finds nothing to claim), or after MAX_ATTEMPTS record it as a crash. Conditional on the
    attempt seen, so a run that finished or was requeued meanwhile is left alone."""
    session.execute(update(Gpu).where(Gpu.current_experiment_id == experiment_id).values(current_experiment_id=None))
    if attempt >= MAX_ATTEMPTS:
        try:
            exp_svc.record_failure(session, experiment_id=experiment_id, rules=rules, status=CRASH, attempt=attempt,
                                   error=f"{reason}; lost {attempt} times, not retried")
        except Conflict:
            pass  # finished meanwhile
        return None
    task_id = str(uuid.uuid4())
    requeued = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status == RUNNING, Experiment.attempts == attempt)
        .values(status=QUEUED, task_id=task_id, progress=None, error=f"requeued after attempt {attempt}: {reason}")
        .returning(Experiment.pinned_gpu)
    ).one_or_none()
    return Dispatch(experiment_id, task_id, queue_for(requeued.pinned_gpu)) if requeued else None


def recover_lost_runs(session: Session, *, stale_after: float, rules: exp_svc.Rules) -> list[Dispatch]:
    """The sweep: GPUs silent for `stale_after` go offline, and each run they held is requeued
    or failed (requeue_or_fail). Runs whose GPU left the pool are treated the same."""
    from app.services.pool import mark_stale_offline

    mark_stale_offline(session, stale_after=stale_after)
    live_gpus = select(Gpu.id).where(Gpu.status != OFFLINE)
    lost = session.execute(
        select(Experiment.id, Experiment.attempts, Experiment.gpu_id).where(
            Experiment.status == RUNNING, Experiment.gpu_id.is_not(None), Experiment.gpu_id.not_in(live_gpus)
        )
    ).all()
    dispatches = [
        requeue_or_fail(session, experiment_id=run.id, attempt=run.attempts, rules=rules,
                        reason=f"worker {run.gpu_id} went silent")
        for run in lost
    ]
    return [d for d in dispatches if d is not None]


def redispatch_lost_messages(session: Session, *, present_task_ids: set[str], min_age_s: float) -> list[Dispatch]:
    """Queued experiments whose message the broker no longer holds (a Redis restart without
    persistence, a flushed queue) get a fresh message. Only those queued for `min_age_s`, so a
    message on its way from submit is never mistaken for a lost one; a duplicate would be
    harmless anyway, since only one message can claim the run."""
    queued = session.execute(
        select(Experiment.id, Experiment.task_id, Experiment.pinned_gpu)
        .where(Experiment.status == QUEUED, Experiment.created_at < func.now() - timedelta(seconds=min_age_s))
        .with_for_update(skip_locked=True)
    ).all()
    dispatches = []
    for run in queued:
        if run.task_id in present_task_ids:
            continue
        task_id = str(uuid.uuid4())
        session.execute(update(Experiment).where(Experiment.id == run.id).values(task_id=task_id))
        dispatches.append(Dispatch(run.id, task_id, queue_for(run.pinned_gpu)))
    return dispatches
