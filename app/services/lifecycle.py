"""Every status change of experiments and runs happens here, and nowhere else.

An experiment is one candidate train.py and the verdict on it; a run is one training of it
on one GPU (one attempt of one replicate). The API, the training task, the sweep, task-failure
recovery, worker start-up and shutdown, and the seed's manual mode all call these functions.

Each move is one conditional UPDATE: on the status it leaves (from the transition tables
below) and, for a run a worker holds, on its lease token. Zero rows means someone else got
there first (a cancel, a sweep, a newer attempt): that is an answer, not an error, and the
caller drops what it wanted to write. Locks are taken tag, then experiment, then its runs, then
GPU rows, and a transaction that ends runs of several experiments takes them in tag order:
taken in any other order, two transactions (the sweep and a restarting worker, say) can
deadlock. Locked reads re-read (populate_existing), so two decisions on one tag never
interleave and a stale object in the session never decides twice.

Liveness is the run's lease: the worker that claims a run holds it under its incarnation's
token and renews it from its parent process; the sweep expires leases that were not renewed,
and a worker that starts again under the same GPU id gives up its previous incarnation's
runs at once. A lost run is queued again as a new attempt (a new row), fails after
MAX_ATTEMPTS, or ends cancelled when a cancel was asked for. A clean shutdown hands its run
back without charging an attempt.
"""

from __future__ import annotations

import json
import math
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from pydantic import ValidationError
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.models import (
    BASELINE,
    CANCELLED,
    CONFIRM,
    CONFIRMING,
    CRASH,
    DISCARD,
    FINISHED,
    FINISHED_STATUSES,
    FIRST,
    IDLE,
    KEEP,
    LIVE_RUN_STATUSES,
    LIVE_STATUSES,
    LOST,
    PRUNED,
    QUEUED,
    RELEASED,
    RUNNING,
    SCORED_BY_AGENT,
    SCORED_BY_WORKER,
    TIMEOUT,
    TRAINING,
    WORKER_GPU,
    Experiment,
    Gpu,
    Run,
    Tag,
)
from app.schemas import RunMetrics
from app.services import pruning, verdicts

# Which status each status may move to. Experiments: queued until a run trains, running while
# the first runs train (back to queued when one is lost and waits again), confirming while
# confirmation runs decide, then final. Runs: queued, running, then one final state.
EXPERIMENT_MOVES: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CONFIRMING, *FINISHED_STATUSES}),
    RUNNING: frozenset({QUEUED, CONFIRMING, *FINISHED_STATUSES}),
    CONFIRMING: frozenset({CONFIRMING, *FINISHED_STATUSES}) - {PRUNED},
}
RUN_MOVES: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED}),
    # Back to QUEUED only while staged, before it had its GPU (unstage_for_idle).
    RUNNING: frozenset({FINISHED, CRASH, TIMEOUT, CANCELLED, LOST, RELEASED, PRUNED, QUEUED}),
}

# A run lost with its worker is queued again this many times in all (per replicate), then the
# experiment is recorded as a crash: a train.py that takes its worker down must not take down
# every worker in turn.
MAX_ATTEMPTS = 3
SEED_RANGE = 2**31 - 1  # seeds fit Postgres INTEGER and every RNG train.py may feed them to

# Queues: the shared `train` queue; `confirm`, which every worker drains before `train`, so
# confirmation runs go ahead of new experiments; and one queue per GPU for pinned runs.
TRAIN_QUEUE, CONFIRM_QUEUE = "train", "confirm"


# A staged run holds for its GPU in prepare's training loader (workers/runner.py, stage_training).
STAGING_HOLD = "make_dataloader"


def gpu_queue(gpu_id: str) -> str:
    return f"gpu.{gpu_id}"


def worker_queues(gpu_id: str) -> list[str]:
    """The queues a GPU worker consumes, in the order it drains them (and, added when it starts,
    the queue of its setup: setup_queue)."""
    return [gpu_queue(gpu_id), CONFIRM_QUEUE, TRAIN_QUEUE]


def setup_queue(fingerprint_digest: str) -> str:
    """Runs a worker of another setup refused go here; every worker of this setup consumes it."""
    return f"setup.{fingerprint_digest}"


@dataclass(frozen=True)
class Dispatch:
    """A training message to send once the transaction that made it has committed."""

    run_id: str
    task_id: str
    queue: str


@dataclass(frozen=True)
class Holder:
    """A worker incarnation: the GPU it trains on and the token its leases carry."""

    gpu_id: str
    token: str
    gpu_index: int | None = None
    gpu_model: str = ""
    host: str = ""
    # The setup it scores with (workers.fingerprint); a tag trains only on workers that match
    # the fingerprint of its first run.
    fingerprint: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Policy:
    """The decision constants, from configuration."""

    near_miss_threshold: float = 0.002
    max_consecutive_crashes: int = 3
    verdict_policy: str = "single"
    baseline_runs: int = 1
    lease_s: float = 60.0

    @classmethod
    def from_settings(cls, settings) -> Policy:
        return cls(settings.near_miss_threshold, settings.max_consecutive_crashes, settings.verdict_policy,
                   settings.baseline_runs, settings.stale_after)


@dataclass
class Outcome:
    """What became of a run and what to send: the verdict when one was reached."""

    status: str
    experiment_status: str | None = None
    verdict: dict | None = None
    dispatches: list[Dispatch] = field(default_factory=list)


# ---------------------------------------------------------------------------
# The two moves everything else is built from


def _sources(moves: dict[str, frozenset[str]], to: str, allowed: Iterable[str] | None) -> list[str]:
    sources = [status for status, targets in moves.items() if to in targets]
    return [s for s in sources if s in allowed] if allowed is not None else sources


