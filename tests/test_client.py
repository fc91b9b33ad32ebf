"""The agent client end to end: `autoresearch submit|wait|status|best|diff|...` run as
subprocesses from a git repository of their own, against a real API (gunicorn) with a bearer
token and a real CPU worker training a stand-in train.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from test_workers import summary_script, wait_until

from app import embedded
from app.config import load_settings
from app.models import FINISHED_STATUSES
from app.stack import Stack, wait_for_http

AUTORESEARCH = str(Path(sys.executable).with_name("autoresearch"))
TOKEN = "client-test-token"
COMMAND_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def agent_api(database_url, redis_url, tiny_cache, tmp_path_factory):
    """A real API requiring a token, and one CPU worker: what an agent's commands talk to."""
    state = tmp_path_factory.mktemp("state")
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=state, cache_dir=tiny_cache,
        default_profile="tiny", kill_timeout=120, heartbeat_interval=1.0, stale_after=4.0,
        api_port=embedded.free_port(), api_token=TOKEN,
        trusted_scoring=False,  # stand-in train.py files: their printed number stands
    )
    gpu_id = f"client{uuid.uuid4().hex[:6]}-gpu0"
    stack = Stack(settings, state / "logs")
    try:
        stack.start_api()
        stack.start_gpu_worker(0, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
        url = f"http://127.0.0.1:{settings.api_port}"
        wait_for_http(f"{url}/health")

        def worker_idle():
            pool = requests.get(f"{url}/api/pool/list", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            return any(w["id"] == gpu_id and w["status"] == "idle" for w in pool.json()["workers"])

        wait_until(worker_idle, 60, "the CPU worker to register")
        yield {"url": url, "gpu_id": gpu_id}
    finally:
        stack.stop_all()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=agent", "-c", "user.email=agent@example.com",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def agent_repo(tmp_path) -> Path:
    """The agent's repository: a committed train.py that prints the summary block."""
    repo = tmp_path / "agent"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "train.py").write_text(summary_script())
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "baseline")
    return repo


