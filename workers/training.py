"""One run on this worker's GPU, from claim to recorded result.

The database is touched in short transactions only (claim, progress, result); none is held
across the run. Every state change goes through app.services.lifecycle, the same module the
API and the sweep use. The run is trained only while this worker incarnation holds its lease:
when progress finds the lease gone (the run was given to another attempt) or the worker's
parent gone (it renews the lease), train.py is stopped and nothing is recorded.

Each pool child keeps one standby interpreter (workers/standby.py) for its next run: started
when the child starts and again as soon as a train.py has ended, so that its imports overlap
recording and scoring; a run takes it, and it dies with the child (its exit, or the kernel's
parent-death signal when the child is killed). Next to it waits one for the next trusted
evaluation, started when the child starts and again right after each evaluation, so that its
imports overlap the next run's training.

Staged start: once the current run has STAGED_START_LEAD_S of its budget left, the child claims
the run it would take next (lifecycle.stage_next) and starts it (workers/runner.py,
stage_training); the run does its imports, data and model, and where the GPU has room its first
forward and backward (the compile), and holds until this run has been recorded and the staged
run's message comes back to this worker (lifecycle.take_staged). While it waits, a cancel ends
it and a shutdown hands it back with the current run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path

from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy.exc import InterfaceError, OperationalError

from app.config import Settings, load_settings, project_pythonpath
from app.db import transaction
from app.dispatch import send_all
from app.errors import Conflict
from app.models import CANCELLED, CRASH, FINISHED, PRUNED, TIMEOUT
from app.services import lifecycle
from workers import evaluator, sandbox
from workers.fingerprint import digest
from workers.gpu import list_gpus, nvml_available, telemetry
from workers.heartbeat import identity
from workers.progress import step0_seconds
from workers.runner import (
    LOG_TAIL_CHARS,
    RunResult,
    StagedRun,
    run_training,
    sigterm_raises_system_exit,
    stage_training,
    start_evaluator_standby,
    start_standby,
    tail_log,
)
from workers.standby import Standby

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0  # live progress, the curve and the log tail are written at most this often
DATABASE_DOWN = (OperationalError, InterfaceError)
STORED_LOG_BYTES = 16_000  # the log tail kept in the run's row, for the API on any machine


# A staged run compiles (its first forward and backward) before its turn only where the GPU has
# this much memory free for every MB in use by the run it waits behind; else it holds before
# its first batch.
STAGED_MEMORY_HEADROOM = 1.1

# Thread pools a train.py sizes from the host's core count unless told otherwise.
CPU_THREAD_VARIABLES = ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")


def child_env(settings: Settings, profile: str, gpu_index: int, seed: int) -> dict[str, str]:
    """What train.py gets on top of workers.runner's allow-list of the worker's environment."""
    return {
        **standing_env(gpu_index),
        "AUTORESEARCH_PROFILE": profile,
        # The tokenizer and the training split only: the validation split stays with the worker.
        "AUTORESEARCH_CACHE": str(sandbox.cache_view(settings.cache_dir, settings.sandbox_dir)),
        "AUTORESEARCH_SEED": str(seed),
        # Relative to its working directory, the run directory: the sandbox resolves no other path.
        "AUTORESEARCH_EXPORT_PATH": evaluator.ARTIFACT_FILENAME,
    }


def standing_env(gpu_index: int) -> dict[str, str]:
    """The part of child_env that is the same for every run of this worker: a standby
    interpreter starts with it."""
    env = {
        # prepare.py stays in the project: the run directory holds only the experiment's train.py.
        "PYTHONPATH": project_pythonpath(),
        "CUDA_VISIBLE_DEVICES": visible_devices(gpu_index),
    }
    env.update(cpu_share_env(gpus_on_host=len(list_gpus()), cores=os.cpu_count() or 1))
    return env


def visible_devices(gpu_index: int) -> str:
    """What train.py and the evaluator get as CUDA_VISIBLE_DEVICES: a CPU worker has no device to
    pin; a GPU worker pins its own."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", str(gpu_index))