def move_experiment(session: Session, experiment_id: str, to: str, *, only_from: Iterable[str] | None = None,
                    **values) -> bool:
    """Move an experiment to `to` if its status allows it; True if it moved."""
    row = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status.in_(_sources(EXPERIMENT_MOVES, to, only_from)))
        .values(status=to, **values)
        .returning(Experiment.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return row is not None


def move_run(session: Session, run_id: str, to: str, *, token: str | None = None,
             only_from: Iterable[str] | None = None, lease_expired: bool = False, **values) -> bool:
    """Move a run to `to` if its status allows it and, with `token`, only while that lease holds
    it; with `lease_expired`, only if its lease has not been renewed meanwhile."""
    where = [Run.id == run_id, Run.status.in_(_sources(RUN_MOVES, to, only_from))]
    if token is not None:
        where.append(Run.lease_token == token)
    if lease_expired:
        where.append(Run.lease_expires_at < func.now())
    row = session.execute(
        update(Run).where(*where).values(status=to, **values).returning(Run.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return row is not None


def _locked_experiment(session: Session, experiment_id: str) -> tuple[Tag, Experiment]:
    """Tag, then experiment, both locked and re-read."""
    tag_name = session.scalar(select(Experiment.tag).where(Experiment.id == experiment_id))
    if tag_name is None:
        raise NotFound(f"Experiment {experiment_id} not found", fields={"experiment_id": experiment_id})
    tag = session.scalars(select(Tag).where(Tag.name == tag_name).with_for_update()
                          .execution_options(populate_existing=True)).one()
    experiment = session.scalars(select(Experiment).where(Experiment.id == experiment_id).with_for_update()
                                 .execution_options(populate_existing=True)).one()
    return tag, experiment


def runs_of(session: Session, experiment_id: str) -> list[Run]:
    """The experiment's runs, re-read (callers hold the experiment's lock, so they are current)."""
    query = select(Run).where(Run.experiment_id == experiment_id).order_by(Run.replicate, Run.attempt, Run.queued_at)
    return list(session.scalars(query.execution_options(populate_existing=True)))


# ---------------------------------------------------------------------------
# Creating runs


def _new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:20]}"


def new_seed(taken: Iterable[int] = ()) -> int:
    taken = set(taken)
    while True:
        seed = 1 + secrets.randbelow(SEED_RANGE)
        if seed not in taken:
            return seed


def queue_run(session: Session, experiment: Experiment, *, replicate: int, purpose: str, seed: int,
              attempt: int = 1, queue: str | None = None) -> Dispatch:
    """A new queued run and the message that will start it."""
    queue = queue or (gpu_queue(experiment.pinned_gpu_id) if experiment.pinned_gpu_id else TRAIN_QUEUE)
    run = Run(id=_new_run_id(), experiment_id=experiment.id, replicate=replicate, attempt=attempt, purpose=purpose,
              seed=seed, status=QUEUED, scored_by=SCORED_BY_WORKER, task_id=str(uuid.uuid4()), queue=queue)
    session.add(run)
    session.flush()
    return Dispatch(run.id, run.task_id, queue)


def queue_experiment(session: Session, experiment: Experiment, *, first_of_tag: bool, policy: Policy) -> list[Dispatch]:
    """The runs a submitted experiment starts with: BASELINE_RUNS replicates for a tag's first
    experiment (they measure the noise floor), else one; `single`, the seed's policy, runs once."""
    replicated = first_of_tag and policy.verdict_policy != verdicts.SINGLE
    count = max(1, policy.baseline_runs) if replicated else 1
    purpose = BASELINE if first_of_tag and count > 1 else FIRST
    seeds: list[int] = []
    dispatches = []
    for replicate in range(count):
        seeds.append(new_seed(seeds))
        dispatches.append(queue_run(session, experiment, replicate=replicate, purpose=purpose, seed=seeds[-1]))
    return dispatches


def start_manual_run(session: Session, experiment: Experiment, *, gpu_id: str | None) -> Run:
    """The seed's manual mode: the agent trains the experiment itself and reports the numbers."""
    run = Run(id=_new_run_id(), experiment_id=experiment.id, replicate=0, attempt=1, purpose=FIRST, seed=new_seed(),
              status=RUNNING, scored_by=SCORED_BY_AGENT, gpu_id=gpu_id, claimed_at=func.now())
    session.add(run)
    session.flush()
    return run


def resend(session: Session, run_id: str) -> Dispatch | None:
    """A queued (or staged) run whose message the broker lost gets a new message id; the old one,
    should it come back, still finds the run queued and only one of the two can claim it."""
    row = session.execute(
        update(Run).where(Run.id == run_id, Run.status.in_([QUEUED, RUNNING]))
        .values(task_id=str(uuid.uuid4())).returning(Run.task_id, Run.queue, Run.status, Run.lease_holder)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        return None
    # A staged run's message goes to the worker that staged it (stage_next).
    return Dispatch(run_id, row.task_id, gpu_queue(row.lease_holder) if row.status == RUNNING else row.queue)


# ---------------------------------------------------------------------------
# A worker trains a run


@dataclass(frozen=True)
class Claim:
    run_id: str
    experiment_id: str
    attempt: int
    seed: int
    tag: str
    profile: str
    train_py: str


class SetupMismatch(Exception):
    """The worker's setup differs from the one the run's tag is pinned to."""

    def __init__(self, pinned: dict, mine: dict):
        self.pinned = pinned
        self.differences = sorted(k for k in set(pinned) | set(mine) if pinned.get(k) != mine.get(k))
        super().__init__(f"this worker's {', '.join(self.differences)} differ(s) from the tag's pinned setup")


def refuse(session: Session, *, run_id: str, holder: Holder, queue: str, reason: str) -> Dispatch | None:
    """A worker of another setup leaves the run queued, says why in the run, and sends it to the
    queue of the setup the tag is pinned to, where only matching workers take it."""
    row = session.execute(
        update(Run).where(Run.id == run_id, Run.status == QUEUED)
        .values(task_id=str(uuid.uuid4()), queue=queue, error=f"refused by {holder.gpu_id}: {reason}")
        .returning(Run.task_id).execution_options(synchronize_session=False)
    ).one_or_none()
    return Dispatch(run_id, row.task_id, queue) if row else None


class Draining(Exception):
    """The worker left the pool (it is shutting down) and must not take a run: the message goes
    back to the queue for another worker."""


def claim(session: Session, *, run_id: str, holder: Holder, lease_s: float, staged: bool = False) -> Claim | None:
    """Take a queued run under a lease. A redelivered or duplicate message, or one for a run that
    was cancelled or superseded, finds nothing to take and never trains anything. Only a worker
    registered in the pool takes runs: one that deregistered to shut down raises Draining. The
    tag's first claim pins the worker's setup to the tag; a worker of another setup raises
    SetupMismatch and leaves the run queued. A `staged` claim (stage_next) takes the run while
    the GPU still trains another: it gets the GPU when the worker hands it over (take_staged)."""
    experiment_id = session.scalar(select(Run.experiment_id).where(Run.id == run_id))
    if experiment_id is not None:
        # In lock order, before the run's row; the tag's lock also makes two first claims from
        # different setups take turns, and the second compares with what the first pinned.
        _locked_experiment(session, experiment_id)
    session.execute(text(
        """
        UPDATE tags t SET fingerprint = CAST(:fingerprint AS json)
        FROM experiments e JOIN runs r ON r.experiment_id = e.id
        WHERE r.id = :run_id AND t.name = e.tag AND t.fingerprint IS NULL
        """
    ), {"fingerprint": json.dumps(holder.fingerprint), "run_id": run_id})
    row = session.execute(
        text(
            """
            UPDATE runs r SET status = :running, lease_holder = :gpu_id, lease_token = :token,
                   lease_expires_at = now() + make_interval(secs => :lease_s), claimed_at = now(),
                   gpu_granted_at = CASE WHEN :staged THEN NULL ELSE now() END, gpu_id = :gpu_id, gpu_index = :gpu_index, gpu_model = :gpu_model, host = :host,
                   fingerprint = CAST(:fingerprint AS json), error = NULL
            FROM experiments e JOIN tags t ON t.name = e.tag
            WHERE r.id = :run_id AND r.status = :queued AND e.id = r.experiment_id AND NOT e.cancel_requested
                  AND e.status = ANY(:live) AND t.fingerprint::jsonb = CAST(:fingerprint AS jsonb)
                  AND EXISTS (SELECT 1 FROM gpus g WHERE g.id = :gpu_id AND g.kind = :worker_gpu)
            RETURNING r.id, r.experiment_id, r.attempt, r.seed, e.tag, t.profile, e.train_py
            """
        ),
        {"running": RUNNING, "queued": QUEUED, "gpu_id": holder.gpu_id, "gpu_index": holder.gpu_index,
         "token": holder.token,
         "gpu_model": holder.gpu_model, "host": holder.host, "lease_s": lease_s, "run_id": run_id,
         "live": list(LIVE_STATUSES), "worker_gpu": WORKER_GPU, "fingerprint": json.dumps(holder.fingerprint),
         "staged": staged},
    ).one_or_none()
    if row is None:
        if session.get(Gpu, holder.gpu_id) is None:
            raise Draining(f"{holder.gpu_id} is not in the pool (shutting down); the run stays queued")
        pinned = session.scalar(select(Tag.fingerprint).join(Experiment, Experiment.tag == Tag.name)
                                .join(Run, Run.experiment_id == Experiment.id).where(Run.id == run_id,
                                                                                     Run.status == QUEUED))
        if pinned is not None and pinned != holder.fingerprint:
            raise SetupMismatch(pinned, holder.fingerprint)
        return None
    move_experiment(session, row.experiment_id, RUNNING, only_from=[QUEUED],
                    started_at=func.coalesce(Experiment.started_at, func.now()))
    if not staged:
        _gpu_busy(session, holder.gpu_id, experiment_id=row.experiment_id, run_id=row.id)
    return Claim(row.id, row.experiment_id, row.attempt, row.seed, row.tag, row.profile, row.train_py)


def stage_next(session: Session, *, holder: Holder, lease_s: float, queues: list[str]) -> tuple[Claim, Dispatch] | None:
    """Claim, staged, the run this worker would take next from `queues` (in the order it drains
    them, oldest first), while its GPU still trains the current one. Only a train.py that calls
    STAGING_HOLD can be held until its turn, so no other is staged. A run on a shared queue is
    left for another worker while one is idle (and given back when one becomes idle:
    unstage_for_idle). The staged run gets a new message on the worker's own queue, which it
    drains first, so that it comes back to this worker; the message it had finds the run claimed
    wherever it is delivered. Its `queue` stays: given back, it goes where it came from."""
    candidate = session.execute(text(
        """
        SELECT r.id, r.queue FROM runs r JOIN experiments e ON e.id = r.experiment_id JOIN tags t ON t.name = e.tag
        WHERE r.status = :queued AND r.queue = ANY(:queues) AND NOT e.cancel_requested AND e.status = ANY(:live)
              AND strpos(e.train_py, :holds) > 0
              AND (t.fingerprint IS NULL OR t.fingerprint::jsonb = CAST(:fingerprint AS jsonb))
        ORDER BY array_position(CAST(:queues AS text[]), CAST(r.queue AS text)), r.queued_at
        LIMIT 1
        """
    ), {"queued": QUEUED, "queues": queues, "live": list(LIVE_STATUSES), "holds": STAGING_HOLD,
        "fingerprint": json.dumps(holder.fingerprint)}).one_or_none()
    if candidate is None or _another_worker_may_take(session, holder, candidate.queue):
        return None
    run_id = candidate.id
    try:
        staged = claim(session, run_id=run_id, holder=holder, lease_s=lease_s, staged=True)
    except (SetupMismatch, Draining):  # pinned since the look to another setup; or this worker is leaving
        return None
    if staged is None:
        return None
    task_id = session.execute(update(Run).where(Run.id == run_id).values(task_id=str(uuid.uuid4()))
                              .returning(Run.task_id).execution_options(synchronize_session=False)).scalar_one()
    return staged, Dispatch(run_id, task_id, gpu_queue(holder.gpu_id))


def _another_worker_may_take(session: Session, holder: Holder, queue: str) -> bool:
    """A run on a shared queue is another worker's to take at once while one is idle."""
    return queue != gpu_queue(holder.gpu_id) and bool(session.scalar(select(func.count()).select_from(Gpu).where(
        Gpu.kind == WORKER_GPU, Gpu.status == IDLE, Gpu.id != holder.gpu_id)))


def unstage_for_idle(session: Session, *, run_id: str, holder: Holder) -> Dispatch | None:
    """Give a staged run back to its queue, with a new message, once another worker is idle:
    that worker trains it now rather than after this worker's current run. None while it stays."""
    experiment_id = session.scalar(select(Run.experiment_id).where(Run.id == run_id))
    if experiment_id is None:
        return None
    _locked_experiment(session, experiment_id)
    queue = session.scalar(select(Run.queue).where(Run.id == run_id))
    if not _another_worker_may_take(session, holder, queue):
        return None
    row = session.execute(
        update(Run).where(Run.id == run_id, Run.status.in_(_sources(RUN_MOVES, QUEUED, [RUNNING])),
                          Run.lease_token == holder.token, Run.gpu_granted_at.is_(None))
        .values(status=QUEUED, lease_holder=None, lease_token=None, lease_expires_at=None, claimed_at=None,
                gpu_id=None, gpu_index=None, gpu_model=None, host=None, task_id=str(uuid.uuid4()))
        .returning(Run.task_id).execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        return None
    if not _any_running(session, experiment_id):
        move_experiment(session, experiment_id, QUEUED, only_from=[RUNNING])
    return Dispatch(run_id, row.task_id, queue)


def take_staged(session: Session, *, run_id: str, holder: Holder, staging: dict | None) -> Claim | None:
    """Hand the GPU to a run this incarnation staged (stage_next); None if it holds no such run
    (it was lost meanwhile, or is already on the GPU); a cancel asked for meanwhile is the
    caller's to carry out. `staging` is what the run's record keeps of how it was staged."""
    experiment_id = session.scalar(select(Run.experiment_id).where(Run.id == run_id))
    if experiment_id is None:
        return None
    _locked_experiment(session, experiment_id)
    row = session.execute(text(
        """
        UPDATE runs r SET gpu_granted_at = now(), staging = CAST(:staging AS json)
        FROM experiments e JOIN tags t ON t.name = e.tag
        WHERE r.id = :run_id AND r.status = :running AND r.lease_token = :token AND r.gpu_granted_at IS NULL
              AND e.id = r.experiment_id
        RETURNING r.id, r.experiment_id, r.attempt, r.seed, e.tag, t.profile, e.train_py
        """
    ), {"run_id": run_id, "running": RUNNING, "token": holder.token,
        "staging": None if staging is None else json.dumps(staging)}).one_or_none()
    if row is None:
        return None
    _gpu_busy(session, holder.gpu_id, experiment_id=row.experiment_id, run_id=row.id)
    return Claim(row.id, row.experiment_id, row.attempt, row.seed, row.tag, row.profile, row.train_py)


def _gpu_busy(session: Session, gpu_id: str | None, *, experiment_id: str | None, run_id: str | None) -> None:
    """What the GPU row shows: the run it trains, or idle. Display only; liveness is the lease."""
    if gpu_id is None:
        return
    session.execute(
        update(Gpu).where(Gpu.id == gpu_id, Gpu.kind == WORKER_GPU)
        .values(status=TRAINING if run_id else IDLE, current_experiment_id=experiment_id, current_run_id=run_id,
                last_heartbeat=func.now())
        .execution_options(synchronize_session=False)
    )


def _gpu_idle_unless_busy(session: Session, gpu_id: str | None, run_id: str) -> None:
    """The GPU goes idle, unless it has already moved on to another run."""
    if gpu_id is None:
        return
    session.execute(
        update(Gpu).where(Gpu.id == gpu_id, Gpu.current_run_id == run_id)
        .values(status=IDLE, current_experiment_id=None, current_run_id=None)
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True)
class Standing:
    """What a worker learns when it reports progress: whether the run is still its own, whether
    a cancel was asked for, and (tags that opted in to early stopping) why to stop it as pruned."""

    held: bool
    cancel_requested: bool
    prune: str | None = None


def report_progress(session: Session, *, run_id: str, token: str, progress: dict | None,
                    log_tail: str | None = None) -> Standing:
    """While the lease holds the run: store its log tail and, when there is new progress, the
    progress, appended to the run's curve. Tells the worker whether to go on."""
    point = None if progress is None else json.dumps(
        {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in progress.items()})
    row = session.execute(text(
        """
        UPDATE runs SET log_tail = COALESCE(:log_tail, log_tail),
               progress = COALESCE(CAST(:point AS json), progress),
               curve = CASE WHEN :point IS NULL THEN curve
                            ELSE (COALESCE(curve::jsonb, '[]'::jsonb) || jsonb_build_array(CAST(:point AS jsonb)))::json
                       END,
               training_started_at = CASE WHEN :point IS NULL THEN training_started_at
                                          ELSE COALESCE(training_started_at, now()) END
        WHERE id = :run_id AND status = :running AND lease_token = :token
        RETURNING experiment_id
        """
    ), {"point": point, "log_tail": log_tail, "run_id": run_id, "running": RUNNING, "token": token}).one_or_none()
    if row is None:
        return Standing(held=False, cancel_requested=False)
    cancel = session.scalar(select(Experiment.cancel_requested).where(Experiment.id == row.experiment_id))
    prune = _prune_reason(session, run_id) if point is not None else None
    return Standing(held=True, cancel_requested=bool(cancel), prune=prune)


def _prune_reason(session: Session, run_id: str) -> str | None:
    """Why to stop a run early, if its tag opted in and its curve is clearly worse than the best's
    runs' curves at the same progress. Only a first run is judged: baselines have nothing to be
    compared with, and a confirmation run is one the first run earned."""
    run = session.scalars(select(Run).where(Run.id == run_id).execution_options(populate_existing=True)).one()
    tag = session.scalars(select(Tag).join(Experiment, Experiment.tag == Tag.name)
                          .where(Experiment.id == run.experiment_id)).one()
    if not tag.early_stopping or run.purpose != FIRST or tag.best_experiment_id is None:
        return None
    best = session.scalars(select(Run.curve).where(
        Run.experiment_id == tag.best_experiment_id, Run.status == FINISHED, Run.curve.is_not(None),
        Run.gpu_model == run.gpu_model)).all()
    verdict = pruning.should_prune(run.curve or [], best, pruning.DEFAULT_RULE)
    return verdict.reason if verdict else None


def renew_leases(session: Session, *, holder: Holder, lease_s: float) -> list[str]:
    """The worker's parent renews every run its incarnation holds; returns their ids."""
    return list(session.scalars(
        update(Run).where(Run.lease_holder == holder.gpu_id, Run.lease_token == holder.token, Run.status == RUNNING)
        .values(lease_expires_at=func.now() + timedelta(seconds=lease_s)).returning(Run.id)
        .execution_options(synchronize_session=False)
    ))


def held_runs(session: Session, *, holder: Holder, earlier: bool = False) -> list[str]:
    """The running runs under this GPU id that this incarnation holds (or, `earlier`, that an
    earlier one did); in lock order, for the caller that ends them all in one transaction."""
    token = Run.lease_token != holder.token if earlier else Run.lease_token == holder.token
    return list(session.scalars(_in_lock_order(select(Run.id).where(
        Run.lease_holder == holder.gpu_id, token, Run.status == RUNNING))))


def _in_lock_order(runs_query):
    return runs_query.join(Experiment, Experiment.id == Run.experiment_id).order_by(Experiment.tag, Experiment.id)


# ---------------------------------------------------------------------------
# A run ends


@dataclass(frozen=True)
class RunReport:
    """How a training ended, as the worker (or the agent, in manual mode) saw it."""

    status: str  # FINISHED, CRASH, TIMEOUT, CANCELLED or PRUNED
    metrics: dict | None = None  # the summary block, validated, for FINISHED
    error: str | None = None
    log_tail: str | None = None


RUN_METRICS = ("profile", "val_bpb", "reported_val_bpb", "training_seconds", "total_seconds", "peak_vram_mb",
               "mfu_percent", "total_tokens_m", "num_steps", "num_params_m", "depth", "scoring", "score_mismatch",
               "compile_seconds")


def finish_run(session: Session, *, run_id: str, token: str | None, report: RunReport, policy: Policy) -> Outcome:
    """Record how a run ended and settle its experiment. Conditional on the lease (a superseded
    attempt records nothing: Conflict) and on the run still running (recorded once)."""
    experiment_id = session.scalar(select(Run.experiment_id).where(Run.id == run_id))
    if experiment_id is None:
        raise Conflict(f"run {run_id} does not exist", fields={"run_id": run_id})
    tag, experiment = _locked_experiment(session, experiment_id)
    if report.status == FINISHED:
        report = _checked(report)
    values = {name: (report.metrics or {}).get(name) for name in RUN_METRICS if (report.metrics or {}).get(name)
              is not None}
    moved = move_run(session, run_id, report.status, token=token, only_from=[RUNNING], error=report.error,
                     log_tail=report.log_tail, finished_at=func.clock_timestamp(), lease_expires_at=None, **values)
    if not moved:
        raise Conflict(f"run {run_id} of experiment {experiment_id} is no longer running under this lease",
                       fields={"experiment_id": experiment_id, "run_id": run_id})
    gpu_id = session.scalar(select(Run.gpu_id).where(Run.id == run_id))
    _gpu_idle_unless_busy(session, gpu_id, run_id)
    return _settle(session, tag, experiment, policy)


def _checked(report: RunReport) -> RunReport:
    """A summary that breaks the API's rules for metrics (a negative or missing val_bpb, say)
    is a crash, whoever reported it: it must never become an unbeatable best."""
    try:
        metrics = RunMetrics.model_validate(report.metrics or {}).model_dump(exclude_none=True)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) or "summary" for err in exc.errors())
        return RunReport(CRASH, error=f"invalid summary block: {fields} ({exc.errors()[0]['msg']})",
                         log_tail=report.log_tail)
    return RunReport(FINISHED, metrics={**(report.metrics or {}), **metrics}, log_tail=report.log_tail)


def lose_run(session: Session, *, run_id: str, reason: str, policy: Policy, token: str | None = None,
             charge: bool = True, lease_expired: bool = False) -> Outcome:
    """The run's holder went away (lease expired, worker restarted, task died), or handed it back
    (charge=False). The attempt ends; the run is queued again as a new attempt, or the
    experiment ends cancelled (a cancel was asked for) or crashed (MAX_ATTEMPTS lost)."""
    experiment_id = session.scalar(select(Run.experiment_id).where(Run.id == run_id))
    if experiment_id is None:
        return Outcome(status="missing")
    tag, experiment = _locked_experiment(session, experiment_id)
    run = session.scalars(select(Run).where(Run.id == run_id).execution_options(populate_existing=True)).one()
    # A run whose cancel was asked for is cancelled, whoever ends it; else lost or handed back.
    ended = CANCELLED if experiment.cancel_requested else LOST if charge else RELEASED
    if not move_run(session, run_id, ended, token=token, only_from=[RUNNING], lease_expired=lease_expired,
                    error=reason, finished_at=func.clock_timestamp(), lease_expires_at=None):
        return Outcome(status="unchanged")
    _gpu_idle_unless_busy(session, run.gpu_id, run_id)
    if experiment.cancel_requested or experiment.status not in LIVE_STATUSES:
        return _settle(session, tag, experiment, policy)
    attempt = run.attempt + 1 if charge else run.attempt
    if charge and run.attempt >= MAX_ATTEMPTS:
        return _fail(session, tag, experiment, policy, status=CRASH,
                     error=f"{reason}; lost {run.attempt} times, not retried")
    dispatch = queue_run(session, experiment, replicate=run.replicate, purpose=run.purpose, seed=run.seed,
                         attempt=attempt, queue=run.queue)
    if experiment.status == RUNNING and not _any_running(session, experiment.id):
        move_experiment(session, experiment.id, QUEUED, only_from=[RUNNING])
    return Outcome(status=ended, experiment_status=experiment.status, dispatches=[dispatch])


def _any_running(session: Session, experiment_id: str) -> bool:
    return bool(session.scalar(select(func.count()).select_from(Run).where(
        Run.experiment_id == experiment_id, Run.status == RUNNING)))


def expire_leases(session: Session, *, policy: Policy) -> list[Outcome]:
    """The sweep: every run whose lease ran out is lost. Not within one lease of a Postgres
    start: while the database was down no lease could be renewed. The runs are read unlocked
    (lose_run locks in lock order) and lost only if their lease is still expired then."""
    expired = session.scalars(_in_lock_order(
        select(Run.id).where(
            Run.status == RUNNING, Run.lease_expires_at < func.now(),
            func.pg_postmaster_start_time() < func.now() - timedelta(seconds=policy.lease_s),
        ))
    ).all()
    return [lose_run(session, run_id=run_id, reason="its lease expired (the worker went silent)", policy=policy,
                     lease_expired=True) for run_id in expired]


def release_previous_incarnation(session: Session, *, holder: Holder, policy: Policy) -> list[Outcome]:
    """A worker starting under a GPU id gives up what an earlier process of that id held: that
    process is gone (it did not hand its runs back), so they are lost, now rather than later."""
    return [lose_run(session, run_id=run_id, policy=policy, reason=f"worker {holder.gpu_id} restarted while training it")
            for run_id in held_runs(session, holder=holder, earlier=True)]


# ---------------------------------------------------------------------------
# Cancelling


def request_cancel(session: Session, *, experiment_id: str, policy: Policy, reason: str = "cancelled on request"
                   ) -> Outcome:
    """Queued runs are cancelled at once; a running one is flagged, and its worker kills the
    training within a poll and records the cancellation (or, if the worker is gone, the sweep
    does when the lease runs out). With nothing running the experiment ends cancelled now."""
    tag, experiment = _locked_experiment(session, experiment_id)
    if experiment.status not in LIVE_STATUSES:
        raise Conflict(f"Experiment {experiment.id} already finished with status '{experiment.status}'",
                       fields={"experiment_id": experiment.id})
    session.execute(update(Experiment).where(Experiment.id == experiment_id)
                    .values(cancel_requested=True, error=reason).execution_options(synchronize_session=False))
    experiment.cancel_requested = True
    for run in runs_of(session, experiment_id):
        if run.status == QUEUED:
            move_run(session, run.id, CANCELLED, only_from=[QUEUED], error=f"{reason} (while queued)",
                     finished_at=func.clock_timestamp())
    if experiment.dispatched:
        return _settle(session, tag, experiment, policy)
    # Manual mode: nobody else will end the agent's own run.
    for run in runs_of(session, experiment_id):
        move_run(session, run.id, CANCELLED, only_from=[RUNNING], error="cancelled", finished_at=func.clock_timestamp())
    return _settle(session, tag, experiment, policy)


# ---------------------------------------------------------------------------
# Settling an experiment once its runs say enough


def _settle(session: Session, tag: Tag, experiment: Experiment, policy: Policy) -> Outcome:
    """Called with tag and experiment locked whenever one of its runs ended."""
    runs = runs_of(session, experiment.id)
    if experiment.status not in LIVE_STATUSES:
        return Outcome(status=experiment.status, experiment_status=experiment.status)
    failed = [r for r in runs if r.status in (CRASH, TIMEOUT)]
    if failed:
        worst = failed[-1]
        return _fail(session, tag, experiment, policy, status=worst.status, error=worst.error or worst.status)
    live = [r for r in runs if r.status in LIVE_RUN_STATUSES]
    finished = [r for r in runs if r.status == FINISHED]
    if experiment.cancel_requested:
        if live:
            return Outcome(status="cancelling", experiment_status=experiment.status)
        move_experiment(session, experiment.id, CANCELLED, finished_at=func.clock_timestamp())
        return Outcome(status=CANCELLED, experiment_status=CANCELLED)
    if any(r.status == PRUNED for r in runs):
        return _prune(session, tag, experiment, runs)
    if live:
        return Outcome(status="pending", experiment_status=experiment.status)
    if not finished:
        move_experiment(session, experiment.id, CANCELLED, error="no run finished", finished_at=func.clock_timestamp())
        return Outcome(status=CANCELLED, experiment_status=CANCELLED)
    return _decide(session, tag, experiment, finished, policy)


def _best_values(session: Session, tag: Tag, experiment: Experiment, gpu_model: str | None) -> list[float] | None:
    """The best's finished runs, on the candidate's GPU model when it has any there: a faster
    GPU must not win a verdict under a wall-clock budget by speed alone."""
    if tag.best_experiment_id is None or tag.best_experiment_id == experiment.id:
        return None
    rows = session.execute(select(Run.val_bpb, Run.gpu_model).where(
        Run.experiment_id == tag.best_experiment_id, Run.status == FINISHED, Run.val_bpb.is_not(None))).all()
    same_model = [r.val_bpb for r in rows if r.gpu_model == gpu_model]
    return same_model or [r.val_bpb for r in rows] or [tag.best_val_bpb]


def noise_floor(session: Session, *, tag: str) -> dict:
    """Pooled run-to-run stdev of val_bpb over the tag's experiments with two or more finished
    runs, over all and per GPU model (experiments, of any verdict, replicate the same source)."""
    rows = session.execute(
        select(Run.experiment_id, Run.gpu_model, Run.val_bpb).join(Experiment, Experiment.id == Run.experiment_id)
        .where(Experiment.tag == tag, Run.status == FINISHED, Run.val_bpb.is_not(None))
    ).all()
    by_model: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        by_model.setdefault(row.gpu_model or "unknown", {}).setdefault(row.experiment_id, []).append(row.val_bpb)
    groups = [values for experiments in by_model.values() for values in experiments.values()]
    sigma, runs = verdicts.pooled_sigma(groups)
    models = {}
    for model, experiments in by_model.items():
        model_sigma, model_runs = verdicts.pooled_sigma(experiments.values())
        models[model] = {"sigma": model_sigma, "runs": model_runs}
    return {"sigma": sigma, "runs": runs, "by_gpu_model": models}


def _decide(session: Session, tag: Tag, experiment: Experiment, finished: list[Run], policy: Policy) -> Outcome:
    values = [r.val_bpb for r in finished]
    gpu_model = finished[-1].gpu_model
    noise = noise_floor(session, tag=tag.name)
    sigma = (noise["by_gpu_model"].get(gpu_model or "unknown") or {}).get("sigma") or noise["sigma"]
    best = _best_values(session, tag, experiment, gpu_model)
    verdict = verdicts.decide(values, best, sigma=sigma, policy=policy.verdict_policy,
                              baseline_runs=policy.baseline_runs)
    action = verdict.action
    if action == verdicts.CONFIRM:
        if experiment.dispatched:
            return _confirm(session, experiment, finished)
        # Manual mode cannot be asked for more runs: the seed's rule decides.
        action = KEEP if best is None or verdict.estimate < verdict.best else DISCARD
    return _conclude(session, tag, experiment, finished, verdict, action, policy)


def _confirm(session: Session, experiment: Experiment, finished: list[Run]) -> Outcome:
    """One more run of the candidate, ahead of new experiments, on another GPU when one is idle."""
    runs = runs_of(session, experiment.id)
    used = {r.gpu_id for r in finished}
    other_idle = session.scalar(
        select(Gpu.id).where(Gpu.kind == WORKER_GPU, Gpu.status == IDLE, Gpu.id.not_in(used)).order_by(Gpu.id).limit(1)
    ) if not experiment.pinned_gpu_id else None
    queue = gpu_queue(other_idle) if other_idle else (
        gpu_queue(experiment.pinned_gpu_id) if experiment.pinned_gpu_id else CONFIRM_QUEUE)
    dispatch = queue_run(session, experiment, replicate=max(r.replicate for r in runs) + 1, purpose=CONFIRM,
                         seed=new_seed(r.seed for r in runs), queue=queue)
    move_experiment(session, experiment.id, CONFIRMING, **_summary(finished))
    return Outcome(status=CONFIRMING, experiment_status=CONFIRMING, dispatches=[dispatch])


def _summary(finished: list[Run]) -> dict:
    """The experiment's metrics from its finished runs: the mean of each, the last profile."""
    summary: dict = {"profile": finished[-1].profile}
    for name in ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_m",
                 "num_params_m", "num_steps", "depth"):
        values = [getattr(r, name) for r in finished if getattr(r, name) is not None]
        if values:
            mean = sum(values) / len(values)
            summary[name] = round(mean) if name in ("num_steps", "depth") else mean
    return summary


