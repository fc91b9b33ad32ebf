"""Database URLs as hosts hand them out, and configuration or connection errors of the
`autoresearch` commands: one line naming the setting and the fix, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import text

from app.config import PROJECT_ROOT, ConfigError, load_settings
from app.db import transaction
from app.embedded import free_port
from app.migrate import upgrade

COMMAND_TIMEOUT_S = 120
SERVER_SETTINGS = ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "API_TOKEN", "KILL_TIMEOUT")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_standard_postgres_urls_reach_the_database(database_url, scheme):
    given = database_url.replace("postgresql+psycopg2", scheme, 1)
    settings = load_settings({"DATABASE_URL": given})
    with transaction(settings.database_url) as session:
        assert session.scalar(text("SELECT current_database()")) == database_url.rsplit("/", 1)[1]
    upgrade(settings.database_url)  # already at the newest schema: a no-op that must connect


def autoresearch(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SERVER_SETTINGS}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=PROJECT_ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def test_migrate_takes_a_postgres_url(database_url):
    result = autoresearch("migrate", DATABASE_URL=database_url.replace("postgresql+psycopg2", "postgres", 1))
    assert result.returncode == 0, result.stderr
    assert "newest schema" in result.stdout


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unreachable_servers_are_one_line_naming_the_setting(redis_url, database_url, tmp_path):
    dead_database = f"postgres://agent:hunter2@127.0.0.1:{free_port()}/autoresearch"
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    state = str(tmp_path / "state")
    cases = [
        (["migrate"], {"DATABASE_URL": dead_database}, "DATABASE_URL"),
        (["worker", "--gpu", "0", "--cpu"], {"DATABASE_URL": dead_database, "CELERY_BROKER_URL": redis_url},
         "DATABASE_URL"),
        (["worker", "--gpu", "0", "--cpu"], {"DATABASE_URL": database_url, "CELERY_BROKER_URL": dead_broker},
         "CELERY_BROKER_URL"),
        (["up", "--no-flower", "--cpu-workers", "1"], {"DATABASE_URL": dead_database, "CELERY_BROKER_URL": redis_url},
         "DATABASE_URL"),
        (["up", "--no-flower", "--cpu-workers", "1"], {"DATABASE_URL": database_url, "CELERY_BROKER_URL": dead_broker},
         "CELERY_BROKER_URL"),
    ]
    for args, env, setting in cases:
        line = one_line_error(autoresearch(*args, AUTORESEARCH_STATE=state, **env))
        assert line.startswith(f"autoresearch {args[0]}: {setting}: cannot use"), line
        assert f"point {setting} at" in line and "hunter2" not in line, line


def test_bad_values_are_one_line_naming_the_setting(tmp_path):
    cases = [
        ({"DATABASE_URL": "mysql://db-host/autoresearch"}, "DATABASE_URL must be a Postgres URL"),
        ({"DATABASE_URL": "db-host:5432/autoresearch"}, "DATABASE_URL must be a Postgres URL"),
        ({"DATABASE_URL": "postgres://db-host:port/autoresearch"}, "DATABASE_URL is not a valid URL"),
        ({"DATABASE_URL": "postgres://db-host:5432"}, "DATABASE_URL names no database"),
        ({"CELERY_BROKER_URL": "localhost:6379"}, "CELERY_BROKER_URL must be a Redis URL"),
        ({"KILL_TIMEOUT": "soon"}, "KILL_TIMEOUT='soon' is not a valid float"),
        ({"API_TOKEN": "two words"}, "API_TOKEN must be printable ASCII"),
    ]
    state = str(tmp_path / "state")
    for env, message in cases:
        assert one_line_error(autoresearch("migrate", AUTORESEARCH_STATE=state, **env)).startswith(
            f"configuration error: {message}")
    for command in (["up", "--no-flower"], ["worker", "--gpu", "0"]):
        line = one_line_error(autoresearch(*command, AUTORESEARCH_STATE=state, **cases[0][0]))
        assert line.startswith(f"configuration error: {cases[0][1]}"), (command, line)


@pytest.mark.parametrize("value, form", [
    ("postgresql://u:p@db:5432/ar", "postgresql+psycopg2://u:p@db:5432/ar"),
    ("postgres://db/ar", "postgresql+psycopg2://db/ar"),
    ("POSTGRES://db/ar", "postgresql+psycopg2://db/ar"),
    ("postgresql+psycopg2://db/ar", "postgresql+psycopg2://db/ar"),
])
def test_database_urls_are_normalised_to_psycopg2(value, form):
    assert load_settings({"DATABASE_URL": value}).database_url == form


def test_a_driver_this_project_lacks_is_a_config_error():
    with pytest.raises(ConfigError, match="DATABASE_URL must be a Postgres URL"):
        load_settings({"DATABASE_URL": "postgresql+psycopg://db/ar"})
