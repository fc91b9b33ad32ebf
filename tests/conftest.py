"""Fixtures for tests against real services: Postgres and Redis of this machine when they
answer on their standard ports, else the embedded servers the project installs."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
from conftest_data import tiny_cache  # noqa: F401  (a prepared tiny cache, for every test module)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.config import database_url_from, load_settings
from app.db import forget_engines, transaction
from app.migrate import upgrade
from app.models import Base

# Per test process (each pytest-xdist worker is one), so that two on one machine never drop each
# other's data. Redis has 16 databases: xdist's workers take 1, 2, ...; a plain session one by pid.
TEST_DATABASE = f"autoresearch_test_{os.getpid()}"
LOCAL_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_REDIS_DB = 1 + int(_XDIST_WORKER[2:]) if _XDIST_WORKER.startswith("gw") else 8 + os.getpid() % 8
LOCAL_REDIS = f"redis://127.0.0.1:6379/{_REDIS_DB}"
SERVER_SETTLE_S = 6.0


def _answers(host: str, port: int) -> bool:
    if os.environ.get("TEST_EMBEDDED_SERVERS"):  # exercise the fallback a user's machine takes
        return False
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def service_urls():
    """(postgres server URL, redis URL): TEST_DATABASE_URL / TEST_REDIS_URL, the local servers,
    or embedded ones started for this test session."""
    stops = []
    given = os.environ.get("TEST_DATABASE_URL")
    postgres = database_url_from(given, "TEST_DATABASE_URL") if given else None  # postgres:// works too
    if not postgres:
        if _answers("127.0.0.1", 5432):
            postgres = LOCAL_POSTGRES
        else:
            from app import embedded

            # Not under pytest's tmp root: every pytest session (as root) resets it to 0700, which
            # locks the postgres system user out of its own data directory.
            postgres, stop = embedded.start_postgres(Path(tempfile.mkdtemp(prefix="ar-pg-")), embedded.free_port())
            stops.append(stop)
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        if _answers("127.0.0.1", 6379):
            redis_url = LOCAL_REDIS
        else:
            from app import embedded

            redis_url, stop = embedded.start_redis(Path(tempfile.mkdtemp(prefix="ar-redis-")), embedded.free_port())
            stops.append(stop)
    yield postgres, redis_url
    for stop in reversed(stops):
        stop()


@pytest.fixture(scope="session")
def database_url(service_urls) -> str:
    """A fresh test database, migrated with Alembic the way a deployment is."""
    server = make_url(service_urls[0])
    url = server.set(database=TEST_DATABASE).render_as_string(hide_password=False)
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
        ), {"n": TEST_DATABASE})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}"'))
    admin.dispose()
    upgrade(url)
    # The offline sweep gives GPUs STALE_AFTER after a Postgres start before judging them; a
    # server started for this session must be older than the tests' STALE_AFTER (5 s at most).
    with admin.connect() as conn:
        uptime = conn.scalar(text("SELECT extract(epoch FROM now() - pg_postmaster_start_time())"))
    time.sleep(max(0.0, SERVER_SETTLE_S - float(uptime)))
    yield url
    forget_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url(service_urls) -> str:
    return service_urls[1]


@pytest.fixture
def settings(database_url, redis_url, tmp_path):
    base = load_settings({})
    return dataclasses.replace(
        base,
        database_url=database_url,
        broker_url=redis_url,
        result_backend=redis_url,
        external_database=True,
        external_broker=True,
        state_dir=tmp_path / "state",
        default_profile="tiny",
        # One run per experiment, as in the seed, for tests that are not about replicates; those
        # set BASELINE_RUNS themselves.
        baseline_runs=1,
        # Stand-in train.py scripts print a summary and export no model: the worker takes their number.
        trusted_scoring=False,
        # Short, so that silence is simulated by backdating a heartbeat a little; the sweep also
        # waits this long after a Postgres start, which an embedded test server just had.
        stale_after=2.0,
    )


@pytest.fixture
def db(database_url):
    """An empty database for each test."""
    tables = ", ".join(t.name for t in reversed(Base.metadata.sorted_tables))
    with transaction(database_url) as session:
        session.execute(text(f"TRUNCATE {tables} CASCADE"))
    return database_url


@pytest.fixture
def app(settings, db):
    from app.web import create_app

    flask_app = create_app(settings)
    flask_app.config["TESTING"] = True
    return flask_app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