def _conclude(session: Session, tag: Tag, experiment: Experiment, finished: list[Run], verdict, action: str,
              policy: Policy) -> Outcome:
    improved = action == KEEP
    near_miss = (not improved) and verdict.best is not None and verdict.delta > -policy.near_miss_threshold
    summary = _summary(finished)
    # clock_timestamp, not now(): now() is when the transaction began, before it waited for the
    # tag lock; the time of the decision orders results the way they were decided.
    moved = move_experiment(session, experiment.id, action, delta=verdict.delta, near_miss=near_miss,
                            sigma=verdict.sigma, z=verdict.z, finished_at=func.clock_timestamp(), **summary)
    if not moved:
        raise Conflict(f"Experiment {experiment.id} was decided meanwhile", fields={"experiment_id": experiment.id})
    tag.total_experiments += 1
    tag.consecutive_crashes = 0
    if improved:
        tag.kept_experiments += 1
        tag.best_val_bpb = verdict.estimate
        tag.best_experiment_id = experiment.id
    else:
        tag.discarded_experiments += 1
    session.flush()
    return Outcome(status=action, experiment_status=action, verdict={
        "experiment_id": experiment.id,
        "status": action,
        "val_bpb": verdict.estimate,
        "improved": improved,
        "delta": verdict.delta,
        "best_val_bpb": tag.best_val_bpb,
        "near_miss": near_miss,
        "action": "keep_commit" if improved else "git_reset",
        "sigma": verdict.sigma,
        "z": verdict.z,
        "runs": verdict.runs,
        "best_runs": verdict.best_runs,
    })


