"""Sending training messages. The experiment row is committed before its message is sent, so
a worker always finds the row it is told to run."""

from __future__ import annotations

from app.celery_app import celery
from app.services.runs import Dispatch

TRAIN_TASK = "workers.train"


def send(dispatch: Dispatch) -> None:
    celery.send_task(TRAIN_TASK, args=[dispatch.experiment_id], task_id=dispatch.task_id, queue=dispatch.queue)


def task_ids_in_broker() -> set[str]:
    """Ids of every training message Redis holds: waiting in a queue, or delivered to a worker
    and not yet acknowledged. A queued experiment whose id is not here has lost its message."""
    import json

    import redis

    client = redis.Redis.from_url(celery.conf.broker_url)
    ids = set()
    for pattern in ("train*", "gpu.*"):
        for key in client.scan_iter(match=pattern, _type="list"):
            ids.update(json.loads(raw)["headers"]["id"] for raw in client.lrange(key, 0, -1))
    for raw in client.hvals("unacked"):
        ids.add(json.loads(raw)[0]["headers"]["id"])
    return ids
