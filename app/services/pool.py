"""The GPU pool: registration, heartbeats (database clock), manual-mode leases, the offline mark.

Two kinds of GPU share the pool and never one GPU: a `worker` GPU is registered by its Celery
worker and trains dispatched runs; a `manual` GPU is registered through the API by an agent
that trains itself, and only those can be leased with acquire. A GPU's status is what it is
doing for the dashboard; whether a run is alive is its lease (app.services.lifecycle)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import IDLE, MANUAL_GPU, OFFLINE, TRAINING, Gpu
from app.services.experiments import get_experiment


def gpu_public(gpu: Gpu) -> dict:
    return {
        "id": gpu.id,
        "name": f"gpu-{gpu.gpu_index}",
        "gpu_index": gpu.gpu_index,
        "host": gpu.host,
        "gpu_name": gpu.gpu_name,
        "vram_mb": gpu.vram_mb,
        "kind": gpu.kind,
        "status": gpu.status,
        "current_experiment_id": gpu.current_experiment_id,
        "current_run_id": gpu.current_run_id,
        "registered_at": gpu.registered_at.isoformat() if gpu.registered_at else None,
        "last_heartbeat": gpu.last_heartbeat.isoformat() if gpu.last_heartbeat else None,
        "telemetry": gpu.telemetry,
    }


def get_gpu(session: Session, gpu_id: str, *, lock: bool = False) -> Gpu:
    query = select(Gpu).where(Gpu.id == gpu_id)
    if lock:
        query = query.with_for_update()
    gpu = session.scalars(query).one_or_none()
    if gpu is None:
        raise NotFound("GPU worker not found", fields={"gpu_id": gpu_id})
    return gpu


def register_gpu(
    session: Session, *, gpu_id: str, gpu_index: int, gpu_name: str, vram_mb: float, host: str = "",
    telemetry: dict | None = None, kind: str = MANUAL_GPU,
) -> Gpu:
    """Insert or refresh a GPU's row; a restarted worker comes back idle."""
    # Insert-if-absent first, then lock: two simultaneous registrations of one new GPU must
    # both succeed, one after the other, rather than collide on the primary key.
    session.execute(
        pg_insert(Gpu).values(id=gpu_id, gpu_index=gpu_index).on_conflict_do_nothing(index_elements=[Gpu.id])
    )
    gpu = session.get(Gpu, gpu_id, with_for_update=True)
    gpu.gpu_index = gpu_index
    gpu.gpu_name = gpu_name
    gpu.vram_mb = vram_mb
    gpu.host = host
    gpu.kind = kind
    gpu.status = IDLE
    gpu.current_experiment_id = None
    gpu.current_run_id = None
    gpu.telemetry = telemetry
    gpu.last_heartbeat = func.now()
    session.flush()
    session.refresh(gpu)
    return gpu


def heartbeat(session: Session, *, gpu_id: str, telemetry: dict | None = None) -> Gpu:
    gpu = get_gpu(session, gpu_id, lock=True)
    gpu.last_heartbeat = func.now()
    if telemetry is not None:
        gpu.telemetry = telemetry
    if gpu.status == OFFLINE:
        gpu.status = TRAINING if gpu.current_experiment_id else IDLE
    session.flush()
    return gpu


def deregister(session: Session, *, gpu_id: str) -> None:
    session.delete(get_gpu(session, gpu_id, lock=True))
    session.flush()


def deregister_if_present(session: Session, *, gpu_id: str) -> None:
    session.execute(delete(Gpu).where(Gpu.id == gpu_id))


def mark_stale_offline(session: Session, *, stale_after: float) -> list[Gpu]:
    """GPUs silent for longer than `stale_after` seconds go offline; returns those that just did.

    Not within `stale_after` of a Postgres start: while the database was down no heartbeat could
    land, so every GPU looks silent; they get that long to beat again before any is judged.
    """
    cutoff = func.now() - timedelta(seconds=stale_after)
    rows = session.scalars(
        update(Gpu)
        .where(Gpu.status != OFFLINE, Gpu.last_heartbeat < cutoff, func.pg_postmaster_start_time() < cutoff)
        .values(status=OFFLINE)
        .returning(Gpu)
    )
    return list(rows)


def list_gpus(session: Session, *, stale_after: float) -> dict:
    mark_stale_offline(session, stale_after=stale_after)
    workers = [gpu_public(g) for g in session.scalars(select(Gpu).order_by(Gpu.host, Gpu.gpu_index, Gpu.id))]
    return {
        "workers": workers,
        "total": len(workers),
        "idle": sum(1 for w in workers if w["status"] == IDLE),
        "training": sum(1 for w in workers if w["status"] == TRAINING),
        "offline": sum(1 for w in workers if w["status"] == OFFLINE),
    }


def acquire(session: Session, *, experiment_id: str, stale_after: float) -> dict:
    """Lease one idle, live manual GPU to an experiment (worker GPUs are never leased here).

    SKIP LOCKED makes this atomic across API processes: two callers never lock the same row,
    and the loser moves on to the next idle GPU or gets none.
    """
    get_experiment(session, experiment_id)
    row = session.execute(
        text(
            """
            UPDATE gpus SET status = :training, current_experiment_id = :experiment_id
            WHERE id = (
                SELECT id FROM gpus
                WHERE status = :idle AND kind = :manual
                      AND last_heartbeat >= now() - make_interval(secs => :stale_after)
                ORDER BY gpu_index, id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id, gpu_index
            """
        ),
        {"training": TRAINING, "idle": IDLE, "manual": MANUAL_GPU, "experiment_id": experiment_id,
         "stale_after": stale_after},
    ).one_or_none()
    if row is None:
        return {"acquired": False, "gpu_id": None, "reason": "no idle GPUs"}
    return {"acquired": True, "gpu_id": row.id, "gpu_index": row.gpu_index}


def release(session: Session, *, gpu_id: str, experiment_id: str) -> None:
    gpu = get_gpu(session, gpu_id, lock=True)
    if gpu.current_experiment_id != experiment_id:
        raise Conflict(
            "GPU is not leased by this experiment",
            fields={"gpu_id": gpu_id, "experiment_id": experiment_id},
            leased_to=gpu.current_experiment_id,
        )
    gpu.status = IDLE
    gpu.current_experiment_id = None
    session.flush()
