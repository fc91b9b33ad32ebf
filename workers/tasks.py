"""The training task: claim, run train.py in its own process group, record the outcome."""

from __future__ import annotations

import logging
import time

from app.celery_app import celery
from app.config import load_settings
from workers.training import train

log = logging.getLogger(__name__)


@celery.task(bind=True, name="workers.train", acks_late=True)
def train_experiment(self, experiment_id: str) -> dict:
    started = time.time()
    outcome = train(experiment_id, settings=load_settings(), redelivered=bool(
        (self.request.delivery_info or {}).get("redelivered")))
    log.info("experiment %s: %s in %.1fs", experiment_id, outcome["status"], time.time() - started)
    return outcome