def cpu_share_env(*, gpus_on_host: int, cores: int) -> dict[str, str]:
    """Thread limits that give each GPU's run an equal share of the host's cores.

    Without them every run sizes its torch.compile worker pool and OpenMP threads to all cores,
    and runs that start together on a multi-GPU host oversubscribe the CPU during start-up.
    A limit already in the worker's environment wins; a CPU worker (no GPU) keeps every core.
    """
    if gpus_on_host < 2:
        return {}
    share = str(max(1, cores // gpus_on_host))
    return {name: share for name in CPU_THREAD_VARIABLES if name not in os.environ}


# ---------------------------------------------------------------------------
# The standby interpreters of this pool child

TRAIN, EVALUATOR = "train.py", "the evaluator"
_standbys: dict[str, Standby] = {}  # what this pool child's next run and next evaluation start in


def prepare_standby(settings: Settings) -> None:
    """Start the interpreters for this pool child's next run and next evaluation, unless they are
    waiting already."""
    if not settings.standby_interpreter or settings.worker_gpu_index is None:
        return
    starts = {TRAIN: lambda: start_standby(standing_env(settings.worker_gpu_index), sandbox_dir=settings.sandbox_dir),
              EVALUATOR: lambda: start_evaluator_standby(visible_devices(settings.worker_gpu_index))}
    for role, start in starts.items():
        if role in _standbys:
            continue
        try:
            _standbys[role] = start()
        except Exception:
            # Only a head start is lost: a fresh process starts instead, where a real problem shows.
            log.exception("could not start a standby interpreter for %s", role)


def take_standby(role: str = TRAIN) -> Standby | None:
    return _standbys.pop(role, None)


def discard_standby() -> None:
    for role in (TRAIN, EVALUATOR):
        standby = take_standby(role)
        if standby is not None:
            standby.discard()


@worker_process_init.connect
def _standby_for_the_first_run(**_):
    prepare_standby(load_settings())


@worker_process_shutdown.connect
def _no_standby_after_the_child(**_):
    discard_standby()
    discard_staged()


# ---------------------------------------------------------------------------
# The staged next run of this pool child


@dataclasses.dataclass
class _NextRun:
    claim: lifecycle.Claim
    process: StagedRun


_next_run: _NextRun | None = None


def stage_batches(gpu_index: int) -> int:
    """How many batches a staged run may train before its hold: 1 (its compile) where the GPU has
    room for a second run of the size of the one training now, else 0."""
    if not nvml_available():
        return 1  # a CPU worker: host memory, which a tiny run barely touches
    reading = telemetry(gpu_index)
    used, total = reading.get("memory_used_mb"), reading.get("vram_total_mb")
    if used is None or total is None:
        return 0
    return 1 if total - used >= STAGED_MEMORY_HEADROOM * used else 0


def stage_next_run(settings: Settings, holder: lifecycle.Holder) -> None:
    """Claim and start the run this worker would take next, if one is queued."""
    global _next_run
    queues = [*lifecycle.worker_queues(holder.gpu_id), lifecycle.setup_queue(digest(holder.fingerprint))]
    with transaction(settings.database_url) as session:
        staged = lifecycle.stage_next(session, holder=holder, lease_s=settings.lease_s, queues=queues)
    if staged is None:
        return
    claim, dispatch = staged
    send_all([dispatch], settings.broker_url)
    try:
        process = stage_training(
            claim.run_id, claim.train_py, settings.runs_dir / claim.experiment_id / claim.run_id,
            env=child_env(settings, claim.profile, holder.gpu_index, claim.seed),
            batches=stage_batches(holder.gpu_index), sandbox_dir=settings.sandbox_dir, standby=take_standby())
    except Exception:
        # Only the head start is lost: the run trains from its message, started afresh.
        log.exception("could not stage run %s; it starts when its turn comes", claim.run_id)
        return
    _next_run = _NextRun(claim, process)
    log.info("staged run %s (%d batch(es) before its hold, %s interpreter)", claim.run_id, process.batches,
             "standby" if process.started.standby else "fresh")


def look_after_staged(settings: Settings, holder: lifecycle.Holder, policy: lifecycle.Policy) -> None:
    """While it waits: its log tail goes in its row, a cancel ends it, a lost lease drops it."""
    global _next_run
    if _next_run is None:
        return
    claim, process = _next_run.claim, _next_run.process
    if process.trains_unheld():
        # It takes no batch from prepare's training loader, so nothing holds it: it stops now and
        # starts afresh when its turn comes.
        log.warning("staged run %s trains without holding for its turn; stopped until then", claim.run_id)
        process.discard()
    with transaction(settings.database_url) as session:
        standing = lifecycle.report_progress(session, run_id=claim.run_id, token=holder.token, progress=None,
                                             log_tail=tail_log(process.started.log_path, STORED_LOG_BYTES))
        given_back = (lifecycle.unstage_for_idle(session, run_id=claim.run_id, holder=holder)
                      if standing.held and not standing.cancel_requested else None)
    if given_back is not None:
        _next_run = None
        process.discard()
        send_all([given_back], settings.broker_url)
        log.info("staged run %s given back to %s: another worker is idle", claim.run_id, given_back.queue)
        return
    if standing.held and not standing.cancel_requested:
        return
    _next_run = None
    process.discard()
    if standing.held:
        finish(settings, holder, claim, lifecycle.RunReport(CANCELLED, error="cancelled while staged; process group killed",
                                                            log_tail=tail_log(process.started.log_path,
                                                                              STORED_LOG_BYTES)), policy)
    log.info("staged run %s ended before its turn: %s", claim.run_id,
             "cancelled" if standing.held else "this worker no longer holds it")


def take_staged_process(run_id: str) -> StagedRun | None:
    """The staged process of `run_id`, if this pool child staged it."""
    global _next_run
    if _next_run is None or _next_run.claim.run_id != run_id:
        return None
    process, _next_run = _next_run.process, None
    return process


def discard_staged() -> None:
    """Kill the staged process, if any; its run stays claimed for the message that comes back
    (take_staged), which then starts it afresh."""
    global _next_run
    if _next_run is not None:
        _next_run.process.discard()
        _next_run = None


def hand_back_staged(settings: Settings, holder: lifecycle.Holder, policy: lifecycle.Policy) -> None:
    """The worker shuts down: the staged run goes back to the queue with the current one."""
    global _next_run
    if _next_run is None:
        return
    claim = _next_run.claim
    discard_staged()
    hand_back(settings, holder, claim, policy)


class _Throttle:
    def __init__(self, every_s: float):
        self.every_s = every_s
        self.last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            return True
        return False


def train(run_id: str, *, settings: Settings, redelivered: bool = False) -> dict:
    holder = identity(settings)
    if holder is None:
        raise RuntimeError("this worker has no GPU identity; start it with `autoresearch worker --gpu N`")
    policy = lifecycle.Policy.from_settings(settings)
    try:
        with transaction(settings.database_url) as session:
            claim = lifecycle.claim(session, run_id=run_id, holder=holder, lease_s=settings.lease_s)
    except lifecycle.Draining as exc:
        raise Reject(str(exc), requeue=True) from None
    except lifecycle.SetupMismatch as exc:
        with transaction(settings.database_url) as session:
            dispatch = lifecycle.refuse(session, run_id=run_id, holder=holder, reason=str(exc),
                                        queue=lifecycle.setup_queue(digest(exc.pinned)))
        send_all([dispatch] if dispatch else [], settings.broker_url)
        log.warning("refused run %s: %s", run_id, exc)
        return {"run_id": run_id, "status": "refused", "differences": exc.differences}
    staged = None
    if claim is None:
        # Not queued: it may be the run this worker staged, whose message came back to it.
        staged = take_staged_process(run_id)
        staging = staged.record() if staged else None
        if staged is not None and not staged.usable():
            log.warning("staged run %s did not hold for its turn; starting it afresh", run_id)
            staged.discard()
            staged = None
        with transaction(settings.database_url) as session:
            claim = lifecycle.take_staged(session, run_id=run_id, holder=holder, staging=staging)
        if claim is None:
            if staged is not None:
                staged.discard()
            log.info("run %s is not queued any more (redelivered=%s); skipping", run_id, redelivered)
            return {"run_id": run_id, "status": "skipped"}
    run_dir = settings.runs_dir / claim.experiment_id / claim.run_id
    parent = os.getppid()
    standing = lifecycle.Standing(held=True, cancel_requested=False)
    throttle = _Throttle(PROGRESS_EVERY_S)

    # Progress is best effort: a database blip must not kill the run, only delay the news.
    curve_started = False

    def look(progress: dict | None) -> None:
        nonlocal standing, curve_started
        # The first progress line always goes in: a run shorter than the throttle's window (a
        # quick start from the standby) must not end without a curve.
        if not throttle.due() and (progress is None or curve_started):
            return
        curve_started = curve_started or progress is not None
        try:
            with transaction(settings.database_url) as session:
                latest = lifecycle.report_progress(session, run_id=claim.run_id, token=holder.token,
                                                   progress=progress,
                                                   log_tail=tail_log(run_dir / "train.log", STORED_LOG_BYTES))
            # A prune, once decided, stands until the run is stopped.
            standing = dataclasses.replace(latest, prune=latest.prune or standing.prune)
            if progress is not None and staging_due(progress):
                stage_next_run(settings, holder)
            else:
                look_after_staged(settings, holder, policy)
        except DATABASE_DOWN as exc:
            log.warning("progress of %s not stored (database unreachable): %s", claim.run_id, exc.orig)

    def staging_due(progress: dict) -> bool:
        remaining = progress.get("remaining_s")
        return (_next_run is None and settings.staged_start_lead_s > 0 and standing.held
                and remaining is not None and remaining <= settings.staged_start_lead_s)

    def on_progress(progress: dict) -> None:
        look(progress)

    def should_stop() -> bool:
        look(None)
        return (not standing.held or standing.cancel_requested or standing.prune is not None
                or os.getppid() != parent)

    # From here on a SIGTERM (the worker shutting down) hands the run back, also while the run's
    # environment and cache view are still being prepared, before train.py has started.
    with sigterm_raises_system_exit():
        try:
            result = run_training(
                claim.train_py, run_dir, env=child_env(settings, claim.profile, holder.gpu_index, claim.seed),
                timeout_s=settings.run_deadline_s(claim.profile), sandbox_dir=settings.sandbox_dir,
                should_cancel=should_stop, on_progress=on_progress,
                standby=None if staged else take_standby(), staged=staged,
            )
        except SystemExit:
            # train.py's group, if it started, is gone, and so is the standby it took: hand the
            # run back, and the run staged behind it. No new standby: this child is on its way out.
            until_database_answers(lambda: hand_back(settings, holder, claim, policy),
                                   what=f"hand-back of {run_id}")
            until_database_answers(lambda: hand_back_staged(settings, holder, policy),
                                   what=f"hand-back of the run staged after {run_id}")
            raise
    # The next run's interpreter imports while this one is recorded and scored.
    prepare_standby(settings)
    log.info("run %s: train.py ran in %s", claim.run_id,
             "the standby interpreter" if result.standby else "a fresh interpreter")
    if not standing.held or os.getppid() != parent:
        log.warning("run %s stopped: this worker no longer holds it", claim.run_id)
        return {"run_id": claim.run_id, "status": "superseded"}
    if standing.prune is not None:
        pruned = lifecycle.RunReport(PRUNED, error=f"stopped early: {standing.prune}",
                                     log_tail=tail_log(result.log_path, STORED_LOG_BYTES))
        return until_database_answers(lambda: finish(settings, holder, claim, pruned, policy),
                                      what=f"result of {claim.run_id}", give_up_after_s=settings.record_retry_s)
    return until_database_answers(lambda: record(settings, holder, claim, result, policy),
                                  what=f"result of {claim.run_id}", give_up_after_s=settings.record_retry_s)


def until_database_answers(action, *, what: str, give_up_after_s: float = 60.0):
    """Run `action`, retrying while Postgres is unreachable, with backoff up to 30 s."""
    deadline = time.monotonic() + give_up_after_s
    delay = 1.0
    while True:
        try:
            return action()
        except DATABASE_DOWN as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable while recording %s; retrying in %.0fs: %s", what, delay, exc.orig)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def hand_back(settings: Settings, holder: lifecycle.Holder, claim: lifecycle.Claim, policy: lifecycle.Policy) -> None:
    with transaction(settings.database_url) as session:
        outcome = lifecycle.lose_run(session, run_id=claim.run_id, token=holder.token, policy=policy, charge=False,
                                     reason=f"handed back: {holder.gpu_id} shut down")
    send_all(outcome.dispatches, settings.broker_url)
    log.info("handed back run %s (%s)", claim.run_id, outcome.status)


def head_of_log(path: Path, max_bytes: int = 256 * 1024) -> str:
    """The start of a training log, where step 0's progress line is."""
    with open(path, "rb") as f:
        return f.read(max_bytes).decode("utf-8", errors="replace")


def report_of(claim: lifecycle.Claim, result: RunResult,
              evaluation: evaluator.Evaluation | None = None) -> lifecycle.RunReport:
    """How the run ended, in the lifecycle's terms. With an evaluation (trusted scoring), val_bpb
    is the evaluator's and the summary's own val_bpb is kept as reported_val_bpb."""
    log_tail = tail_log(result.log_path, STORED_LOG_BYTES)
    if result.status == "cancelled":
        return lifecycle.RunReport(CANCELLED, error="cancelled while running; process group killed", log_tail=log_tail)
    if result.status == "timeout":
        return lifecycle.RunReport(TIMEOUT, error=result.error or "timed out", log_tail=log_tail)
    summary = result.summary or {}
    if result.status == "finished" and summary.get("profile") != claim.profile:
        return lifecycle.RunReport(CRASH, log_tail=log_tail, error=(
            f"train.py ran with profile {summary.get('profile')!r} but tag '{claim.tag}' uses {claim.profile!r}; "
            "the profile is fixed per tag"))
    if result.status != "finished":
        return lifecycle.RunReport(CRASH, error=result.error or result.log_tail[-LOG_TAIL_CHARS:], log_tail=log_tail)
    # The summary block says total_tokens_M; the records say total_tokens_m.
    metrics = {key.lower(): value for key, value in summary.items()}
    metrics["compile_seconds"] = step0_seconds(head_of_log(result.log_path))
    if evaluation is None:  # TRUSTED_SCORING off: the summary's number stands
        return lifecycle.RunReport(FINISHED, metrics=metrics, log_tail=log_tail)
    reported = metrics.pop("val_bpb", None)
    metrics.update(reported_val_bpb=reported, scoring=evaluation.details)
    if evaluation.error is not None:
        return lifecycle.RunReport(CRASH, metrics=metrics, error=evaluation.error, log_tail=log_tail)
    metrics["val_bpb"] = evaluation.val_bpb
    if reported is not None:  # a train.py without the validation split prints no number to compare
        metrics["score_mismatch"] = evaluator.mismatch(reported, evaluation.val_bpb)
    return lifecycle.RunReport(FINISHED, metrics=metrics, log_tail=log_tail)


@functools.lru_cache(maxsize=4)
def _evaluation(run_id: str, artifact: Path, profile: str, cache_dir: Path, visible_devices: str):
    """The trusted evaluator's verdict on one run: computed once, even when recording it is
    retried while the database is down."""
    return evaluator.score(artifact, profile=profile, cache_dir=cache_dir, visible_devices=visible_devices,
                           standby=take_standby(EVALUATOR))


def record(settings: Settings, holder: lifecycle.Holder, claim: lifecycle.Claim, result: RunResult,
           policy: lifecycle.Policy) -> dict:
    evaluation = None
    artifact = result.log_path.parent / evaluator.ARTIFACT_FILENAME
    # An exported model is always scored; TRUSTED_SCORING=0 only lets a run without one keep its printed number.
    if result.status == "finished" and (settings.trusted_scoring or os.path.lexists(artifact)):
        evaluation = _evaluation(claim.run_id, artifact, claim.profile, settings.cache_dir,
                                 visible_devices(holder.gpu_index))
        # The next evaluation's interpreter imports while the next run trains.
        prepare_standby(settings)
    return finish(settings, holder, claim, report_of(claim, result, evaluation), policy)


def finish(settings: Settings, holder: lifecycle.Holder, claim: lifecycle.Claim, report: lifecycle.RunReport,
           policy: lifecycle.Policy) -> dict:
    try:
        with transaction(settings.database_url) as session:
            outcome = lifecycle.finish_run(session, run_id=claim.run_id, token=holder.token, policy=policy,
                                           report=report)
    except Conflict as exc:
        # Superseded (requeued after this worker looked dead) or finished elsewhere: the record
        # that stands is the other one; this run's result is dropped, never written twice.
        log.warning("result of %s not recorded: %s", claim.run_id, exc.message)
        return {"run_id": claim.run_id, "status": "superseded"}
    send_all(outcome.dispatches, settings.broker_url)
    return {"run_id": claim.run_id, "experiment_id": claim.experiment_id, "status": outcome.status,
            **(outcome.verdict or {})}


def recover_failed_task(run_id: str, *, settings: Settings, reason: str) -> None:
    """The training task failed outside train.py (its pool process died, the database stayed
    away while recording): the run is lost now, rather than when its lease runs out, if this
    incarnation still holds it."""
    holder = identity(settings)
    if holder is None:
        return
    with transaction(settings.database_url) as session:
        outcome = lifecycle.lose_run(session, run_id=run_id, token=holder.token,
                                     policy=lifecycle.Policy.from_settings(settings),
                                     reason=f"task failed on {holder.gpu_id}: {reason}")
    send_all(outcome.dispatches, settings.broker_url)
    if outcome.dispatches:
        log.warning("requeued run %s after its task failed: %s", run_id, reason)
