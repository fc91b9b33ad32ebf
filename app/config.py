"""Every setting of the service, read from the environment in this one place.

Defaults work on a single machine: the database and broker URLs point at the embedded
Postgres and Redis that `autoresearch up` starts under the state folder when no URL is set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from run_profiles import PROFILES

EMBEDDED_POSTGRES_PORT = 54329
EMBEDDED_REDIS_PORT = 63799


def embedded_database_url(port: int) -> str:
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/autoresearch"


def embedded_broker_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


DEFAULT_DATABASE_URL = embedded_database_url(EMBEDDED_POSTGRES_PORT)
DEFAULT_BROKER_URL = embedded_broker_url(EMBEDDED_REDIS_PORT)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Where a root worker keeps what its sandboxed train.py runs may read (workers/sandbox.py).
SANDBOX_ROOT = Path("/var/lib/autoresearch-sandbox")
# A finished run's result waits this long for Postgres to come back before the worker gives up:
# minutes of GPU time must not be lost to a database restart.
RECORD_RETRY_S = 900.0


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


class ServerUnreachable(ConfigError):
    """A configured server does not answer; the message names the setting and the fix."""


# SQLAlchemy reads a bare postgresql:// as psycopg 3, which this project does not install, and
# knows no postgres:// at all; hosts hand out both forms, and both mean psycopg2 here.
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")
BROKER_SCHEMES = ("redis", "rediss")
DATABASE_URL_FORM = "postgresql://user:password@host:5432/dbname"


def database_url_from(raw: str, setting: str = "DATABASE_URL") -> str:
    """`raw` as the psycopg2 URL SQLAlchemy needs, or a ConfigError naming `setting`."""
    scheme, separator, rest = raw.partition("://")
    if not separator or scheme.lower() not in POSTGRES_SCHEMES:
        got = f"scheme {scheme!r}" if separator else "no scheme"
        raise ConfigError(f"{setting} must be a Postgres URL such as {DATABASE_URL_FORM} (got {got})")
    url = f"postgresql+psycopg2://{rest}"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"{setting} is not a valid URL ({exc}); use the form {DATABASE_URL_FORM}") from None
    if not parsed.database:
        raise ConfigError(f"{setting} names no database; end it with /dbname, as in {DATABASE_URL_FORM}")
    return url


def broker_url_from(raw: str, setting: str = "CELERY_BROKER_URL") -> str:
    scheme, separator, _ = raw.partition("://")
    if not separator or scheme.lower() not in BROKER_SCHEMES:
        got = f"scheme {scheme!r}" if separator else "no scheme"
        raise ConfigError(f"{setting} must be a Redis URL such as redis://host:6379/0 (got {got})")
    try:
        urlsplit(raw).port  # noqa: B018  (urlsplit checks the port only when it is read)
    except ValueError as exc:
        raise ConfigError(f"{setting} is not a valid URL ({exc}); use the form redis://host:6379/0") from None
    return raw


def project_pythonpath() -> str:
    """PYTHONPATH for the processes a worker starts (train.py, the evaluator): the project first,
    for prepare.py and the workers package, then the worker's own, where packages may live."""
    return os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)


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
    # Ports of the embedded servers `up` starts when no URL is set; a second stack on the machine needs others.
    embedded_postgres_port: int = EMBEDDED_POSTGRES_PORT
    embedded_redis_port: int = EMBEDDED_REDIS_PORT
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "autoresearch")
    state_dir: Path = field(default_factory=lambda: PROJECT_ROOT / "state")
    default_profile: str = "h100"
    kill_timeout: float = 900.0  # upper cap on a run's deadline (run_deadline_s), start-up and eval included
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
    baseline_runs: int = 3  # runs of a tag's first experiment, which measure the noise floor
    # app.services.verdicts: how runs become keep / discard / another run
    verdict_policy: str = field(default_factory=lambda: _verdict_policy(None))
    # The worker scores a run's exported model with its own evaluator (workers/evaluator.py), and
    # a run that exported none is a crash; off (TRUSTED_SCORING=0), such a run keeps train.py's
    # printed val_bpb: only for stand-in scripts (tests).
    trusted_scoring: bool = True
    # A GPU worker starts the interpreters of its next train.py and its next trusted evaluation
    # between runs, imports done (workers/standby.py); off (STANDBY_INTERPRETER=0), every run and
    # evaluation starts a fresh one.
    standby_interpreter: bool = True
    # A GPU worker starts its next run while the current one still has this many seconds of its
    # budget to train, and holds it before its second batch (workers/runner.py, stage_training);
    # 0: a run starts only when the one before it has been recorded.
    staged_start_lead_s: float = 90.0

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def reports_dir(self) -> Path:
        return self.state_dir / "reports"

    @property
    def sandbox_dir(self) -> Path:
        # workers/sandbox.py: the sandbox user's home and the cache views. A root worker keeps
        # them out of the state folder, which train.py must not reach; others cannot write there.
        return SANDBOX_ROOT if os.geteuid() == 0 else self.state_dir / "sandbox"

    # Every bound on a run, derived here from KILL_TIMEOUT so that they agree: the worker kills
    # train.py at its deadline (its profile's budget and allowance, at most kill_timeout), then
    # retries recording the result for record_retry_s; Celery's hard limit is a backstop beyond
    # both; Redis redelivers an unacked message only after that.
    def run_deadline_s(self, profile: str) -> float:
        """Seconds the worker lets one train.py of `profile` run, on its own clock."""
        constants = PROFILES[profile]
        return min(self.kill_timeout, constants["TIME_BUDGET"] + constants["STARTUP_ALLOWANCE"])

    @property
    def record_retry_s(self) -> float:
        return RECORD_RETRY_S

    @property
    def task_time_limit(self) -> int:
        return int(self.kill_timeout + self.record_retry_s + 60)

    @property
    def visibility_timeout(self) -> int:
        return self.task_time_limit + 300

    @property
    def sweep_interval(self) -> float:
        # Beat sweeps for expired leases often enough that a lost run waits at most half a lease more.
        return max(1.0, min(15.0, self.stale_after / 2))

    @property
    def lease_s(self) -> float:
        # A run's lease lasts as long as a GPU may stay silent; the worker renews it every beat.
        return self.stale_after


