"""Starting and stopping the processes of the system: API (gunicorn), control worker, beat,
one Celery worker per GPU, Flower; and the embedded servers when no URLs are configured.

Supervision. Each child runs in its own session (Ctrl-C reaches `up` only, and stopping a
child's process group stops what it forked: gunicorn's workers, Celery's pool, whose training
child stops its train.py). Whatever way the starting process ends, its children end too:
- a clean stop (stop_all) stops each group: SIGTERM, then SIGKILL after STOP_GRACE_S;
- each child gets SIGTERM from the kernel the moment its parent dies (PR_SET_PDEATHSIG), kill -9
  included, so it begins its own clean shutdown;
- that signal reaches the direct child only, and a Celery worker's warm shutdown waits for its
  pool to finish the run. So a guard process (`python -m app.stack`, in a session of its own,
  hence out of reach of a signal to the parent's process group) is told every child as it
  starts and watches a pipe from the parent: when the pipe closes without the word `done`, the
  parent died, and the guard stops the children's groups as stop_all would have.

State folder. `up` holds an flock on <state>/up.lock, with its pid written in, for as long as it
runs; a second `up` on the folder stops there (StackError naming the pid) and touches nothing.
The children it starts are listed in <state>/up.children; the next `up` stops any of them that
are still alive (processes of their groups whose environment names this state folder) before
it checks ports or touches the embedded servers, so leftovers never make it fail on a busy
port. Everything else with a path (beat's schedule, gunicorn's control socket, logs, the
embedded servers' data) lives under the state folder too, so two stacks with different state
folders and ports (API_PORT, FLOWER_PORT, EMBEDDED_POSTGRES_PORT, EMBEDDED_REDIS_PORT) do not
interfere. The embedded servers follow the rule in app/embedded.py: the lock's holder owns them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from app.config import PROJECT_ROOT, Settings
from app.process_groups import live_group_members, parent_death_signal

FLOWER_USER = "autoresearch"  # Flower's user name when API_TOKEN is set; the password is the token
STOP_GRACE_S = 20.0  # a warm shutdown lets a worker deregister; then the group is killed
KILL_WAIT_S = 10.0  # after SIGKILL, how long a leftover may take to vanish before we give up
LEFTOVER_POLL_S = 0.2  # seconds between looks at the leftovers while they stop
STATE_LOCK = "up.lock"  # in the state folder: flock of the running `up`, its pid written in
CHILDREN_FILE = "up.children"  # in the state folder: one JSON line per child the running `up` started
GUARD_DONE = "done"  # the line that tells the guard its parent stopped the children itself


class StackError(RuntimeError):
    """The stack cannot start here; the message is one line that names the fix."""


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see these settings."""
    env = {
        "DATABASE_URL": settings.database_url,
        "CELERY_BROKER_URL": settings.broker_url,
        "CELERY_RESULT_BACKEND": settings.result_backend,
        "AUTORESEARCH_CACHE": str(settings.cache_dir),
        "AUTORESEARCH_STATE": str(settings.state_dir),
        "AUTORESEARCH_PROFILE": settings.default_profile,
        "KILL_TIMEOUT": str(settings.kill_timeout),
        "NEAR_MISS_THRESHOLD": str(settings.near_miss_threshold),
        "MAX_CONSECUTIVE_CRASHES": str(settings.max_consecutive_crashes),
        "HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
        "STALE_AFTER": str(settings.stale_after),
        "REPORT_INTERVAL": str(settings.report_interval),
        "BASELINE_RUNS": str(settings.baseline_runs),
        "VERDICT_POLICY": settings.verdict_policy,
        "TRUSTED_SCORING": "1" if settings.trusted_scoring else "0",
        "STANDBY_INTERPRETER": "1" if settings.standby_interpreter else "0",
        "STAGED_START_LEAD_S": str(settings.staged_start_lead_s),
        "API_PORT": str(settings.api_port),
        "PYTHONUNBUFFERED": "1",
    }
    if settings.api_token:
        env["API_TOKEN"] = settings.api_token
    if settings.repo_dir:
        env["REPO_DIR"] = str(settings.repo_dir)
    return env


def celery_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "app.celery_app", *args]


def default_gpu_id(index: int) -> str:
    return f"gpu{index}@{socket.gethostname()}"


def gpu_worker_command(index: int, hostname: str | None = None, gpu_id: str | None = None) -> list[str]:
    from app.services.lifecycle import worker_queues

    return celery_command(
        "worker", "-P", "prefork", "-c", "1", "-Q", ",".join(worker_queues(gpu_id or default_gpu_id(index))),
        "-n", hostname or f"gpu{index}@%h", "--without-gossip", "--without-mingle", "-l", "INFO",
    )


