"""Celery settings, all derived from app.config (the one place the environment is read).

Queues: `train` (any GPU), `confirm` (confirmation runs, drained before `train`), `gpu.<gpu id>`
(one GPU of one machine; a worker lists its own first and empties it first) and `control`
(beat's tasks, on a CPU worker; never on a GPU worker, where a sweep would wait behind a
ten-minute run). Every time bound comes from app.config, derived from KILL_TIMEOUT.
"""

from kombu import Queue

from app.config import load_settings

_settings = load_settings()

broker_url = _settings.broker_url
result_backend = _settings.result_backend
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # a Redis restart must not kill a worker mid-night
broker_transport_options = {
    # An unacked message comes back after this long; it must outlast the longest run, and every
    # process sharing the broker must use the same value.
    "visibility_timeout": _settings.visibility_timeout,
    # A worker consuming `gpu.N,train` drains its own queue before the shared one.
    "queue_order_strategy": "priority",
}
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout}
result_expires = 7 * 24 * 3600

task_default_queue = "train"
# Each queue its own routing key: a Queue without one is bound with the default queue's key,
# and its messages would land in `train`.
task_queues = tuple(Queue(name, routing_key=name) for name in ("train", "confirm", "control"))
task_create_missing_queues = True  # gpu.<gpu id> queues appear with their workers
task_routes = {
    "workers.train": {"queue": "train"},
    "app.control.*": {"queue": "control"},
}
# Ack after the run: a worker that dies mid-run leaves its message to be redelivered.
task_acks_late = True
worker_prefetch_multiplier = 1
# A pool child dying is usually our own kill; redelivering then risks loops (notes/celery.md).
task_reject_on_worker_lost = False
# Backstop only: the task enforces the kill timeout itself and kills train.py's whole group.
task_time_limit = _settings.task_time_limit
worker_max_tasks_per_child = 20
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True
timezone = "UTC"
enable_utc = True

beat_schedule = {
    "sweep-leases": {
        "task": "app.control.sweep",
        "schedule": _settings.sweep_interval,
        "options": {"queue": "control", "expires": _settings.sweep_interval},
    },
    "adapt-strategies": {
        "task": "app.control.adapt_active_tags",
        "schedule": 60.0,
        "options": {"queue": "control", "expires": 60},
    },
    "write-reports": {
        "task": "app.control.write_reports",
        "schedule": _settings.report_interval,
        "options": {"queue": "control", "expires": _settings.report_interval},
    },
}