def _verdict_policy(name: str | None) -> str:
    # The policies are the verdict module's (a pure leaf module, importable from here).
    from app.services.verdicts import DEFAULT_POLICY, POLICIES

    name = name or DEFAULT_POLICY
    if name not in POLICIES:
        raise ConfigError(f"VERDICT_POLICY={name!r} is not a policy; choose one of: {', '.join(POLICIES)}")
    return name


def _api_token(token: str | None) -> str | None:
    # It travels in an HTTP header, which is ASCII, and Flower splits its credentials on commas.
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token and "," not in token):
        raise ConfigError("API_TOKEN must be printable ASCII without spaces or commas; choose another token")
    return token


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = (env.get(name) or "").strip().lower()
    if not value:
        return default
    if value not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
        raise ConfigError(f"{name}={env[name]!r} is not on or off; set it to 1 or 0")
    return value in ("1", "true", "on", "yes")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    postgres_port = _number(env, "EMBEDDED_POSTGRES_PORT", EMBEDDED_POSTGRES_PORT, int)
    redis_port = _number(env, "EMBEDDED_REDIS_PORT", EMBEDDED_REDIS_PORT, int)
    database_url = database_url_from(env["DATABASE_URL"]) if env.get("DATABASE_URL") \
        else embedded_database_url(postgres_port)
    broker_url = broker_url_from(env["CELERY_BROKER_URL"]) if env.get("CELERY_BROKER_URL") \
        else embedded_broker_url(redis_port)
    repo_dir = env.get("REPO_DIR")
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        result_backend=env.get("CELERY_RESULT_BACKEND") or broker_url,
        external_database=bool(env.get("DATABASE_URL")),
        external_broker=bool(env.get("CELERY_BROKER_URL")),
        api_token=_api_token(env.get("API_TOKEN") or None),
        api_host=env.get("API_HOST") or "127.0.0.1",
        api_port=_number(env, "API_PORT", 3111, int),
        api_url=(env.get("AUTORESEARCH_API_URL") or "").rstrip("/") or None,
        flower_port=_number(env, "FLOWER_PORT", 5555, int),
        embedded_postgres_port=postgres_port,
        embedded_redis_port=redis_port,
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
        baseline_runs=_number(env, "BASELINE_RUNS", 3, int),
        verdict_policy=_verdict_policy(env.get("VERDICT_POLICY")),
        trusted_scoring=_switch(env, "TRUSTED_SCORING", True),
        standby_interpreter=_switch(env, "STANDBY_INTERPRETER", True),
        staged_start_lead_s=_number(env, "STAGED_START_LEAD_S", 90.0),
    )
