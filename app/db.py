"""Engine and sessions. One engine per process and URL; forked workers make their own.

Also what an unreachable database looks like: which driver errors mean "no server to talk to"
(the API answers those with 503), and one log line when that starts and one when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from app.config import ServerUnreachable

log = logging.getLogger(__name__)
# A server that drops packets would otherwise hold each connection attempt for minutes.
CONNECT_TIMEOUT_S = 10
# SQLSTATE classes that mean the server cannot serve now rather than that a statement failed:
# 08 connection exception, 53 insufficient resources (too many connections), 57P operator
# intervention (shutting down, starting up). A driver error without a SQLSTATE got no server reply.
OUTAGE_SQLSTATES = ("08", "53", "57P")

_engines: dict[str, Engine] = {}


class Outage:
    """Whether this process last found the database unreachable, so that an outage costs one
    log line when it starts and one when it ends, however many requests meet it meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None

    def begin(self, exc: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.error("database unreachable (%s); waiting for it to come back", describe(exc))

    def end(self) -> None:
        if self._since is None:  # the common case, without taking the lock
            return
        with self._lock:
            if self._since is None:
                return
            lasted, self._since = time.monotonic() - self._since, None
        log.warning("database reachable again after %.0f s", lasted)


outage = Outage()


def is_outage(exc: BaseException) -> bool:
    """True when `exc` says the database could not be reached or stopped serving."""
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    code = getattr(exc.orig, "pgcode", None)
    return code is None or code.startswith(OUTAGE_SQLSTATES)


def describe(exc: BaseException) -> str:
    """The driver's first line, e.g. 'connection to server at "db", port 5432 failed: Connection refused'."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0].strip() if lines else type(cause).__name__


def unreachable(url: str, exc: BaseException) -> ServerUnreachable:
    where = make_url(url).render_as_string(hide_password=True)
    return ServerUnreachable(
        f"DATABASE_URL: cannot use the database at {where} ({describe(exc)}); start Postgres there "
        "and create the database (`autoresearch migrate` does), or point DATABASE_URL at one that runs"
    )


def check_reachable(url: str) -> None:
    """Connect once, or raise ServerUnreachable naming DATABASE_URL and the fix."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise unreachable(url, exc) from None
    finally:
        engine.dispose()


def get_engine(url: str) -> Engine:
    if url not in _engines:
        # pre_ping: a Postgres restart must not leave the pool handing out dead connections.
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                               connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
        # A checkout succeeds only after a fresh connect or a good ping: the server answers again.
        event.listen(engine, "checkout", lambda *_: outage.end())
        _engines[url] = engine
    return _engines[url]


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    try:
        with Session(get_engine(url), expire_on_commit=False) as session, session.begin():
            yield session
    except DBAPIError as exc:
        if is_outage(exc):
            outage.begin(exc)
        raise


def forget_engines() -> None:
    """After fork: drop the parent's pooled connections without closing them under it."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
