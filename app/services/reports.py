"""Reports: tag summary, autoresearch's results.tsv, experiment diffs, tag list."""

from __future__ import annotations

import difflib

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import (
    CANCELLED,
    CONFIRMING,
    CRASH,
    DISCARD,
    FAILED_STATUSES,
    FINISHED,
    KEEP,
    PRUNED,
    QUEUED,
    RUNNING,
    Experiment,
    Gpu,
    Run,
    Strategy,
    Tag,
)
from app.services.experiments import get_experiment, get_tag, tag_public
from app.services.lifecycle import noise_floor

TSV_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"


def summary(session: Session, *, tag: str) -> dict:
    record = get_tag(session, tag)
    counts = dict(
        session.execute(
            select(Experiment.status, func.count()).where(Experiment.tag == tag).group_by(Experiment.status)
        ).all()
    )
    categories = dict(
        session.execute(
            select(Experiment.category, func.count()).where(Experiment.tag == tag).group_by(Experiment.category)
        ).all()
    )
    kept = session.scalars(
        select(Experiment).where(Experiment.tag == tag, Experiment.status == KEEP).order_by(Experiment.finished_at)
    )
    # GPU time is every run's, replicates and confirmations included.
    training_seconds = session.scalar(
        select(func.coalesce(func.sum(Run.training_seconds), 0.0))
        .join(Experiment, Experiment.id == Run.experiment_id).where(Experiment.tag == tag)
    )
    strategy = session.get(Strategy, tag)
    pool = dict(session.execute(select(Gpu.status, func.count()).group_by(Gpu.status)).all())
    best = session.get(Experiment, record.best_experiment_id) if record.best_experiment_id else None
    total = record.total_experiments
    return {
        "tag": tag,
        "branch": record.branch,
        "profile": record.profile,
        "best": {"val_bpb": best.val_bpb, "commit": best.commit_sha, "experiment_id": best.id} if best else None,
        "stats": {
            "total": total,
            "kept": counts.get(KEEP, 0),
            "discarded": counts.get(DISCARD, 0),
            "crashed": sum(counts.get(s, 0) for s in FAILED_STATUSES),
            "running": counts.get(RUNNING, 0),
            "confirming": counts.get(CONFIRMING, 0),
            "queued": counts.get(QUEUED, 0),
            "cancelled": counts.get(CANCELLED, 0),
            "keep_rate": counts.get(KEEP, 0) / total if total else 0,
            "consecutive_crashes": record.consecutive_crashes,
        },
        "categories": categories,
        "bpb_progression": [
            {"id": e.id, "val_bpb": e.val_bpb, "description": e.description, "category": e.category,
             "at": e.finished_at.isoformat() if e.finished_at else None}
            for e in kept
        ],
        "total_training_minutes": round(training_seconds / 60, 1),
        "strategy": strategy.mode if strategy else "unknown",
        "gpu_pool": {"total": sum(pool.values()), "idle": pool.get("idle", 0), "training": pool.get("training", 0)},
        "noise": noise_floor(session, tag=tag),
    }


def tsv_rows(session: Session, *, tag: str) -> list[str]:
    """autoresearch's results.tsv: a crash (or timeout) has val_bpb 0 and memory 0, status crash."""
    get_tag(session, tag)
    experiments = session.scalars(
        select(Experiment)
        .where(Experiment.tag == tag, Experiment.status.in_((KEEP, DISCARD, *FAILED_STATUSES)))
        .order_by(Experiment.finished_at, Experiment.id)
    )
    rows = []
    for e in experiments:
        failed = e.status in FAILED_STATUSES
        bpb = "0.000000" if failed else f"{e.val_bpb:.6f}"
        memory = "0.0" if failed else f"{(e.peak_vram_mb or 0) / 1024:.1f}"
        # Tabs and newlines would break the columns.
        description = " ".join(e.description.split())
        rows.append(f"{e.commit_sha[:7]}\t{bpb}\t{memory}\t{CRASH if failed else e.status}\t{description}")
    return rows


def tsv(session: Session, *, tag: str) -> dict:
    rows = tsv_rows(session, tag=tag)
    return {"tsv": "\n".join([TSV_HEADER, *rows]), "count": len(rows)}


def _side(e: Experiment) -> dict:
    return {
        "id": e.id, "val_bpb": e.val_bpb, "description": e.description, "category": e.category,
        "num_params_m": e.num_params_m, "peak_vram_mb": e.peak_vram_mb, "commit_sha": e.commit_sha,
        "status": e.status,
    }


