"""The Celery application, configured from celeryconfig (which reads app.config)."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from app.db import forget_engines

celery = Celery("autoresearch", include=["app.control", "workers.tasks"])
celery.config_from_object("celeryconfig")


@worker_process_init.connect
def _fresh_connections_after_fork(**_):
    # A pool child must not share the parent's database sockets.
    forget_engines()


def _install_worker_steps() -> None:
    from workers.heartbeat import Heartbeat

    celery.steps["worker"].add(Heartbeat)


_install_worker_steps()
