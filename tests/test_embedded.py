"""Embedded Postgres and Redis: real servers on free ports in a temporary state folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import psutil
import psycopg2
import pytest
import redis

from app import embedded
from app.embedded import free_port, start_postgres, start_redis

pytestmark = pytest.mark.timeout(120)


def pg_connect(url: str):
    # postgresql+psycopg2://postgres@127.0.0.1:PORT/autoresearch -> plain libpq DSN
    return psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((embedded.HOST, port)) != 0


def postmaster_pid(state: Path) -> int:
    return int((state / "postgres" / "postmaster.pid").read_text().split()[0])


@pytest.fixture
def state():
    # Not under tmp_path: as root, Postgres runs as another user that must be able to traverse
    # every parent folder, and each pytest session (another engineer's, running in parallel)
    # resets pytest's shared base folder /tmp/pytest-of-<user> to mode 0700.
    base = Path(tempfile.mkdtemp(prefix="autoresearch-embedded-"))
    state = base / "state"
    yield state
    # Whatever a test left running is stopped here, so no server outlives the test run.
    embedded._stop_postgres(state / "postgres", embedded._postgres_account())
    embedded._stop_redis(state / "redis")
    shutil.rmtree(base, ignore_errors=True)


def test_free_port():
    port = free_port()
    with socket.socket() as sock:
        sock.bind((embedded.HOST, port))


def test_postgres_keeps_data_across_restart(state):
    port = free_port()
    url, stop = start_postgres(state, port)
    assert url == f"postgresql+psycopg2://postgres@127.0.0.1:{port}/autoresearch"
    with pg_connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
        cur.execute("CREATE TABLE kept (value text)")
        cur.execute("INSERT INTO kept VALUES ('survives')")
    conn.close()
    stop()
    assert port_closed(port)
    stop()  # stopping a stopped server is a no-op

    url, stop = start_postgres(state, port)
    with pg_connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM kept")
        assert cur.fetchall() == [("survives",)]
    conn.close()
    stop()


def test_postgres_reuses_running_server_and_moves_port(state):
    port = free_port()
    start_postgres(state, port)
    pid = postmaster_pid(state)
    _, stop = start_postgres(state, port)
    assert postmaster_pid(state) == pid  # reused, not restarted

    other_port = free_port()
    url, stop = start_postgres(state, other_port)
    assert port_closed(port)
    with pg_connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        assert cur.fetchone() == ("autoresearch",)
    conn.close()
    stop()


def test_postgres_recovers_from_a_killed_server(state):
    port = free_port()
    url, _ = start_postgres(state, port)
    with pg_connect(url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (value int)")
        cur.execute("INSERT INTO kept VALUES (7)")
    conn.close()

    # kill -9 leaves postmaster.pid behind, as a crash or power loss would.
    postmaster = psutil.Process(postmaster_pid(state))
    backends = postmaster.children()
    postmaster.kill()
    psutil.wait_procs([postmaster, *backends], timeout=10)  # backends exit on postmaster death
    assert (state / "postgres" / "postmaster.pid").exists()

    url, stop = start_postgres(state, port)
    with pg_connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM kept")
        assert cur.fetchall() == [(7,)]
    conn.close()
    stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-specific path needs root")
def test_postgres_runs_unprivileged_when_we_are_root(state):
    _, stop = start_postgres(state, free_port())
    assert psutil.Process(postmaster_pid(state)).username() == embedded.PG_SYSTEM_USER
    assert (state / "postgres").stat().st_uid != 0
    stop()


def test_redis_keeps_queued_data_across_restart(state):
    port = free_port()
    url, stop = start_redis(state, port)
    assert url == f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    assert client.ping()
    client.rpush("train", "job-1", "job-2")
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.close()
    stop()
    assert port_closed(port)
    stop()  # no-op
    assert (state / "redis" / "appendonly.aof").exists()

    url, stop = start_redis(state, port)
    client = redis.Redis.from_url(url)
    assert client.lrange("train", 0, -1) == [b"job-1", b"job-2"]
    client.close()
    stop()


def test_redis_reuse_restart_and_stale_pidfile(state):
    port = free_port()
    start_redis(state, port)
    pidfile = state / "redis" / embedded.REDIS_PIDFILE
    pid = int(pidfile.read_text())
    _, stop = start_redis(state, port)
    assert int(pidfile.read_text()) == pid  # reused

    other_port = free_port()
    url, stop = start_redis(state, other_port)
    assert port_closed(port)
    assert redis.Redis.from_url(url).ping()

    # A server that died without cleanup leaves a pid file; the pid may now be anything.
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not port_closed(other_port) and time.monotonic() < deadline:
        time.sleep(0.05)
    pidfile.write_text(str(os.getpid()))  # a live process that is not redis
    url, stop = start_redis(state, other_port)
    assert redis.Redis.from_url(url).ping()
    stop()
    assert port_closed(other_port)


@pytest.mark.parametrize("start", [start_postgres, start_redis])
def test_a_port_held_by_another_process_is_refused_and_named(state, start):
    with socket.socket() as squatter:
        squatter.bind((embedded.HOST, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(embedded.PortInUse) as refused:
            start(state, port)
        assert refused.value.port == port
        assert str(refused.value).startswith(f"port {port} is in use by pid {os.getpid()} ")
        # The holder is left alone: it still accepts connections.
        with socket.create_connection((embedded.HOST, port), timeout=2):
            pass
    assert not (state / "postgres" / "postmaster.pid").exists()
    assert not (state / "redis" / embedded.REDIS_PIDFILE).exists()
