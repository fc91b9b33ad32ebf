"""Tags and experiments: setup, register, keep/discard, crashes, queries."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.models import (
    CANCELLED,
    CRASH,
    DISCARD,
    KEEP,
    QUEUED,
    RUNNING,
    Experiment,
    Strategy,
    Tag,
)

# A tag becomes the git branch `autoresearch/<tag>`: keep it to characters that are safe there.
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
METRIC_FIELDS = (
    "val_bpb",
    "peak_vram_mb",
    "training_seconds",
    "total_seconds",
    "total_tokens_m",
    "mfu_percent",
    "num_steps",
    "num_params_m",
    "depth",
)


@dataclass(frozen=True)
class Rules:
    """The decision constants, from configuration."""

    near_miss_threshold: float = 0.002
    max_consecutive_crashes: int = 3

    @classmethod
    def from_settings(cls, settings) -> Rules:
        return cls(settings.near_miss_threshold, settings.max_consecutive_crashes)


def new_experiment_id() -> str:
    # Sortable by creation time, unique across processes: milliseconds plus random bits.
    return f"exp-{int(time.time() * 1000):x}-{os.urandom(3).hex()}"


def check_tag_name(name: str) -> None:
    if not TAG_PATTERN.match(name) or ".." in name or name.endswith((".", ".lock")):
        raise InvalidInput(
            "tag must be 1-64 letters, digits, '.', '_' or '-', start with a letter or digit, "
            "and be usable as a git branch component",
            fields={"tag": name},
        )


def setup_tag(session: Session, *, name: str, profile: str) -> Tag:
    check_tag_name(name)
    existing = session.get(Tag, name)
    if existing is not None:
        raise Conflict(f"Tag '{name}' already exists", existing=tag_public(existing))
    # ON CONFLICT: two simultaneous setups of one name both pass the check above; the loser
    # waits for the winner's commit and must answer 409, not fail on the primary key.
    inserted = session.execute(
        pg_insert(Tag)
        .values(name=name, branch=f"autoresearch/{name}", profile=profile)
        .on_conflict_do_nothing(index_elements=[Tag.name])
        .returning(Tag.name)
    ).scalar_one_or_none()
    if inserted is None:
        raise Conflict(f"Tag '{name}' already exists", existing=tag_public(get_tag(session, name)))
    session.add(Strategy(tag=name))
    session.flush()
    return get_tag(session, name)


def get_tag(session: Session, name: str, *, lock: bool = False) -> Tag:
    query = select(Tag).where(Tag.name == name)
    if lock:
        query = query.with_for_update()
    tag = session.scalars(query).one_or_none()
    if tag is None:
        raise NotFound(f"Tag '{name}' not found", fields={"tag": name})
    return tag


def get_experiment(session: Session, experiment_id: str, *, lock: bool = False) -> Experiment:
    query = select(Experiment).where(Experiment.id == experiment_id)
    if lock:
        query = query.with_for_update()
    experiment = session.scalars(query).one_or_none()
    if experiment is None:
        raise NotFound(f"Experiment {experiment_id} not found", fields={"experiment_id": experiment_id})
    return experiment


def register(
    session: Session,
    *,
    tag: str,
    commit_sha: str,
    description: str,
    hypothesis: str,
    category: str,
    diff_summary: str = "",
    parent_id: str | None = None,
    train_py: str | None = None,
    status: str = RUNNING,
    gpu_id: str | None = None,
    pinned_gpu: int | None = None,
) -> Experiment:
    get_tag(session, tag)
    if parent_id is not None:
        parent = session.get(Experiment, parent_id)
        if parent is None or parent.tag != tag:
            raise NotFound(f"Parent experiment {parent_id} not found in tag '{tag}'", fields={"parent_id": parent_id})
    experiment = Experiment(
        id=new_experiment_id(),
        tag=tag,
        parent_id=parent_id,
        commit_sha=commit_sha,
        train_py=train_py,
        description=description,
        hypothesis=hypothesis,
        category=category,
        diff_summary=diff_summary,
        status=status,
        gpu_id=gpu_id,
        pinned_gpu=pinned_gpu,
    )
    if status == RUNNING:
        experiment.started_at = func.now()
    session.add(experiment)
    session.flush()
    session.refresh(experiment)
    return experiment


def check_open(experiment: Experiment, attempt: int | None = None) -> None:
    """Only a live experiment takes a result; a worker passes its attempt, so a run that was
    requeued after its worker went silent cannot be recorded by that worker any more."""
    if experiment.status not in (QUEUED, RUNNING):
        raise Conflict(
            f"Experiment {experiment.id} already finished with status '{experiment.status}'",
            fields={"experiment_id": experiment.id},
        )
    if attempt is not None and (experiment.status != RUNNING or experiment.attempts != attempt):
        raise Conflict(f"Experiment {experiment.id} attempt {attempt} was superseded",
                       fields={"experiment_id": experiment.id})


def complete(
    session: Session, *, experiment_id: str, metrics: dict, rules: Rules, attempt: int | None = None
) -> dict:
    """Record a finished run and decide keep or discard against the tag's best right now.

    The tag row is locked first (always tag, then experiment, so two completions never
    deadlock), so concurrent completions of one tag are decided one after another.
    """
    tag = get_tag(session, get_experiment(session, experiment_id).tag, lock=True)
    experiment = get_experiment(session, experiment_id, lock=True)
    check_open(experiment, attempt)
    val_bpb = metrics["val_bpb"]
    best = tag.best_val_bpb
    improved = best is None or val_bpb < best
    delta = 0.0 if best is None else best - val_bpb

    for name in METRIC_FIELDS:
        if metrics.get(name) is not None:
            setattr(experiment, name, metrics[name])
    if metrics.get("profile"):
        experiment.profile = metrics["profile"]
    experiment.status = KEEP if improved else DISCARD
    experiment.delta = delta
    experiment.near_miss = (not improved) and best is not None and delta > -rules.near_miss_threshold
    # clock_timestamp, not now(): now() is when the transaction began, before it waited for the
    # tag lock; the time of the decision orders results the way they were decided.
    experiment.finished_at = func.clock_timestamp()
    experiment.progress = None

    tag.total_experiments += 1
    tag.consecutive_crashes = 0
    if improved:
        tag.kept_experiments += 1
        tag.best_val_bpb = val_bpb
        tag.best_experiment_id = experiment.id
    else:
        tag.discarded_experiments += 1
    session.flush()
    return {
        "experiment_id": experiment.id,
        "status": experiment.status,
        "val_bpb": val_bpb,
        "improved": improved,
        "delta": delta,
        "best_val_bpb": tag.best_val_bpb,
        "near_miss": experiment.near_miss,
        "action": "keep_commit" if improved else "git_reset",
    }


def record_failure(
    session: Session, *, experiment_id: str, error: str, rules: Rules, status: str = CRASH, attempt: int | None = None
) -> dict:
    """A crash or timeout: counts towards the tag's consecutive crashes."""
    tag = get_tag(session, get_experiment(session, experiment_id).tag, lock=True)
    experiment = get_experiment(session, experiment_id, lock=True)
    check_open(experiment, attempt)
    experiment.status = status
    experiment.error = error
    experiment.finished_at = func.clock_timestamp()  # the decision's time, as in complete
    tag.total_experiments += 1
    tag.crashed_experiments += 1
    tag.consecutive_crashes += 1
    session.flush()
    return {
        "experiment_id": experiment.id,
        "status": status,
        "consecutive_crashes": tag.consecutive_crashes,
        "should_abort": tag.consecutive_crashes >= rules.max_consecutive_crashes,
        "action": "git_reset",
    }


