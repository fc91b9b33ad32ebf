"""Dispatch: submitting experiments for the workers, pinning to one GPU, and the sweep's
repairs (expired leases, messages the broker lost). State changes go through lifecycle."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.models import OFFLINE, QUEUED, RUNNING, WORKER_GPU, Experiment, Gpu, Run
from app.services import experiments as exp_svc
from app.services import lifecycle
from app.services.lifecycle import Dispatch, Policy


def resolve_pin(session: Session, *, gpu_id: str | None, gpu_index: int | None) -> str | None:
    """The pool id of the one GPU a submission is pinned to. An index alone is ambiguous on a
    multi-host pool (GPU 0 of every machine): it pins only when exactly one live GPU has it."""
    if gpu_id is None and gpu_index is None:
        return None
    live = select(Gpu.id).where(Gpu.kind == WORKER_GPU, Gpu.status != OFFLINE)
    if gpu_id is not None:
        if session.scalar(live.where(Gpu.id == gpu_id)) is None:
            raise Conflict(f"GPU {gpu_id} is offline or not in the pool; submit without it or start its worker",
                           fields={"gpu_id": gpu_id})
        return gpu_id
    matches = list(session.scalars(live.where(Gpu.gpu_index == gpu_index)))
    if not matches:
        raise Conflict(f"GPU {gpu_index} is offline or not registered; submit without gpu_index or start its worker",
                       fields={"gpu_index": gpu_index})
    if len(matches) > 1:
        raise Conflict(f"gpu_index {gpu_index} names {len(matches)} GPUs ({', '.join(matches)}); pin with gpu_id",
                       fields={"gpu_index": gpu_index})
    return matches[0]


def submit(session: Session, *, policy: Policy, acknowledge_crashes: bool, gpu_index: int | None,
           gpu_id: str | None = None, train_py: str, **fields) -> tuple[Experiment, list[Dispatch]]:
    tag = exp_svc.get_tag(session, fields["tag"], lock=True)
    lifecycle.check_submittable(tag, policy, acknowledge_crashes)
    pinned = resolve_pin(session, gpu_id=gpu_id, gpu_index=gpu_index)
    lifecycle.check_source(train_py)
    first_of_tag = not session.scalar(select(func.count()).select_from(Experiment).where(Experiment.tag == tag.name))
    experiment = exp_svc.new_experiment(session, train_py=train_py, status=QUEUED, dispatched=True,
                                        pinned_gpu_id=pinned, pinned_gpu=gpu_index, **fields)
    return experiment, lifecycle.queue_experiment(session, experiment, first_of_tag=first_of_tag, policy=policy)


def sweep_leases(session: Session, *, policy: Policy) -> list[Dispatch]:
    """Runs whose lease ran out are queued again, failed or cancelled (lifecycle.lose_run).
    Then silent GPUs go offline: GPU rows come last in the lock order."""
    from app.services.pool import mark_stale_offline

    dispatches = [d for outcome in lifecycle.expire_leases(session, policy=policy) for d in outcome.dispatches]
    mark_stale_offline(session, stale_after=policy.lease_s)
    return dispatches


def redispatch_lost_messages(session: Session, *, present_task_ids: set[str], min_age_s: float) -> list[Dispatch]:
    """Queued runs, and staged runs waiting for their GPU (lifecycle.stage_next), whose message
    the broker no longer holds (a Redis restart without persistence, a flushed queue) get a
    fresh message. Only those queued or staged for `min_age_s`, so a message on its way is never
    mistaken for a lost one."""
    since = func.now() - timedelta(seconds=min_age_s)
    queued = session.execute(
        select(Run.id, Run.task_id)
        .where(or_(and_(Run.status == QUEUED, Run.queued_at < since),
                   and_(Run.status == RUNNING, Run.lease_token.is_not(None), Run.gpu_granted_at.is_(None),
                        Run.claimed_at < since)))
        .with_for_update(skip_locked=True)
    ).all()
    dispatches = [lifecycle.resend(session, run.id) for run in queued if run.task_id not in present_task_ids]
    return [d for d in dispatches if d is not None]


def log_of(run: Run | None, *, max_bytes: int) -> dict:
    """The stored tail of a run's training log: the worker keeps it in the run's row while it
    trains and when it ends, so it reads the same for a worker on any machine."""
    text = (run.log_tail or "") if run is not None else ""
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        data = data[-max_bytes:]
        newline = data.find(b"\n")
        if 0 <= newline < len(data) - 1:
            data = data[newline + 1:]
    return {"log": data.decode("utf-8", errors="replace"), "log_path": run.log_path if run else None,
            "run_id": run.id if run else None}