def _fail(session: Session, tag: Tag, experiment: Experiment, policy: Policy, *, status: str, error: str) -> Outcome:
    """A crash or timeout: the experiment's other runs are called off and the crash counts."""
    for run in runs_of(session, experiment.id):
        if run.status == QUEUED:
            move_run(session, run.id, CANCELLED, only_from=[QUEUED], error=f"called off: the experiment {status}ed",
                     finished_at=func.clock_timestamp())
    session.execute(update(Experiment).where(Experiment.id == experiment.id).values(cancel_requested=True)
                    .execution_options(synchronize_session=False))
    if not move_experiment(session, experiment.id, status, error=error, finished_at=func.clock_timestamp()):
        raise Conflict(f"Experiment {experiment.id} was decided meanwhile", fields={"experiment_id": experiment.id})
    tag.total_experiments += 1
    tag.crashed_experiments += 1
    tag.consecutive_crashes += 1
    session.flush()
    return Outcome(status=status, experiment_status=status, verdict={
        "experiment_id": experiment.id,
        "status": status,
        "consecutive_crashes": tag.consecutive_crashes,
        "should_abort": tag.consecutive_crashes >= policy.max_consecutive_crashes,
        "action": "git_reset",
    })


def _prune(session: Session, tag: Tag, experiment: Experiment, runs: list[Run]) -> Outcome:
    """Stopped early as a clear loser: a verdict of its own, no crash counted."""
    pruned = next(r for r in runs if r.status == PRUNED)
    move_experiment(session, experiment.id, PRUNED, error=pruned.error, finished_at=func.clock_timestamp())
    tag.total_experiments += 1
    tag.discarded_experiments += 1
    session.flush()
    return Outcome(status=PRUNED, experiment_status=PRUNED, verdict={
        "experiment_id": experiment.id, "status": PRUNED, "action": "git_reset", "error": pruned.error})


