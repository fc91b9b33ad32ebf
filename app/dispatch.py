"""Sending training messages. The experiment row is committed before its message is sent, so
a worker always finds the row it is told to run."""

from __future__ import annotations

from app.celery_app import celery
from app.services.runs import Dispatch

TRAIN_TASK = "workers.train"


def send(dispatch: Dispatch) -> None:
    celery.send_task(TRAIN_TASK, args=[dispatch.experiment_id], task_id=dispatch.task_id, queue=dispatch.queue)
