"""Tables: run tags, experiments and their runs, GPUs in the pool, search strategy per tag.

Statuses and the moves between them are defined in app.services.lifecycle; the CHECK
constraints here only keep a stray write from storing a status that does not exist.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Experiment statuses: queued, running and confirming are live, the rest final.
QUEUED, RUNNING, CONFIRMING = "queued", "running", "confirming"
KEEP, DISCARD, CRASH, TIMEOUT, CANCELLED, PRUNED = "keep", "discard", "crash", "timeout", "cancelled", "pruned"
LIVE_STATUSES = (QUEUED, RUNNING, CONFIRMING)
FINISHED_STATUSES = (KEEP, DISCARD, CRASH, TIMEOUT, CANCELLED, PRUNED)
FAILED_STATUSES = (CRASH, TIMEOUT)
EXPERIMENT_STATUSES = LIVE_STATUSES + FINISHED_STATUSES

# Run statuses. A run that finished with a valid summary is `finished`; `lost` is an attempt
# whose holder went away (a new attempt replaces it), `released` one handed back by a clean
# shutdown (replaced without charging an attempt).
FINISHED, LOST, RELEASED = "finished", "lost", "released"
LIVE_RUN_STATUSES = (QUEUED, RUNNING)
RUN_STATUSES = (QUEUED, RUNNING, FINISHED, CRASH, TIMEOUT, CANCELLED, LOST, RELEASED, PRUNED)

# Why a run exists: the experiment's first run, a baseline replicate, a confirmation run.
FIRST, BASELINE, CONFIRM = "first", "baseline", "confirm"

# Who produced a run's score: the trusted worker path, or the agent itself (manual mode).
SCORED_BY_WORKER, SCORED_BY_AGENT = "worker", "agent"

# GPU pool statuses, and who may hold a GPU: a Celery worker trains on a `worker` GPU; only a
# `manual` GPU (registered through the API) can be leased with /api/pool/acquire.
IDLE, TRAINING, OFFLINE = "idle", "training", "offline"
GPU_STATUSES = (IDLE, TRAINING, OFFLINE)
WORKER_GPU, MANUAL_GPU = "worker", "manual"


def _one_of(table: str, column: str, values: tuple[str, ...]) -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=f"ck_{table}_{column}")


class Base(DeclarativeBase):
    pass


class Tag(Base):
    __tablename__ = "tags"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    branch: Mapped[str] = mapped_column(String(96))
    profile: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # The mean val_bpb of the best experiment's runs.
    best_val_bpb: Mapped[float | None] = mapped_column(Float)
    best_experiment_id: Mapped[str | None] = mapped_column(String(40))
    total_experiments: Mapped[int] = mapped_column(Integer, default=0)
    kept_experiments: Mapped[int] = mapped_column(Integer, default=0)
    discarded_experiments: Mapped[int] = mapped_column(Integer, default=0)
    crashed_experiments: Mapped[int] = mapped_column(Integer, default=0)
    consecutive_crashes: Mapped[int] = mapped_column(Integer, default=0)
    # The setup its first run was scored with (fixed files, tokenizer, data, GPU model, driver,
    # torch): a worker whose setup differs does not train the tag's runs.
    fingerprint: Mapped[dict | None] = mapped_column(JSON)
    # Opt-in: runs whose training loss is clearly worse than the best's at the same progress are
    # stopped and recorded as pruned (app.services.pruning).
    early_stopping: Mapped[bool] = mapped_column(Boolean, default=False)


class Strategy(Base):
    __tablename__ = "strategies"

    tag: Mapped[str] = mapped_column(ForeignKey("tags.name", ondelete="CASCADE"), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16), default="explore")
    explore_ratio: Mapped[float] = mapped_column(Float, default=0.7)
    temperature: Mapped[float] = mapped_column(Float, default=1.0)
    reason: Mapped[str] = mapped_column(Text, default="initial exploration phase")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (
        Index("ix_experiments_tag_created", "tag", "created_at"),
        Index("ix_experiments_tag_status", "tag", "status"),
        # Beat finds the active tags from recently finished experiments.
        Index("ix_experiments_finished", "finished_at"),
        _one_of("experiments", "status", EXPERIMENT_STATUSES),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tag: Mapped[str] = mapped_column(ForeignKey("tags.name", ondelete="CASCADE"))
    parent_id: Mapped[str | None] = mapped_column(String(40))
    commit_sha: Mapped[str] = mapped_column(String(64))
    train_py: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    hypothesis: Mapped[str] = mapped_column(Text)
    category: Mapped[str] = mapped_column(String(32))
    diff_summary: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16))
    # Submitted experiments are trained and scored by the workers; registered ones (the seed's
    # manual mode) report their own numbers.
    dispatched: Mapped[bool] = mapped_column(Boolean, default=False)

    # The summary of its finished runs: val_bpb is their mean, the rest the mean or the last.
    profile: Mapped[str | None] = mapped_column(String(32))
    val_bpb: Mapped[float | None] = mapped_column(Float)
    training_seconds: Mapped[float | None] = mapped_column(Float)
    total_seconds: Mapped[float | None] = mapped_column(Float)
    peak_vram_mb: Mapped[float | None] = mapped_column(Float)
    mfu_percent: Mapped[float | None] = mapped_column(Float)
    total_tokens_m: Mapped[float | None] = mapped_column(Float)
    num_steps: Mapped[int | None] = mapped_column(Integer)
    num_params_m: Mapped[float | None] = mapped_column(Float)
    depth: Mapped[int | None] = mapped_column(Integer)

    # The verdict, against the tag's best when it was decided, with its uncertainty.
    delta: Mapped[float | None] = mapped_column(Float)
    near_miss: Mapped[bool] = mapped_column(Boolean, default=False)
    sigma: Mapped[float | None] = mapped_column(Float)
    z: Mapped[float | None] = mapped_column(Float)

    # Pinned to one GPU of the pool (its id; the index as the caller gave it, if any).
    pinned_gpu_id: Mapped[str | None] = mapped_column(String(128))
    pinned_gpu: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    runs: Mapped[list[Run]] = relationship(
        "Run", order_by="(Run.replicate, Run.attempt, Run.queued_at)", lazy="selectin", viewonly=True)


# Partial index: near-miss queries touch only the few near misses of one tag.
Index(
    "ix_experiments_near_miss",
    Experiment.tag,
    Experiment.delta,
    postgresql_where=Experiment.near_miss.is_(True),
)


class Run(Base):
    """One training of an experiment's source on one GPU: one attempt of one replicate."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_experiment", "experiment_id", "replicate", "attempt"),
        Index("ix_runs_status_lease", "status", "lease_expires_at"),
        Index("ix_runs_holder", "lease_holder", "status"),
        _one_of("runs", "status", RUN_STATUSES),
        _one_of("runs", "purpose", (FIRST, BASELINE, CONFIRM)),
        _one_of("runs", "scored_by", (SCORED_BY_WORKER, SCORED_BY_AGENT)),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    replicate: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    purpose: Mapped[str] = mapped_column(String(16), default=FIRST)
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    scored_by: Mapped[str] = mapped_column(String(16), default=SCORED_BY_WORKER)

    # Where it trains: the pool id of the GPU, its model and host.
    gpu_id: Mapped[str | None] = mapped_column(String(128))
    gpu_index: Mapped[int | None] = mapped_column(Integer)
    gpu_model: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255))
    # The lease: the worker incarnation that trains it, and until when it counts as alive.
    lease_holder: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    task_id: Mapped[str | None] = mapped_column(String(64))
    queue: Mapped[str | None] = mapped_column(String(200))

    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A staged run (claimed while the GPU still trained the run before it) gets its GPU later.
    gpu_granted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    training_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # The summary block.
    profile: Mapped[str | None] = mapped_column(String(32))
    val_bpb: Mapped[float | None] = mapped_column(Float)
    reported_val_bpb: Mapped[float | None] = mapped_column(Float)
    # The trusted evaluator's account of its score, and whether train.py's own number disagreed.
    scoring: Mapped[dict | None] = mapped_column(JSON)
    score_mismatch: Mapped[bool | None] = mapped_column(Boolean)
    training_seconds: Mapped[float | None] = mapped_column(Float)
    total_seconds: Mapped[float | None] = mapped_column(Float)
    peak_vram_mb: Mapped[float | None] = mapped_column(Float)
    mfu_percent: Mapped[float | None] = mapped_column(Float)
    total_tokens_m: Mapped[float | None] = mapped_column(Float)
    num_steps: Mapped[int | None] = mapped_column(Integer)
    num_params_m: Mapped[float | None] = mapped_column(Float)
    depth: Mapped[int | None] = mapped_column(Integer)
    # Step 0's wall time, which torch.compile dominates (workers.progress.step0_seconds).
    compile_seconds: Mapped[float | None] = mapped_column(Float)
    # How it was staged, for a staged run: workers.runner.StagedRun.record.
    staging: Mapped[dict | None] = mapped_column(JSON)

    error: Mapped[str | None] = mapped_column(Text)
    log_path: Mapped[str | None] = mapped_column(Text)
    log_tail: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict | None] = mapped_column(JSON)
    curve: Mapped[list | None] = mapped_column(JSON)
    fingerprint: Mapped[dict | None] = mapped_column(JSON)


class Gpu(Base):
    __tablename__ = "gpus"
    __table_args__ = (Index("ix_gpus_status_index", "status", "gpu_index"), _one_of("gpus", "status", GPU_STATUSES),
                      _one_of("gpus", "kind", (WORKER_GPU, MANUAL_GPU)))

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    gpu_index: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255), default="")
    gpu_name: Mapped[str] = mapped_column(String(255), default="")
    vram_mb: Mapped[float] = mapped_column(Float, default=0.0)
    kind: Mapped[str] = mapped_column(String(16), default=MANUAL_GPU)
    status: Mapped[str] = mapped_column(String(16), default=IDLE)
    current_experiment_id: Mapped[str | None] = mapped_column(String(40))
    current_run_id: Mapped[str | None] = mapped_column(String(40))
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    telemetry: Mapped[dict | None] = mapped_column(JSON)