# ---------------------------------------------------------------------------
# The seed's manual mode: the agent reports its own run


def _manual_run(session: Session, experiment_id: str) -> str:
    tag, experiment = _locked_experiment(session, experiment_id)
    if experiment.dispatched:
        raise Conflict(
            f"Experiment {experiment_id} was submitted: its score comes from the worker, not from /complete or /crash",
            fields={"experiment_id": experiment_id})
    if experiment.status not in LIVE_STATUSES:
        raise Conflict(f"Experiment {experiment_id} already finished with status '{experiment.status}'",
                       fields={"experiment_id": experiment_id})
    run_id = session.scalar(select(Run.id).where(Run.experiment_id == experiment_id, Run.status == RUNNING))
    if run_id is None:
        raise Conflict(f"Experiment {experiment_id} has no run in progress", fields={"experiment_id": experiment_id})
    return run_id


def complete_manual(session: Session, *, experiment_id: str, metrics: dict, policy: Policy) -> dict:
    run_id = _manual_run(session, experiment_id)
    outcome = finish_run(session, run_id=run_id, token=None, policy=policy,
                         report=RunReport(FINISHED, metrics=metrics))
    return outcome.verdict


def crash_manual(session: Session, *, experiment_id: str, error: str, policy: Policy) -> dict:
    run_id = _manual_run(session, experiment_id)
    outcome = finish_run(session, run_id=run_id, token=None, policy=policy, report=RunReport(CRASH, error=error))
    return outcome.verdict


def check_submittable(tag: Tag, policy: Policy, acknowledge_crashes: bool) -> None:
    if acknowledge_crashes:
        tag.consecutive_crashes = 0
    if tag.consecutive_crashes >= policy.max_consecutive_crashes:
        raise Conflict(
            f"tag '{tag.name}' hit {tag.consecutive_crashes} consecutive crashes; fix train.py, then submit "
            "with \"acknowledge_crashes\": true",
            fields={"tag": tag.name}, consecutive_crashes=tag.consecutive_crashes,
        )


def check_source(train_py: str) -> None:
    if not train_py.strip():
        raise InvalidInput("train_py is empty", fields={"train_py": ""})