def _minus(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None else b - a


def diff(session: Session, *, experiment_a: str, experiment_b: str) -> dict:
    try:
        a = get_experiment(session, experiment_a)
        b = get_experiment(session, experiment_b)
    except NotFound:
        raise NotFound("One or both experiments not found",
                       fields={"experiment_a": experiment_a, "experiment_b": experiment_b}) from None
    code_diff = None
    if a.train_py is not None and b.train_py is not None:
        code_diff = "".join(
            difflib.unified_diff(
                a.train_py.splitlines(keepends=True), b.train_py.splitlines(keepends=True),
                fromfile=f"{a.id}/train.py", tofile=f"{b.id}/train.py",
            )
        )
    return {
        "a": _side(a),
        "b": _side(b),
        "delta_bpb": _minus(b.val_bpb, a.val_bpb),
        "delta_params_m": _minus(b.num_params_m, a.num_params_m),
        "delta_vram_mb": _minus(b.peak_vram_mb, a.peak_vram_mb),
        "diff": code_diff,
    }


def tags(session: Session) -> dict:
    return {"tags": [tag_public(t) for t in session.scalars(select(Tag).order_by(Tag.created_at.desc()))]}


def active_tags(session: Session, *, within_hours: float = 24) -> list[str]:
    """Tags with an experiment created or finished recently: the ones beat reports on."""
    recent = func.now() - func.make_interval(0, 0, 0, 0, within_hours)
    return list(
        session.scalars(
            select(Experiment.tag)
            .where((Experiment.created_at >= recent) | (Experiment.finished_at >= recent))
            .distinct()
        )
    )


def progress_points(session: Session, *, tag: str) -> list[dict]:
    """Every finished experiment in completion order: its mean, each of its runs, and the running
    best at that point with the standard error of the best's mean (sigma / sqrt(runs))."""
    get_tag(session, tag)
    experiments = session.scalars(
        select(Experiment)
        .where(Experiment.tag == tag, Experiment.status.in_((KEEP, DISCARD, PRUNED, *FAILED_STATUSES)))
        .order_by(Experiment.finished_at, Experiment.id)
    ).all()
    points, best, best_stderr = [], None, None
    for number, experiment in enumerate(experiments, start=1):
        runs = [r.val_bpb for r in experiment.runs if r.status == FINISHED and r.val_bpb is not None]
        if experiment.status == KEEP:
            best = experiment.val_bpb
            best_stderr = experiment.sigma / len(runs) ** 0.5 if experiment.sigma and runs else None
        points.append({"n": number, "id": experiment.id, "val_bpb": experiment.val_bpb, "status": experiment.status,
                       "description": experiment.description, "best": best, "best_stderr": best_stderr,
                       "runs": runs})
    return points


def _held_seconds():
    """Seconds a run held its GPU: from the claim (or a manual register) to its end."""
    return func.extract("epoch", Run.finished_at - Run.claimed_at)


def _ended_runs():
    return Run.claimed_at.is_not(None), Run.finished_at.is_not(None)


def overview(session: Session) -> dict:
    """Every tag, newest first, with what the overview page shows beside its counts: live
    experiments, the noise floor, GPU-hours spent (every run that held a GPU: baselines,
    confirmations, crashes and cancelled ones too) and verdicts per GPU-hour."""
    hours = dict(session.execute(
        select(Experiment.tag, func.sum(_held_seconds()) / 3600)
        .join(Run, Run.experiment_id == Experiment.id).where(*_ended_runs()).group_by(Experiment.tag)
    ).all())
    counts: dict[str, dict[str, int]] = {}
    for tag, status, count in session.execute(
        select(Experiment.tag, Experiment.status, func.count()).group_by(Experiment.tag, Experiment.status)
    ):
        counts.setdefault(tag, {})[status] = count
    tags = []
    for record in session.scalars(select(Tag).order_by(Tag.created_at.desc())):
        by_status = counts.get(record.name, {})
        spent = float(hours.get(record.name) or 0.0)
        verdicts = sum(by_status.get(s, 0) for s in (KEEP, DISCARD, *FAILED_STATUSES))
        noise = noise_floor(session, tag=record.name)
        tags.append({
            **tag_public(record),
            "running": by_status.get(RUNNING, 0) + by_status.get(CONFIRMING, 0),
            "queued": by_status.get(QUEUED, 0),
            "noise": {"sigma": noise["sigma"], "runs": noise["runs"]},
            "verdicts": verdicts,
            "gpu_hours": spent,
            "experiments_per_gpu_hour": verdicts / spent if spent > 0 else None,
        })
    return {"tags": tags}


def gpu_use(session: Session, *, tag: str) -> list[dict]:
    """Per GPU of a tag: the runs it held to an end and the hours it held them."""
    get_tag(session, tag)
    rows = session.execute(
        select(Run.gpu_id, func.count(), func.coalesce(func.sum(_held_seconds()), 0.0))
        .join(Experiment, Run.experiment_id == Experiment.id)
        .where(Experiment.tag == tag, *_ended_runs())
        .group_by(Run.gpu_id)
        .order_by(Run.gpu_id)
    ).all()
    return [{"gpu_id": gpu_id, "runs": count, "gpu_hours": float(seconds) / 3600} for gpu_id, count, seconds in rows]


def kept_changes(session: Session, *, tag: str) -> list[dict]:
    """Every keep in the order it was decided, each with its gain over the best it beat (the
    verdict's delta) and the train.py diff against that best; the first keep beat nothing."""
    get_tag(session, tag)
    kept = list(session.scalars(
        select(Experiment).where(Experiment.tag == tag, Experiment.status == KEEP)
        .order_by(Experiment.finished_at, Experiment.id)
    ))
    changes = []
    for index, experiment in enumerate(kept):
        previous = kept[index - 1] if index else None
        compared = diff(session, experiment_a=previous.id, experiment_b=experiment.id) if previous else None
        changes.append({
            "experiment": _side(experiment),
            "hypothesis": experiment.hypothesis,
            "previous_id": previous.id if previous else None,
            "gain": experiment.delta if previous else None,
            "sigma": experiment.sigma,
            "z": experiment.z,
            "diff": compared["diff"] if compared else None,
        })
    return changes