def mark_cancelled(session: Session, *, experiment_id: str, reason: str, attempt: int | None = None) -> Experiment:
    """Cancelled runs are no verdict on the idea: they change no counter."""
    experiment = get_experiment(session, experiment_id, lock=True)
    check_open(experiment, attempt)
    experiment.status = CANCELLED
    experiment.error = reason
    experiment.finished_at = func.now()
    session.flush()
    return experiment


def history(session: Session, *, tag: str, status: str | None = None, limit: int | None = None) -> list[Experiment]:
    get_tag(session, tag)
    query = select(Experiment).where(Experiment.tag == tag)
    if status:
        query = query.where(Experiment.status == status)
    if limit:
        # The newest `limit`, returned oldest first like the rest of the history.
        newest = query.order_by(Experiment.created_at.desc(), Experiment.id.desc()).limit(limit).subquery()
        query = select(Experiment).join(newest, Experiment.id == newest.c.id)
    return list(session.scalars(query.order_by(Experiment.created_at, Experiment.id)))


def best(session: Session, *, tag: str) -> tuple[Tag, Experiment]:
    record = get_tag(session, tag)
    if record.best_experiment_id is None:
        raise NotFound("No results yet", tag=tag)
    return record, session.get(Experiment, record.best_experiment_id)


def near_misses(session: Session, *, tag: str, limit: int = 20) -> tuple[list[Experiment], int]:
    get_tag(session, tag)
    where = (Experiment.tag == tag, Experiment.near_miss.is_(True))
    total = session.scalar(select(func.count()).select_from(Experiment).where(*where))
    # delta is best - val_bpb, negative for a near miss: closest to the best first.
    rows = session.scalars(select(Experiment).where(*where).order_by(Experiment.delta.desc()).limit(limit))
    return list(rows), total


def crash_limit_reached(tag: Tag, rules: Rules) -> bool:
    return tag.consecutive_crashes >= rules.max_consecutive_crashes


def tag_public(tag: Tag) -> dict:
    return {
        "name": tag.name,
        "branch": tag.branch,
        "profile": tag.profile,
        "created_at": tag.created_at.isoformat() if tag.created_at else None,
        "best_val_bpb": tag.best_val_bpb,
        "best_experiment_id": tag.best_experiment_id,
        "total_experiments": tag.total_experiments,
        "kept_experiments": tag.kept_experiments,
        "discarded_experiments": tag.discarded_experiments,
        "crashed_experiments": tag.crashed_experiments,
        "consecutive_crashes": tag.consecutive_crashes,
    }


def experiment_public(experiment: Experiment, *, with_source: bool = False) -> dict:
    record = {
        "id": experiment.id,
        "tag": experiment.tag,
        "parent_id": experiment.parent_id,
        "commit_sha": experiment.commit_sha,
        "description": experiment.description,
        "hypothesis": experiment.hypothesis,
        "category": experiment.category,
        "diff_summary": experiment.diff_summary,
        "status": experiment.status,
        "profile": experiment.profile,
        **{name: getattr(experiment, name) for name in METRIC_FIELDS},
        "delta": experiment.delta,
        "near_miss": experiment.near_miss,
        "gpu_id": experiment.gpu_id,
        "gpu_index": experiment.gpu_index,
        "pinned_gpu": experiment.pinned_gpu,
        "task_id": experiment.task_id,
        "created_at": _iso(experiment.created_at),
        "started_at": _iso(experiment.started_at),
        "finished_at": _iso(experiment.finished_at),
        "error": experiment.error,
        "progress": experiment.progress,
        "cancel_requested": experiment.cancel_requested,
    }
    if with_source:
        record["train_py"] = experiment.train_py
    return record


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None
