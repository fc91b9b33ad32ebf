"""Engine and sessions. One engine per process and URL; forked workers make their own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

_engines: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    if url not in _engines:
        # pre_ping: a Postgres restart must not leave the pool handing out dead connections.
        _engines[url] = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    return _engines[url]


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with Session(get_engine(url), expire_on_commit=False) as session, session.begin():
        yield session


def forget_engines() -> None:
    """After fork: drop the parent's pooled connections without closing them under it."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
