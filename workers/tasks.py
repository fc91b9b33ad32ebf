"""The training task: claim a run, train it in its own process group, record the outcome."""

from __future__ import annotations

import logging
import time

from celery.signals import task_failure

from app.celery_app import celery
from app.config import load_settings
from workers.training import recover_failed_task, train

log = logging.getLogger(__name__)


@celery.task(bind=True, name="workers.train", acks_late=True)
def train_run(self, run_id: str) -> dict:
    started = time.time()
    outcome = train(run_id, settings=load_settings(), redelivered=bool(
        (self.request.delivery_info or {}).get("redelivered")))
    log.info("run %s: %s in %.1fs", run_id, outcome["status"], time.time() - started)
    return outcome


@task_failure.connect(sender=train_run)
def _recover_after_failure(sender=None, task_id=None, exception=None, args=None, **_):
    """Runs in the worker's parent process when the pool child died mid-run (WorkerLostError,
    the time-limit backstop), and in the child when the task itself raised: either way the run
    must not stay `running` with nobody training it."""
    if args:
        recover_failed_task(args[0], settings=load_settings(), reason=f"{type(exception).__name__}: {exception}")
