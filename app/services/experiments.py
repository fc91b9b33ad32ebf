"""Tags and experiments: setup, register, keep/discard, crashes, queries."""

from __future__ import annotations

import os
import re
import time

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.models import RUNNING, Experiment, Run, Strategy, Tag

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


def new_experiment_id() -> str:
    # Sortable by creation time, unique across processes: milliseconds plus random bits.
    return f"exp-{int(time.time() * 1000):x}-{os.urandom(3).hex()}"


def check_tag_name(name: str) -> None:
    if not TAG_PATTERN.fullmatch(name) or ".." in name or name.endswith((".", ".lock")):
        raise InvalidInput(
            "tag must be 1-64 letters, digits, '.', '_' or '-', start with a letter or digit, "
            "and be usable as a git branch component",
            fields={"tag": name},
        )


def setup_tag(session: Session, *, name: str, profile: str, early_stopping: bool = False) -> Tag:
    check_tag_name(name)
    existing = session.get(Tag, name)
    if existing is not None:
        raise Conflict(f"Tag '{name}' already exists", existing=tag_public(existing))
    # ON CONFLICT: two simultaneous setups of one name both pass the check above; the loser
    # waits for the winner's commit and must answer 409, not fail on the primary key.
    inserted = session.execute(
        pg_insert(Tag)
        .values(name=name, branch=f"autoresearch/{name}", profile=profile, early_stopping=early_stopping)
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


def get_experiment(session: Session, experiment_id: str, *, fresh: bool = False) -> Experiment:
    """One experiment with its runs; `fresh` re-reads what the session may hold from before."""
    query = select(Experiment).where(Experiment.id == experiment_id)
    if fresh:
        query = query.execution_options(populate_existing=True)
    experiment = session.scalars(query).one_or_none()
    if experiment is None:
        raise NotFound(f"Experiment {experiment_id} not found", fields={"experiment_id": experiment_id})
    return experiment


def new_experiment(
    session: Session,
    *,
    tag: str,
    commit_sha: str,
    description: str,
    hypothesis: str,
    category: str,
    status: str,
    dispatched: bool,
    diff_summary: str = "",
    parent_id: str | None = None,
    train_py: str | None = None,
    pinned_gpu_id: str | None = None,
    pinned_gpu: int | None = None,
) -> Experiment:
    get_tag(session, tag)
    if parent_id is not None:
        parent = session.get(Experiment, parent_id)
        if parent is None or parent.tag != tag:
            raise NotFound(f"Parent experiment {parent_id} not found in tag '{tag}'", fields={"parent_id": parent_id})
    experiment = Experiment(
        id=new_experiment_id(), tag=tag, parent_id=parent_id, commit_sha=commit_sha, train_py=train_py,
        description=description, hypothesis=hypothesis, category=category, diff_summary=diff_summary,
        status=status, dispatched=dispatched, pinned_gpu_id=pinned_gpu_id, pinned_gpu=pinned_gpu,
    )
    if status == RUNNING:
        experiment.started_at = func.now()
    session.add(experiment)
    session.flush()
    session.refresh(experiment)
    return experiment


def register(session: Session, *, gpu_id: str | None = None, **fields) -> Experiment:
    """The seed's manual mode: an experiment the agent trains itself, running from now on."""
    from app.services.lifecycle import start_manual_run

    experiment = new_experiment(session, status=RUNNING, dispatched=False, **fields)
    start_manual_run(session, experiment, gpu_id=gpu_id)
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
        "fingerprint": tag.fingerprint,
        "early_stopping": tag.early_stopping,
    }


RUN_FIELDS = ("id", "experiment_id", "replicate", "attempt", "purpose", "seed", "status", "scored_by", "gpu_id", "gpu_index",
              "gpu_model", "host", "lease_holder", "task_id", "queue", "profile", "val_bpb", "reported_val_bpb",
              "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_m", "num_steps",
              "num_params_m", "depth", "compile_seconds", "error", "progress", "curve", "fingerprint",
              "scoring", "score_mismatch", "staging")
RUN_TIMES = ("lease_expires_at", "queued_at", "claimed_at", "gpu_granted_at", "training_started_at", "finished_at")


def run_public(run: Run) -> dict:
    return {**{name: getattr(run, name) for name in RUN_FIELDS}, **{name: _iso(getattr(run, name)) for name in RUN_TIMES}}


def current_run(experiment: Experiment) -> Run | None:
    """The run that says where the experiment is: a running one, else the newest."""
    runs = experiment.runs
    return next((r for r in runs if r.status == RUNNING), None) or (runs[-1] if runs else None)


def experiment_public(experiment: Experiment, *, with_source: bool = False, with_runs: bool = True) -> dict:
    run = current_run(experiment)
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
        "sigma": experiment.sigma,
        "z": experiment.z,
        "scored_by": run.scored_by if run else None,
        "gpu_id": run.gpu_id if run else None,
        "gpu_index": run.gpu_index if run else None,
        "pinned_gpu": experiment.pinned_gpu,
        "pinned_gpu_id": experiment.pinned_gpu_id,
        "task_id": run.task_id if run else None,
        "created_at": _iso(experiment.created_at),
        "started_at": _iso(experiment.started_at),
        "finished_at": _iso(experiment.finished_at),
        "error": experiment.error,
        "progress": run.progress if run is not None and run.status == RUNNING else None,
        "cancel_requested": experiment.cancel_requested,
        "run_count": sum(1 for r in experiment.runs if r.status == "finished"),
    }
    if with_runs:
        record["runs"] = [run_public(r) for r in experiment.runs]
    if with_source:
        record["train_py"] = experiment.train_py
    return record


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None
