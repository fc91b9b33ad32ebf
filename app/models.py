"""Tables: run tags, experiments, GPUs in the pool, search strategy per tag."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Statuses an experiment can end in; queued and running are the only live ones.
QUEUED, RUNNING = "queued", "running"
KEEP, DISCARD, CRASH, TIMEOUT, CANCELLED = "keep", "discard", "crash", "timeout", "cancelled"
LIVE_STATUSES = (QUEUED, RUNNING)
FINISHED_STATUSES = (KEEP, DISCARD, CRASH, TIMEOUT, CANCELLED)
FAILED_STATUSES = (CRASH, TIMEOUT)

# GPU pool statuses.
IDLE, TRAINING, OFFLINE = "idle", "training", "offline"


class Base(DeclarativeBase):
    pass


class Tag(Base):
    __tablename__ = "tags"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    branch: Mapped[str] = mapped_column(String(96))
    profile: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    best_val_bpb: Mapped[float | None] = mapped_column(Float)
    best_experiment_id: Mapped[str | None] = mapped_column(String(40))
    total_experiments: Mapped[int] = mapped_column(Integer, default=0)
    kept_experiments: Mapped[int] = mapped_column(Integer, default=0)
    discarded_experiments: Mapped[int] = mapped_column(Integer, default=0)
    crashed_experiments: Mapped[int] = mapped_column(Integer, default=0)
    consecutive_crashes: Mapped[int] = mapped_column(Integer, default=0)


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
        Index("ix_experiments_status_gpu", "status", "gpu_index"),
        # Beat finds the active tags from recently finished experiments.
        Index("ix_experiments_finished", "finished_at"),
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

    # The summary block of train.py.
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

    # The decision, made at completion against the tag's best at that moment.
    delta: Mapped[float | None] = mapped_column(Float)
    near_miss: Mapped[bool] = mapped_column(Boolean, default=False)

    # Where and when it ran.
    gpu_id: Mapped[str | None] = mapped_column(String(128))
    gpu_index: Mapped[int | None] = mapped_column(Integer)
    pinned_gpu: Mapped[int | None] = mapped_column(Integer)
    task_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    log_path: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


# Partial index: near-miss queries touch only the few near misses of one tag.
Index(
    "ix_experiments_near_miss",
    Experiment.tag,
    Experiment.delta,
    postgresql_where=Experiment.near_miss.is_(True),
)


class Gpu(Base):
    __tablename__ = "gpus"
    __table_args__ = (Index("ix_gpus_status_index", "status", "gpu_index"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    gpu_index: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255), default="")
    gpu_name: Mapped[str] = mapped_column(String(255), default="")
    vram_mb: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(16), default=IDLE)
    current_experiment_id: Mapped[str | None] = mapped_column(String(40))
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    telemetry: Mapped[dict | None] = mapped_column(JSON)