def client_env(url: str, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_TOKEN", "API_HOST", "API_PORT")}
    env["AUTORESEARCH_API_URL"] = url
    if token:
        env["API_TOKEN"] = token
    return env


def autoresearch(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([AUTORESEARCH, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)


def answer(*args: str, cwd: Path, env: dict[str, str]) -> dict:
    """Run a command that must succeed; its stdout is the API's JSON."""
    result = autoresearch(*args, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def refusal(*args: str, cwd: Path, env: dict[str, str], exit_code: int) -> str:
    """Run a command that must fail with one line on stderr, nothing on stdout; that line."""
    result = autoresearch(*args, cwd=cwd, env=env)
    assert result.returncode == exit_code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def submit_args(tag: str, description: str, *extra: str) -> list[str]:
    return ["submit", "--tag", tag, "--description", description, "--hypothesis", "h", "--category", "other", *extra]


def test_submit_wait_best_and_diff_from_the_agents_repository(agent_api, agent_repo):
    env = client_env(agent_api["url"])
    tag = f"c{uuid.uuid4().hex[:10]}"
    setup = answer("setup", "--tag", tag, "--profile", "tiny", cwd=agent_repo, env=env)
    assert setup["tag"]["name"] == tag and setup["tag"]["profile"] == "tiny"

    baseline_sha = git(agent_repo, "rev-parse", "HEAD")
    first = answer(*submit_args(tag, "baseline"), cwd=agent_repo, env=env)
    assert first["status"] == "queued" and first["experiment_id"].startswith("exp-")
    record = answer("wait", first["experiment_id"], cwd=agent_repo, env=env)
    # The server ran exactly the committed file and recorded HEAD as its commit.
    assert record["status"] == "keep", record
    assert record["commit_sha"] == baseline_sha
    assert record["val_bpb"] == 1.5 and record["gpu_id"] == agent_api["gpu_id"]

    # The next experiment: a committed change, built on the best.
    (agent_repo / "train.py").write_text(summary_script().replace('("val_bpb", "1.5")', '("val_bpb", "1.4")'))
    git(agent_repo, "commit", "-qam", "lower")
    second = answer(*submit_args(tag, "lower", "--parent", "best", "--diff-summary", "1.5 -> 1.4"),
                    cwd=agent_repo, env=env)
    record = answer("wait", second["experiment_id"], "--timeout", "100", cwd=agent_repo, env=env)
    assert record["status"] in FINISHED_STATUSES and record["status"] not in ("crash", "timeout"), record
    assert record["parent_id"] == first["experiment_id"]
    assert record["commit_sha"] == git(agent_repo, "rev-parse", "HEAD") != baseline_sha

    best = answer("best", "--tag", tag, cwd=agent_repo, env=env)
    expected_best = second if record["status"] == "keep" else first
    assert best["best"]["experiment_id"] == expected_best["experiment_id"]

    diff = answer("diff", first["experiment_id"], second["experiment_id"], cwd=agent_repo, env=env)
    changed = [line for line in diff["diff"].splitlines() if line[:1] in "-+" and line[:3] not in ("---", "+++")]
    assert len(changed) == 2 and '"1.5"' in changed[0] and '"1.4"' in changed[1], diff["diff"]
    assert diff["delta_bpb"] == pytest.approx(-0.1)

    suggest = answer("suggest", "--tag", tag, cwd=agent_repo, env=env)
    assert suggest["total_experiments"] == 2 and suggest["suggestions"]

    history = answer("history", "--tag", tag, cwd=agent_repo, env=env)
    assert [e["id"] for e in history["experiments"]] == [first["experiment_id"], second["experiment_id"]]

    # The short tables people read name the same things.
    table = autoresearch("status", "--table", cwd=agent_repo, env=env)
    assert table.returncode == 0 and agent_api["gpu_id"] in table.stdout and tag in table.stdout
    table = autoresearch("status", first["experiment_id"], "--table", cwd=agent_repo, env=env)
    assert table.returncode == 0
    assert [line.split() for line in table.stdout.splitlines() if line.startswith(("status", "val_bpb"))] == [
        ["status", "keep"], ["val_bpb", "1.500000"]]


def test_wait_with_a_timeout_answers_the_live_record_and_cancel_stops_it(agent_api, agent_repo):
    env = client_env(agent_api["url"])
    tag = f"c{uuid.uuid4().hex[:10]}"
    answer("setup", "--tag", tag, "--profile", "tiny", cwd=agent_repo, env=env)
    (agent_repo / "train.py").write_text(summary_script(sleep_s=60))
    git(agent_repo, "commit", "-qam", "slow")
    submitted = answer(*submit_args(tag, "slow"), cwd=agent_repo, env=env)
    live = answer("wait", submitted["experiment_id"], "--timeout", "1", cwd=agent_repo, env=env)
    assert live["status"] in ("queued", "running")
    cancelled = answer("cancel", submitted["experiment_id"], cwd=agent_repo, env=env)
    assert cancelled["id"] == submitted["experiment_id"]
    final = answer("wait", submitted["experiment_id"], "--timeout", "60", cwd=agent_repo, env=env)
    assert final["status"] == "cancelled"


def test_submit_refuses_a_train_py_that_differs_from_its_commit(agent_api, agent_repo):
    env = client_env(agent_api["url"])
    (agent_repo / "train.py").write_text(summary_script() + "\n# not committed\n")
    line = refusal(*submit_args("anytag", "dirty"), cwd=agent_repo, env=env, exit_code=2)
    assert "differs from HEAD" in line and "commit" in line
    line = refusal(*submit_args("anytag", "elsewhere"), cwd=agent_repo.parent, env=env, exit_code=2)
    assert "no train.py" in line and "--train-py" in line


def test_api_errors_print_the_apis_one_line_message(agent_api, agent_repo):
    env = client_env(agent_api["url"])
    line = refusal("best", "--tag", "no-such-tag", cwd=agent_repo, env=env, exit_code=1)
    assert line == "error: Tag 'no-such-tag' not found (HTTP 404)"
    tag = f"c{uuid.uuid4().hex[:10]}"
    answer("setup", "--tag", tag, cwd=agent_repo, env=env)
    line = refusal(*submit_args(tag, "x")[:-1], "vibes", cwd=agent_repo, env=env, exit_code=1)
    assert "category must be one of" in line and "(HTTP 400)" in line
    line = refusal("status", cwd=agent_repo, env=client_env(agent_api["url"], token=None), exit_code=1)
    assert "bearer token" in line and "set API_TOKEN" in line


def test_an_unreachable_api_is_one_line_naming_the_url_and_autoresearch_up(tmp_path):
    url = f"http://127.0.0.1:{embedded.free_port()}"
    line = refusal("status", cwd=tmp_path, env=client_env(url), exit_code=3)
    assert url in line and "autoresearch up" in line
