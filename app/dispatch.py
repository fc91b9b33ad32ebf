"""Sending training messages, and looking for them in the broker. The run row is committed
before its message is sent, so a worker always finds the row it is told to train.

Producers are Celery apps of their own, one per broker URL, configured like the workers'
(celeryconfig) but for the URL they are given: an API built with explicit settings (tests, a
second deployment in one process) enqueues exactly where its workers listen.
"""

from __future__ import annotations

import json
from functools import lru_cache

import redis
from celery import Celery

from app.services.lifecycle import Dispatch

TRAIN_TASK = "workers.train"


@lru_cache(maxsize=4)
def producer(broker_url: str) -> Celery:
    app = Celery("autoresearch-producer", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=broker_url, result_backend=None)
    return app


def send_all(dispatches: list[Dispatch], broker_url: str) -> None:
    if not dispatches:
        return
    app = producer(broker_url)
    # The connection names the URL itself: Celery lets CELERY_BROKER_URL in the environment win
    # over a configured broker_url, and this must go where it was told even when the two differ.
    with app.connection_for_write(broker_url) as connection:
        for dispatch in dispatches:
            app.send_task(TRAIN_TASK, args=[dispatch.run_id], task_id=dispatch.task_id, queue=dispatch.queue,
                          connection=connection)


def task_ids_in_broker(broker_url: str) -> set[str]:
    """Ids of every training message Redis holds: waiting in a queue, or delivered to a worker
    and not yet acknowledged. A queued run whose message id is not here has lost its message."""
    client = redis.Redis.from_url(broker_url)
    ids = set()
    for pattern in ("train*", "confirm*", "gpu.*", "setup.*"):
        for key in client.scan_iter(match=pattern, _type="list"):
            ids.update(json.loads(raw)["headers"]["id"] for raw in client.lrange(key, 0, -1))
    for raw in client.hvals("unacked"):
        ids.add(json.loads(raw)[0]["headers"]["id"])
    return ids
