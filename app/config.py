"""Every setting of the service, read from the environment in this one place.

Defaults work on a single machine: the database and broker URLs point at the embedded
Postgres and Redis that `autoresearch up` starts under the state folder when no URL is set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED_POSTGRES_PORT = 54329
EMBEDDED_REDIS_PORT = 63799
DEFAULT_DATABASE_URL = f"postgresql+psycopg2://postgres@127.0.0.1:{EMBEDDED_POSTGRES_PORT}/autoresearch"
DEFAULT_BROKER_URL = f"redis://127.0.0.1:{EMBEDDED_REDIS_PORT}/0"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _number(env: Mapping[str, str], name: str, default: float, kind=float):
    raw = env.get(name)
    if raw is None or raw == "":
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}; unset it or fix the value") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return value


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_BROKER_URL
    # True when the URLs above came from the environment rather than the defaults:
    # `autoresearch up` starts embedded servers only when they did not.
    external_database: bool = False
    external_broker: bool = False
    api_token: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 3111
    # Where the client commands (`autoresearch submit`, `mcp`, ...) reach the API; else API_HOST:API_PORT.
    api_url: str | None = None
    flower_port: int = 5555
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "autoresearch")
    state_dir: Path = field(default_factory=lambda: PROJECT_ROOT / "state")
    default_profile: str = "h100"
    kill_timeout: float = 900.0  # seconds a train.py may run, start-up and eval included
    near_miss_threshold: float = 0.002
    max_consecutive_crashes: int = 3
    heartbeat_interval: float = 10.0
    stale_after: float = 60.0  # seconds of heartbeat silence before a GPU counts as offline
    repo_dir: Path | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    # Identity of a GPU worker process, set by `autoresearch worker --gpu N`.
    worker_gpu_index: int | None = None
    worker_gpu_id: str | None = None
    report_interval: float = 300.0  # seconds between the scheduled reports of active tags

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def reports_dir(self) -> Path:
        return self.state_dir / "reports"

    @property
    def visibility_timeout(self) -> int:
        # Redis redelivers an unacked message after this long; it must outlast the longest run.
        return int(self.kill_timeout + 600)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    database_url = env.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    broker_url = env.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL
    repo_dir = env.get("REPO_DIR")
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        result_backend=env.get("CELERY_RESULT_BACKEND") or broker_url,
        external_database=bool(env.get("DATABASE_URL")),
        external_broker=bool(env.get("CELERY_BROKER_URL")),
        api_token=env.get("API_TOKEN") or None,
        api_host=env.get("API_HOST") or "127.0.0.1",
        api_port=_number(env, "API_PORT", 3111, int),
        api_url=(env.get("AUTORESEARCH_API_URL") or "").rstrip("/") or None,
        flower_port=_number(env, "FLOWER_PORT", 5555, int),
        cache_dir=Path(env.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch").expanduser(),
        state_dir=Path(env.get("AUTORESEARCH_STATE") or PROJECT_ROOT / "state").expanduser(),
        default_profile=env.get("AUTORESEARCH_PROFILE") or "h100",
        kill_timeout=_number(env, "KILL_TIMEOUT", 900.0),
        near_miss_threshold=_number(env, "NEAR_MISS_THRESHOLD", 0.002),
        max_consecutive_crashes=_number(env, "MAX_CONSECUTIVE_CRASHES", 3, int),
        heartbeat_interval=_number(env, "HEARTBEAT_INTERVAL", 10.0),
        stale_after=_number(env, "STALE_AFTER", 60.0),
        repo_dir=Path(repo_dir).expanduser() if repo_dir else None,
        max_body_bytes=_number(env, "MAX_BODY_BYTES", 2 * 1024 * 1024, int),
        worker_gpu_index=_number(env, "AUTORESEARCH_GPU_INDEX", 0, int) if env.get("AUTORESEARCH_GPU_INDEX") else None,
        worker_gpu_id=env.get("AUTORESEARCH_GPU_ID") or None,
        report_interval=_number(env, "REPORT_INTERVAL", 300.0),
    )
