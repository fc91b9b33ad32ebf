"""Gunicorn settings of the API (`Stack.start_api` loads this module with `-c python:...`).

Agents long-poll /api/experiment/wait for up to 600 s each. A gevent worker serves each request
as a greenlet rather than a thread, so any number of waiting agents (and clients that send
their headers slowly) leave /health and submit free. gevent makes sockets, sleeps and locks
cooperative; psycopg2 talks to Postgres in C, so it is told to wait through gevent too.
"""

from __future__ import annotations

import psycopg2
from psycopg2 import extensions

worker_class = "gevent"
worker_connections = 1000  # requests one worker process serves at once: waits, slow clients, the rest


def post_worker_init(worker) -> None:
    # After gevent patched the worker and before it serves a request or opens a connection.
    extensions.set_wait_callback(wait_for_postgres)


def wait_for_postgres(connection) -> None:
    """Drive one psycopg2 operation to its end, yielding to other greenlets while the server works."""
    # Imported in the worker, after gevent patched it: gunicorn's master loads this module first,
    # and locks made there before the patching would not be gevent's.
    from gevent.socket import wait_read, wait_write

    from app.db import CONNECT_TIMEOUT_S

    # libpq enforces connect_timeout only on connections it drives itself, so this does: a
    # server that drops packets is then an outage (503) in seconds, not after TCP's minutes.
    connecting = connection.status == extensions.STATUS_SETUP
    timeout = CONNECT_TIMEOUT_S if connecting else None
    timed_out = psycopg2.OperationalError(f"timeout expired (no answer in {CONNECT_TIMEOUT_S} s)")
    while True:
        state = connection.poll()
        if state == extensions.POLL_OK:
            return
        if state == extensions.POLL_READ:
            wait_read(connection.fileno(), timeout=timeout, timeout_exc=timed_out)
        elif state == extensions.POLL_WRITE:
            wait_write(connection.fileno(), timeout=timeout, timeout_exc=timed_out)
        else:
            raise psycopg2.OperationalError(f"unexpected psycopg2 poll state {state}")
