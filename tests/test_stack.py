"""`autoresearch up` as a real process tree: it takes its children with it however it dies,
holds its state folder, stops what an earlier `up` left, and shares nothing with a second stack.

Each test runs `python -m app.cli up --cpu-workers 1 --no-flower` with a state folder of its own
and looks at the machine's process table (psutil) for what is left."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from conftest_data import REPO_ROOT, registration
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app import embedded

pytestmark = pytest.mark.timeout(300)

START_TIMEOUT_S = 120.0  # migrations, gunicorn, three Celery processes on a shared 2-core machine
GONE_TIMEOUT_S = 60.0  # the guard's grace (STOP_GRACE_S) and its SIGKILL, with room to spare
SLEEPING_TRAIN_PY = "import time\nprint('training', flush=True)\ntime.sleep(600)\n"


@pytest.fixture
def throwaway_database(service_urls):
    """A database of its own on the test Postgres server, dropped afterwards."""
    server = make_url(service_urls[0])
    name = f"autoresearch_stack_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield server.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def scratch():
    # Not under tmp_path: as root, embedded Postgres runs as another user that must traverse every
    # parent folder, and each pytest session resets pytest's shared base folder to mode 0700.
    base = Path(tempfile.mkdtemp(prefix="ar-stack-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def up_env(state: Path, cache: Path, **settings) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "API_TOKEN")}
    env.update(AUTORESEARCH_STATE=str(state), AUTORESEARCH_CACHE=str(cache), API_PORT=str(embedded.free_port()),
               STALE_AFTER="3", HEARTBEAT_INTERVAL="1", KILL_TIMEOUT="120", PYTHONUNBUFFERED="1")
    env.update({key: str(value) for key, value in settings.items()})
    return env


def external_env(state: Path, cache: Path, database_url: str, broker_url: str) -> dict[str, str]:
    return up_env(state, cache, DATABASE_URL=database_url, CELERY_BROKER_URL=broker_url)


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own, as a shell job would be: killpg(up.pid) is "SIGKILL of up's group".
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--cpu-workers", "1", "--no-flower"],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def api(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['API_PORT']}"


def wait_healthy(up: subprocess.Popen, env: dict[str, str], log: Path) -> None:
    """Until the API answers and up has said it is up (its last start-up line); one log per up."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert up.poll() is None, f"up exited {up.returncode}:\n{log.read_text()}"
        try:
            answered = requests.get(f"{api(env)}/health", timeout=2).status_code == 200
        except requests.RequestException:
            answered = False
        if answered and "Ctrl-C stops everything." in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"up did not answer /health within {START_TIMEOUT_S:.0f}s:\n{log.read_text()}")


def tree(pid: int) -> list[psutil.Process]:
    """The process and everything below it, guard included."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def of_state_folder(state: Path) -> list[psutil.Process]:
    """Live processes whose environment names this state folder: the stack's, at any depth."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get("AUTORESEARCH_STATE") == str(state):
                found.append(process)
        except psutil.Error:
            continue
    return found


def wait_gone(processes: list[psutil.Process], timeout_s: float = GONE_TIMEOUT_S) -> list[psutil.Process]:
    """Those of `processes` still alive (zombies count as gone) after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def describe(processes: list[psutil.Process]) -> list[str]:
    described = []
    for process in processes:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:90]}")
        except psutil.Error:
            described.append(f"{process.pid} (gone)")
    return described


def start_training(env: dict[str, str], up: subprocess.Popen) -> psutil.Process:
    """Submit a train.py that sleeps; return its process once a worker runs it."""
    tag = f"stack-{uuid.uuid4().hex[:8]}"
    assert requests.post(f"{api(env)}/api/experiment/setup", json={"tag": tag, "profile": "tiny"},
                         timeout=10).status_code == 200
    response = requests.post(f"{api(env)}/api/experiment/submit", json=registration(tag, train_py=SLEEPING_TRAIN_PY),
                             timeout=10)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for process in tree(up.pid):
            try:
                if runs_train_py(process):
                    return process
            except psutil.Error:  # exited while we looked
                continue
        time.sleep(0.3)
    raise AssertionError("no train.py started within 60 s")


def runs_train_py(process: psutil.Process) -> bool:
    """`python train.py`, or a standby interpreter that was handed a run: it has moved into the
    run's directory (a waiting one sits in the project folder)."""
    command = process.cmdline()
    if command[-1:] and command[-1].endswith("train.py"):
        return True
    return "workers.standby" in command and Path(process.cwd()).name.startswith("run-")


def stop_up(up: subprocess.Popen) -> None:
    """Ctrl-C's path: SIGTERM, and up stops its children itself."""
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=GONE_TIMEOUT_S)


def kill_leftovers(state: Path, *ups: subprocess.Popen) -> None:
    for up in ups:
        if up.poll() is None:
            up.kill()
            up.wait()
    for process in of_state_folder(state):
        process.kill()