def gpu_worker_env(index: int, *, cpu: bool, gpu_id: str | None = None) -> dict[str, str]:
    env = {"AUTORESEARCH_GPU_INDEX": str(index), "CUDA_VISIBLE_DEVICES": "" if cpu else str(index)}
    if gpu_id:
        env["AUTORESEARCH_GPU_ID"] = gpu_id
    return env


@dataclass
class Stack:
    """Child processes, each in its own process group so that stopping one stops its children;
    they end with the process that started them however it ends (module docstring)."""

    settings: Settings
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    stoppers: list = field(default_factory=list)
    guard: subprocess.Popen | None = None
    state_lock: IO[str] | None = None  # set by claim_state_folder()

    def claim_state_folder(self) -> list[str]:
        """Lock the state folder for this stack and stop what an earlier `up` of it left running.

        Raises StackError, naming its pid, when another `up` holds the folder. Returns "name (pids)"
        for each leftover that was stopped.
        """
        state = self.settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        lock = open(state / STATE_LOCK, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise StackError(
                f"autoresearch up is already running on {state} (pid {holder}); stop it, or give a second "
                "stack its own AUTORESEARCH_STATE and ports"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self.state_lock = lock
        children = state / CHILDREN_FILE
        try:
            entries = [json.loads(line) for line in children.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            entries = []
        except (OSError, ValueError) as exc:
            raise StackError(f"{children} is unreadable ({exc}); stop what an earlier up left and delete it") from None
        stopped = stop_leftovers(entries)
        children.write_text("")
        return stopped

    def start(self, name: str, command: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings_env(self.settings), **(extra_env or {})}
        guard = self._running_guard()
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=parent_death_signal(signal.SIGTERM))
        self.processes[name] = process
        entry = json.dumps({"name": name, "pid": process.pid, "state": env["AUTORESEARCH_STATE"]})
        guard.stdin.write(entry + "\n")
        guard.stdin.flush()
        if self.state_lock is not None:
            with open(self.settings.state_dir / CHILDREN_FILE, "a") as children:
                children.write(entry + "\n")
        return process

    def _running_guard(self) -> subprocess.Popen:
        if self.guard is None or self.guard.poll() is not None:
            with open(self.log_dir / "guard.log", "ab") as log:
                self.guard = subprocess.Popen([sys.executable, "-m", "app.stack"], cwd=PROJECT_ROOT, stdin=subprocess.PIPE,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True)
        return self.guard

    def start_api(self) -> None:
        s = self.settings
        # gevent workers (app/gunicorn_conf.py): a long-poll holds a greenlet, not one of a few threads.
        self.start("api", [sys.executable, "-m", "gunicorn", "-w", "2", "-c", "python:app.gunicorn_conf",
                           "-b", f"{s.api_host}:{s.api_port}", "--timeout", "660",
                           "--control-socket", str(s.state_dir / "gunicorn.ctl"), "app.web:create_app()"])

    def start_control(self) -> None:
        self.start("control", celery_command("worker", "-P", "prefork", "-c", "1", "-Q", "control",
                                             "-n", "control@%h", "--without-gossip", "--without-mingle", "-l", "INFO"))
        self.start("beat", celery_command("beat", "-l", "INFO",
                                          "-s", str(self.settings.state_dir / "celerybeat-schedule")))

    def start_gpu_worker(self, index: int, *, cpu: bool, gpu_id: str | None = None,
                         hostname: str | None = None) -> None:
        self.start(f"gpu{index}", gpu_worker_command(index, hostname, gpu_id),
                   gpu_worker_env(index, cpu=cpu, gpu_id=gpu_id))

    def start_flower(self) -> None:
        # With API_TOKEN set, Flower asks for it too (HTTP basic auth). Passed in the environment,
        # not on the command line, where any user of the machine could read it.
        token = self.settings.api_token
        auth = {"FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{token}"} if token else {}
        self.start("flower", celery_command("flower", f"--port={self.settings.flower_port}", "--address=127.0.0.1"),
                   auth)

    def exited(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name)
        _stop_group(process, sig)

    def stop_all(self) -> None:
        try:
            # Workers first (they deregister through the database), servers last.
            for name in list(self.processes)[::-1]:
                self.stop(name)
            for stop in reversed(self.stoppers):
                stop()
            self.stoppers.clear()
        finally:
            self._dismiss_guard()
            self._release_state_folder()

    def _dismiss_guard(self) -> None:
        if self.guard is None:
            return
        with contextlib.suppress(BrokenPipeError):  # it died: nothing to tell
            self.guard.stdin.write(GUARD_DONE + "\n")
            self.guard.stdin.close()
        self.guard.wait()
        self.guard = None

    def _release_state_folder(self) -> None:
        if self.state_lock is None:
            return
        (self.settings.state_dir / CHILDREN_FILE).unlink(missing_ok=True)
        self.state_lock.close()  # closing the file releases the flock
        self.state_lock = None


def _stop_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def stop_leftovers(entries: Iterable[dict]) -> list[str]:
    """Stop the live processes of these children's groups (JSON entries from Stack.start):
    SIGTERM, SIGKILL after STOP_GRACE_S; returns "name (pids)" for each that had any.

    A process counts only if its environment names the entry's state folder, so a pid that was
    reused by an unrelated process since is left alone. Raises StackError when one outlives
    SIGKILL or may not be signalled.
    """
    entries = list(entries)
    found = {entry["name"]: pids for entry in entries if (pids := _leftover_pids(entry))}
    signalled: set[int] = set()
    signum = signal.SIGTERM
    kill_at = time.monotonic() + STOP_GRACE_S
    while alive := [pid for entry in entries for pid in _leftover_pids(entry)]:
        if signum == signal.SIGTERM and time.monotonic() >= kill_at:
            signum, signalled = signal.SIGKILL, set()
        elif time.monotonic() >= kill_at + KILL_WAIT_S:
            raise StackError(f"processes {alive} of an earlier up survive SIGKILL; end them, then start again")
        for pid in set(alive) - signalled:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
            except PermissionError:
                raise StackError(
                    f"process {pid} of an earlier up belongs to another user; end it, then start again"
                ) from None
            signalled.add(pid)
        time.sleep(LEFTOVER_POLL_S)
    return [f"{name} (pid {', '.join(map(str, pids))})" for name, pids in found.items()]


def _leftover_pids(entry: dict) -> list[int]:
    def ours(pid: int) -> bool:
        try:
            return psutil.Process(pid).environ().get("AUTORESEARCH_STATE") == entry["state"]
        except psutil.Error:  # gone, or not ours to read
            return False

    return [pid for pid in live_group_members(entry["pid"]) if ours(pid)]


def guard_children(lines: Iterable[str]) -> None:
    """Body of the guard process (module docstring): collect the children's entries, one JSON line
    each, until `done` (the parent stopped them) or the end of input (the parent died)."""
    entries = []
    for line in lines:
        if line.strip() == GUARD_DONE:
            return
        entries.append(json.loads(line))
    for stopped in stop_leftovers(entries):
        print(f"parent died; stopped {stopped}", flush=True)


def refuse_busy_ports(settings: Settings, *, flower: bool) -> None:
    """StackError naming the holder when a port this stack listens on is taken."""
    from app.embedded import port_holder

    ports = [("API_PORT", settings.api_host, settings.api_port)]
    if flower:
        ports.append(("FLOWER_PORT", "127.0.0.1", settings.flower_port))
    for setting, host, port in ports:
        if holder := port_holder(port, host):
            raise StackError(f"{setting} {port} is in use by {holder}; stop it or set {setting} to a free port")


def with_embedded_servers(settings: Settings, stack: Stack) -> Settings:
    """Start (or adopt) embedded Postgres and Redis for whichever URL was not configured."""
    from app import embedded

    try:
        if not settings.external_database:
            url, stop = embedded.start_postgres(settings.state_dir, settings.embedded_postgres_port)
            stack.stoppers.append(stop)
            settings = dataclasses.replace(settings, database_url=url)
        if not settings.external_broker:
            url, stop = embedded.start_redis(settings.state_dir, settings.embedded_redis_port)
            stack.stoppers.append(stop)
            settings = dataclasses.replace(settings, broker_url=url, result_backend=url)
    except embedded.PortInUse as exc:
        setting = "EMBEDDED_POSTGRES_PORT" if exc.port == settings.embedded_postgres_port else "EMBEDDED_REDIS_PORT"
        raise StackError(f"{exc} ({setting}); stop it, or set {setting} for this stack") from None
    stack.settings = settings
    return settings


def wait_for_http(url: str, timeout_s: float = 60.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")
        time.sleep(0.3)


if __name__ == "__main__":
    guard_children(sys.stdin)
