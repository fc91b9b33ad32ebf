"""Starting and stopping the processes of the system: API (gunicorn), control worker, beat,
one Celery worker per GPU, Flower; and the embedded servers when no URLs are configured."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.config import PROJECT_ROOT, Settings

STOP_GRACE_S = 20.0  # a warm shutdown lets a worker deregister; then the group is killed


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


def gpu_worker_command(index: int, hostname: str | None = None) -> list[str]:
    return celery_command(
        "worker", "-P", "prefork", "-c", "1", "-Q", f"gpu.{index},train",
        "-n", hostname or f"gpu{index}@%h", "--without-gossip", "--without-mingle", "-l", "INFO",
    )


def gpu_worker_env(index: int, *, cpu: bool, gpu_id: str | None = None) -> dict[str, str]:
    env = {"AUTORESEARCH_GPU_INDEX": str(index), "CUDA_VISIBLE_DEVICES": "" if cpu else str(index)}
    if gpu_id:
        env["AUTORESEARCH_GPU_ID"] = gpu_id
    return env


@dataclass
class Stack:
    """Child processes, each in its own process group so that stopping one stops its children."""

    settings: Settings
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    stoppers: list = field(default_factory=list)

    def start(self, name: str, command: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings_env(self.settings), **(extra_env or {})}
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = process
        return process

    def start_api(self) -> None:
        s = self.settings
        self.start("api", [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "16",
                           "-b", f"{s.api_host}:{s.api_port}", "--timeout", "660", "app.web:create_app()"])

    def start_control(self) -> None:
        self.start("control", celery_command("worker", "-P", "prefork", "-c", "1", "-Q", "control",
                                             "-n", "control@%h", "--without-gossip", "--without-mingle", "-l", "INFO"))
        self.start("beat", celery_command("beat", "-l", "INFO",
                                          "-s", str(self.settings.state_dir / "celerybeat-schedule")))

    def start_gpu_worker(self, index: int, *, cpu: bool, gpu_id: str | None = None,
                         hostname: str | None = None) -> None:
        self.start(f"gpu{index}", gpu_worker_command(index, hostname), gpu_worker_env(index, cpu=cpu, gpu_id=gpu_id))

    def start_flower(self) -> None:
        self.start("flower", celery_command("flower", f"--port={self.settings.flower_port}", "--address=127.0.0.1"))

    def exited(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name)
        _stop_group(process, sig)

    def stop_all(self) -> None:
        # Workers first (they deregister through the database), servers last.
        for name in list(self.processes)[::-1]:
            self.stop(name)
        for stop in reversed(self.stoppers):
            stop()
        self.stoppers.clear()


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


def with_embedded_servers(settings: Settings, stack: Stack) -> Settings:
    """Start embedded Postgres and Redis for whichever URL was not configured."""
    from app import embedded
    from app.config import EMBEDDED_POSTGRES_PORT, EMBEDDED_REDIS_PORT

    if not settings.external_database:
        url, stop = embedded.start_postgres(settings.state_dir, EMBEDDED_POSTGRES_PORT)
        stack.stoppers.append(stop)
        settings = dataclasses.replace(settings, database_url=url)
    if not settings.external_broker:
        url, stop = embedded.start_redis(settings.state_dir, EMBEDDED_REDIS_PORT)
        stack.stoppers.append(stop)
        settings = dataclasses.replace(settings, broker_url=url, result_backend=url)
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
