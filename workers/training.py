"""One experiment on this worker's GPU, from claim to recorded result.

The database is touched in short transactions only (claim, progress, result); none is held
across the run. Every outcome goes through the same domain services the API uses.
"""

from __future__ import annotations

import logging
import os
import time

from sqlalchemy.exc import InterfaceError, OperationalError

from app.config import PROJECT_ROOT, Settings
from app.db import transaction
from app.errors import Conflict
from app.models import CANCELLED, CRASH, TIMEOUT
from app.services import experiments as exp_svc
from app.services import pool, runs
from workers.gpu import list_gpus
from workers.heartbeat import identity
from workers.runner import RunResult, run_training

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0  # live progress is written to Postgres at most this often
CANCEL_CHECK_EVERY_S = 2.0
# A finished run's result waits this long for Postgres to come back before the task gives up:
# minutes of GPU time must not be lost to a database restart.
RECORD_RETRY_S = 900.0
DATABASE_DOWN = (OperationalError, InterfaceError)


# Thread pools a train.py sizes from the host's core count unless told otherwise.
CPU_THREAD_VARIABLES = ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")


def child_env(settings: Settings, profile: str, gpu_index: int) -> dict[str, str]:
    env = {
        "AUTORESEARCH_PROFILE": profile,
        "AUTORESEARCH_CACHE": str(settings.cache_dir),
        # prepare.py stays in the project: the run directory holds only the experiment's train.py.
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    # A CPU worker has no device to pin; a GPU worker pins its own.
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", str(gpu_index))
    env.update(cpu_share_env(gpus_on_host=len(list_gpus()), cores=os.cpu_count() or 1))
    return env


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


def train(experiment_id: str, *, settings: Settings, redelivered: bool = False) -> dict:
    me = identity(settings)
    if me is None:
        raise RuntimeError("this worker has no GPU identity; start it with `autoresearch worker --gpu N`")
    gpu_id, gpu_index = me
    with transaction(settings.database_url) as session:
        claim = runs.claim(session, experiment_id=experiment_id, gpu_id=gpu_id, gpu_index=gpu_index)
        if claim is None:
            log.info("experiment %s is not queued any more (redelivered=%s); skipping", experiment_id, redelivered)
            return {"experiment_id": experiment_id, "status": "skipped"}
        run_dir = settings.runs_dir / experiment_id / f"attempt-{claim.attempt}"
        runs.set_log_path(session, experiment_id=experiment_id, log_path=str(run_dir / "train.log"))
        pool.set_training(session, gpu_id=gpu_id, experiment_id=experiment_id)

    cancel_flag = False
    progress_throttle, cancel_throttle = _Throttle(PROGRESS_EVERY_S), _Throttle(CANCEL_CHECK_EVERY_S)

    # Progress and the cancel check are best effort: a database blip must not kill the run.
    def on_progress(progress: dict) -> None:
        nonlocal cancel_flag
        if progress_throttle.due():
            try:
                with transaction(settings.database_url) as session:
                    cancel_flag = runs.record_progress(
                        session, experiment_id=experiment_id, attempt=claim.attempt, progress=progress)
            except DATABASE_DOWN as exc:
                log.warning("progress of %s not stored (database unreachable): %s", experiment_id, exc.orig)

    def should_cancel() -> bool:
        nonlocal cancel_flag
        if not cancel_flag and cancel_throttle.due():
            try:
                with transaction(settings.database_url) as session:
                    cancel_flag = runs.cancel_requested(session, experiment_id=experiment_id)
            except DATABASE_DOWN as exc:
                log.warning("cancel check of %s skipped (database unreachable): %s", experiment_id, exc.orig)
        return cancel_flag

    try:
        result = run_training(
            claim.train_py, run_dir, env=child_env(settings, claim.profile, gpu_index),
            timeout_s=settings.kill_timeout, should_cancel=should_cancel, on_progress=on_progress,
        )
        return until_database_answers(lambda: record(settings, claim, result), what=f"result of {experiment_id}")
    finally:
        until_database_answers(lambda: mark_idle(settings, gpu_id), what=f"{gpu_id} idle")


def until_database_answers(action, *, what: str, give_up_after_s: float = RECORD_RETRY_S):
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


def mark_idle(settings: Settings, gpu_id: str) -> None:
    with transaction(settings.database_url) as session:
        pool.set_training(session, gpu_id=gpu_id, experiment_id=None)


def record(settings: Settings, claim: runs.Claim, result: RunResult) -> dict:
    rules = exp_svc.Rules.from_settings(settings)
    base = {"experiment_id": claim.experiment_id}
    try:
        with transaction(settings.database_url) as session:
            if result.status == "cancelled":
                exp_svc.mark_cancelled(session, experiment_id=claim.experiment_id, attempt=claim.attempt,
                                       reason="cancelled while running; process group killed")
                return {**base, "status": CANCELLED}
            if result.status == "timeout":
                return exp_svc.record_failure(session, experiment_id=claim.experiment_id, attempt=claim.attempt,
                                              rules=rules, status=TIMEOUT, error=result.error or "timed out")
            error = result.error
            summary = result.summary
            if result.status == "finished" and summary.get("profile") != claim.profile:
                error = (f"train.py ran with profile {summary.get('profile')!r} but tag '{claim.tag}' uses "
                         f"{claim.profile!r}; the profile is fixed per tag")
            if result.status == "finished" and error is None:
                # The summary block says total_tokens_M; the records say total_tokens_m.
                metrics = {key.lower(): value for key, value in summary.items()}
                return exp_svc.complete(session, experiment_id=claim.experiment_id, attempt=claim.attempt,
                                        rules=rules, metrics=metrics)
            return exp_svc.record_failure(session, experiment_id=claim.experiment_id, attempt=claim.attempt,
                                          rules=rules, status=CRASH, error=error or result.log_tail)
    except Conflict as exc:
        # Superseded (requeued after this worker looked dead) or finished elsewhere: the record
        # that stands is the other one; this run's result is dropped, never written twice.
        log.warning("result of %s not recorded: %s", claim.experiment_id, exc.message)
        return {**base, "status": "superseded"}


def recover_failed_task(experiment_id: str, *, settings: Settings, reason: str) -> None:
    """The training task failed outside train.py (its process died, the database blinked while
    recording): requeue the run if this worker still holds it."""
    from app.dispatch import send
    from app.models import RUNNING, Experiment

    me = identity(settings)
    if me is None:
        return
    with transaction(settings.database_url) as session:
        experiment = session.get(Experiment, experiment_id)
        if experiment is None or experiment.status != RUNNING or experiment.gpu_id != me[0]:
            return
        dispatch = runs.requeue_or_fail(session, experiment_id=experiment_id, attempt=experiment.attempts,
                                        rules=exp_svc.Rules.from_settings(settings), reason=f"task failed on {me[0]}: {reason}")
        pool.set_training(session, gpu_id=me[0], experiment_id=None)
    if dispatch is not None:
        send(dispatch, settings.broker_url)
        log.warning("requeued %s after its task failed: %s", experiment_id, reason)