# SIGKILL of up's process group: what a shell's kill of the job, or an OOM-killed session, does. (up
# alone is the same case for the guard, which is not in the group; it costs a minute to show again.)
@pytest.mark.parametrize("target", ["process group"])
def test_sigkill_of_up_leaves_no_orphan_and_a_new_up_starts(target, scratch, throwaway_database, redis_url,
                                                            tiny_cache):
    state = scratch / "state"
    env = external_env(state, tiny_cache, throwaway_database, redis_url)
    log = scratch / "up.log"
    up = start_up(env, log)
    again = None
    try:
        wait_healthy(up, env, log)
        train_py = start_training(env, up)

        # A second up on the same state folder stops at the lock, in one line naming the first.
        second = subprocess.run([sys.executable, "-m", "app.cli", "up", "--cpu-workers", "1", "--no-flower"],
                                cwd=REPO_ROOT, env={**env, "API_PORT": str(embedded.free_port())},
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.strip().count("\n") == 0 and f"(pid {up.pid})" in second.stderr, second.stderr
        assert requests.get(f"{api(env)}/health", timeout=5).status_code == 200  # the first one is unharmed

        stack = tree(up.pid)
        names = " ".join(describe(stack))
        assert "gunicorn" in names and "beat" in names and "app.stack" in names, names  # the guard
        assert train_py in stack
        if target == "process group":
            os.killpg(up.pid, signal.SIGKILL)
        else:
            os.kill(up.pid, signal.SIGKILL)
        up.wait()

        left = wait_gone(stack)
        assert not left, describe(left)
        assert not of_state_folder(state), describe(of_state_folder(state))

        log = scratch / "up-again.log"
        again = start_up(env, log)
        wait_healthy(again, env, log)
        later = tree(again.pid)
        stop_up(again)
        assert again.returncode == 0, log.read_text()
        assert not wait_gone(later), describe(wait_gone(later, 0))
        assert not of_state_folder(state)
    finally:
        kill_leftovers(state, up, *([again] if again else []))


def test_next_up_stops_the_leftovers_of_an_up_killed_with_its_guard(scratch, throwaway_database, redis_url,
                                                                   tiny_cache):
    """Nobody cleaned up: the children got only their parent-death SIGTERM, and the GPU worker's
    warm shutdown waits for the run. The next up on the folder ends them before it starts."""
    state = scratch / "state"
    env = external_env(state, tiny_cache, throwaway_database, redis_url)
    log = scratch / "up.log"
    up = start_up(env, log)
    again = None
    try:
        wait_healthy(up, env, log)
        start_training(env, up)
        old = tree(up.pid)
        guard = next(p for p in old if "app.stack" in p.cmdline())
        guard.kill()
        os.kill(up.pid, signal.SIGKILL)
        up.wait()
        time.sleep(2)  # the parent-death signals arrive and the quick ones stop
        survivors = [p for p in old if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        log = scratch / "up-again.log"
        again = start_up(env, log)
        wait_healthy(again, env, log)
        assert not wait_gone(old, 0), describe(wait_gone(old, 0))
        if survivors:
            stopped = [line for line in log.read_text().splitlines() if "left running by an earlier up" in line]
            assert stopped, (describe(survivors), log.read_text())
        stop_up(again)
        assert again.returncode == 0
        assert not of_state_folder(state)
    finally:
        kill_leftovers(state, up, *([again] if again else []))


def test_up_names_the_process_on_its_api_port_and_starts_nothing(scratch, throwaway_database, redis_url,
                                                                tiny_cache):
    state = scratch / "state"
    env = external_env(state, tiny_cache, throwaway_database, redis_url)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(env["API_PORT"])))
        squatter.listen()
        result = subprocess.run([sys.executable, "-m", "app.cli", "up", "--cpu-workers", "1", "--no-flower"],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"API_PORT {env['API_PORT']} is in use by pid {os.getpid()}" in result.stderr
    assert not of_state_folder(state)
    assert not (state / "up.children").exists()  # released on the way out


def test_two_stacks_with_embedded_servers_run_side_by_side(scratch, tiny_cache):
    """Different state folders and ports: both run; a SIGKILL of one leaves the other alone, and
    the killed one's next up adopts its servers instead of starting new ones."""
    envs = {name: up_env(scratch / name / "state", tiny_cache, EMBEDDED_POSTGRES_PORT=embedded.free_port(),
                         EMBEDDED_REDIS_PORT=embedded.free_port()) for name in ("a", "b")}
    logs = {name: scratch / f"{name}.log" for name in envs}
    ups = {name: start_up(env, logs[name]) for name, env in envs.items()}
    again = None
    try:
        for name in envs:
            wait_healthy(ups[name], envs[name], logs[name])
        for env in envs.values():  # gunicorn's control socket, per stack
            assert (Path(env["AUTORESEARCH_STATE"]) / "gunicorn.ctl").exists()
        state_a = Path(envs["a"]["AUTORESEARCH_STATE"])
        postmaster_a = int((state_a / "postgres" / "postmaster.pid").read_text().split()[0])
        stack_a, stack_b = tree(ups["a"].pid), tree(ups["b"].pid)

        os.killpg(ups["a"].pid, signal.SIGKILL)
        ups["a"].wait()
        assert not wait_gone(stack_a), describe(wait_gone(stack_a, 0))
        assert all(p.is_running() for p in stack_b), describe(stack_b)
        assert requests.get(f"{api(envs['b'])}/health", timeout=5).status_code == 200
        assert psutil.pid_exists(postmaster_a)  # servers are detached: the next up adopts them

        log = scratch / "a-again.log"
        again = start_up(envs["a"], log)
        wait_healthy(again, envs["a"], log)
        assert int((state_a / "postgres" / "postmaster.pid").read_text().split()[0]) == postmaster_a
        assert all(p.is_running() for p in stack_b)
        stop_up(again)
        assert again.returncode == 0
        # Adopted servers belong to the folder's up, which stops them when it exits.
        assert not (state_a / "postgres" / "postmaster.pid").exists()
        assert requests.get(f"{api(envs['b'])}/health", timeout=5).status_code == 200
        stop_up(ups["b"])
        assert ups["b"].returncode == 0
    finally:
        for name, env in envs.items():
            state = Path(env["AUTORESEARCH_STATE"])
            kill_leftovers(state, ups[name], *([again] if again and name == "a" else []))
            embedded._stop_postgres(state / "postgres", embedded._postgres_account())
            embedded._stop_redis(state / "redis")


def submit_timed_run(env: dict[str, str], seconds: float) -> str:
    """A train.py that trains for `seconds` (progress lines, then the summary): returns its id."""
    from test_lifecycle import exclusive_script
    from test_workers import writable_by_train_py

    tag = f"stack-{uuid.uuid4().hex[:8]}"
    lock_dir = writable_by_train_py()
    assert requests.post(f"{api(env)}/api/experiment/setup", json={"tag": tag, "profile": "tiny"},
                         timeout=10).status_code == 200
    response = requests.post(f"{api(env)}/api/experiment/submit",
                             json=registration(tag, train_py=exclusive_script(lock_dir, seconds)), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["experiment_id"]


def experiment(env: dict[str, str], experiment_id: str) -> dict:
    return requests.get(f"{api(env)}/api/experiment/{experiment_id}", timeout=10).json()


def wait_status(env: dict[str, str], experiment_id: str, statuses: tuple[str, ...], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = experiment(env, experiment_id)
        if record["status"] in statuses and (statuses != ("running",) or record["progress"]):
            return record
        time.sleep(0.5)
    raise AssertionError(f"{experiment_id} not {statuses} within {timeout_s:.0f}s: {record['status']}")


@pytest.mark.parametrize("victims", ["every process of the stack", "the GPU worker"])
def test_a_run_interrupted_by_sigkill_finishes_after_up_restarts_within_5s(victims, scratch, throwaway_database,
                                                                           redis_url, tiny_cache):
    """SIGKILL of every process of the stack (up, guard, API, beat, workers, train.py), or of the
    GPU worker alone (up then stops the rest); `up` again within 5 s. The run ends final within
    one STALE_AFTER plus one sweep after the restart, trained once at a time, recorded once."""
    state = scratch / "state"
    # The stand-in train.py prints its score and exports no model: the printed number stands.
    env = {**external_env(state, tiny_cache, throwaway_database, redis_url), "TRUSTED_SCORING": "0"}
    log = scratch / "up.log"
    up = start_up(env, log)
    again = None
    try:
        wait_healthy(up, env, log)
        experiment_id = submit_timed_run(env, seconds=6)
        wait_status(env, experiment_id, ("running",), 60)
        stack = tree(up.pid)
        if victims == "every process of the stack":
            for process in stack:
                with contextlib.suppress(psutil.Error):
                    process.kill()
        else:
            worker = next(p for p in stack if "worker" in p.cmdline() and any("gpu." in a for a in p.cmdline()))
            worker.kill()
        up.wait(timeout=GONE_TIMEOUT_S)
        assert not wait_gone(stack), describe(wait_gone(stack, 0))
        time.sleep(2)

        log = scratch / "up-again.log"
        again = start_up(env, log)
        wait_healthy(again, env, log)
        restarted = time.monotonic()
        record = wait_status(env, experiment_id, ("keep", "discard", "crash", "timeout", "cancelled"),
                             float(env["STALE_AFTER"]) + 60)
        assert time.monotonic() - restarted < float(env["STALE_AFTER"]) + 60
        assert record["status"] == "keep", record
        assert "TRAINED TWICE" not in (record["error"] or "")
        # `up` runs a tag's first experiment BASELINE_RUNS times: each replicate finished once.
        replicates = {r["replicate"] for r in record["runs"]}
        for replicate in replicates:
            statuses = [r["status"] for r in record["runs"] if r["replicate"] == replicate]
            assert statuses.count("finished") == 1 and statuses[-1] == "finished", record["runs"]
        assert "lost" in [r["status"] for r in record["runs"]] or victims == "the GPU worker"
        stop_up(again)
        assert again.returncode == 0
    finally:
        kill_leftovers(state, up, *([again] if again else []))
