"""Bring a database to the newest schema with Alembic, and create the database if missing."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.config import PROJECT_ROOT, ServerUnreachable
from app.db import CONNECT_TIMEOUT_S, check_reachable, is_outage, unreachable


def ensure_database(url: str) -> None:
    """Create the database named in `url` if the server lacks it (fresh embedded or local server)."""
    try:
        check_reachable(url)
        return  # it exists: hosted servers often let a user reach no other database to look from
    except ServerUnreachable:
        pass
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        with admin.connect() as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database})
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    finally:
        admin.dispose()


def upgrade(url: str) -> None:
    """Raises ServerUnreachable (one line naming DATABASE_URL) when the server cannot be used."""
    try:
        ensure_database(url)
        config = Config(str(PROJECT_ROOT / "alembic.ini"))
        config.attributes["database_url"] = url
        command.upgrade(config, "head")
    except DBAPIError as exc:
        if is_outage(exc):
            raise unreachable(url, exc) from None
        raise
