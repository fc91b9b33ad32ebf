"""The API as `autoresearch up` serves it (Stack.start_api: gunicorn, gevent workers) against real
Postgres and Redis: many waiting agents and slow clients leave it answering, a database outage
is 503 JSON with one log line, bytes that are not text are 400 JSON, and Flower asks for the
token. Latency bounds here are the issue's (within 1 s), measured on whatever runs the tests."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import requests
from conftest_data import registration
from sqlalchemy import create_engine, text
from test_workers import wait_until

from app import embedded
from app.db import CONNECT_TIMEOUT_S
from app.migrate import upgrade
from app.stack import FLOWER_USER, Stack, wait_for_http

TAG = "service"
WAITING_AGENTS = 64
SLOW_CLIENTS = 40
WAIT_S = 20
ANSWER_WITHIN_S = 1.0
TOKEN = "service-token"


@contextmanager
def served(settings, tmp_path: Path, **changes):
    """The API started the way `up` starts it, on a free port; yields its base URL and log file."""
    settings = dataclasses.replace(settings, api_port=embedded.free_port(), state_dir=tmp_path / "state", **changes)
    stack = Stack(settings, tmp_path / "logs")
    try:
        stack.start_api()
        url = f"http://127.0.0.1:{settings.api_port}"
        wait_for_http(f"{url}/openapi.json")  # answers without the database, which some tests take away
        yield url, stack.log_dir / "api.log"
    finally:
        stack.stop_all()


def timed(call, *args, **kwargs) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call(*args, timeout=30, **kwargs)
    return response, time.monotonic() - started


def assert_answering(url: str, tag: str) -> None:
    """/health and a submit each answer, and within the bound."""
    health, seconds = timed(requests.get, f"{url}/health")
    assert health.status_code == 200 and seconds < ANSWER_WITHIN_S, (health.status_code, seconds)
    submit, seconds = timed(requests.post, f"{url}/api/experiment/submit",
                            json=registration(tag, train_py="print('queued only: no worker runs it')"))
    assert submit.status_code == 200 and seconds < ANSWER_WITHIN_S, (submit.text, seconds)


def running_experiment(url: str, tag: str) -> str:
    """A manual-mode experiment: `running` until the agent reports, so a wait on it lasts."""
    assert requests.post(f"{url}/api/experiment/setup", json={"tag": tag, "profile": "tiny"}, timeout=30).ok
    response = requests.post(f"{url}/api/experiment/register", json=registration(tag), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["experiment_id"]


@pytest.fixture
def empty_broker(redis_url):
    """Submits here queue messages no worker takes: leave none behind for later tests."""
    yield
    redis.Redis.from_url(redis_url).flushdb()


def test_64_waiting_agents_leave_health_and_submit_answering(settings, db, tmp_path, empty_broker):
    with served(settings, tmp_path) as (url, _):
        experiment_id = running_experiment(url, TAG)
        with ThreadPoolExecutor(WAITING_AGENTS) as agents:
            waits = [agents.submit(requests.post, f"{url}/api/experiment/wait",
                                   json={"experiment_id": experiment_id, "timeout_s": WAIT_S}, timeout=WAIT_S + 60)
                     for _ in range(WAITING_AGENTS)]
            time.sleep(3)  # every wait is in flight
            for _ in range(3):
                assert_answering(url, TAG)
            assert not any(w.done() for w in waits), "a wait ended before its timeout"
            answers = [w.result() for w in waits]
    assert [a.status_code for a in answers] == [200] * WAITING_AGENTS
    assert {a.json()["status"] for a in answers} == {"running"}


def test_slow_header_clients_do_not_starve_the_api(settings, db, tmp_path, empty_broker):
    with served(settings, tmp_path) as (url, _):
        running_experiment(url, TAG)
        port = int(url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(SLOW_CLIENTS)]
        try:
            for client in slow:
                client.sendall(b"GET /health HTTP/1.1\r\nHost: slow\r\n")  # and the rest of the headers later
            time.sleep(1)
            for _ in range(3):
                assert_answering(url, TAG)
            for client in slow:  # each finishes its request and gets its answer
                client.sendall(b"Connection: close\r\n\r\n")
            assert all(client.recv(64).startswith(b"HTTP/1.1 200") for client in slow)
        finally:
            for client in slow:
                client.close()


def test_requests_blocked_inside_postgres_leave_the_others_answering(settings, db, tmp_path):
    """psycopg2 waits for the server through gevent: a query stuck on a lock holds its greenlet,
    not its worker process."""
    with served(settings, tmp_path) as (url, _):
        experiment_id = running_experiment(url, TAG)
        locker = create_engine(settings.database_url)
        try:
            with ThreadPoolExecutor(8) as readers:
                with locker.connect() as conn, conn.begin():
                    conn.execute(text("LOCK TABLE experiments IN ACCESS EXCLUSIVE MODE"))
                    reads = [readers.submit(requests.get, f"{url}/api/experiment/{experiment_id}", timeout=60)
                             for _ in range(8)]
                    time.sleep(2)
                    assert not any(r.done() for r in reads), "a read passed the lock"
                    health, seconds = timed(requests.get, f"{url}/health")
                    assert health.status_code == 200 and seconds < ANSWER_WITHIN_S, seconds
                assert [r.result().status_code for r in reads] == [200] * 8
        finally:
            locker.dispose()


OUTAGE_REQUESTS = [
    ("GET", "/api/experiment/{id}", None),
    ("GET", "/api/experiment/{id}/log", None),
    ("GET", "/api/pool/list", None),
    ("GET", "/api/report/tags", None),
    ("POST", "/api/experiment/setup", {"tag": "during-outage"}),
    ("POST", "/api/experiment/history", {"tag": TAG}),
    ("POST", "/api/experiment/wait", {"experiment_id": "{id}", "timeout_s": 1}),
    ("POST", "/api/experiment/submit", registration(TAG, train_py="print(1)")),
    ("POST", "/api/search/strategy", {"tag": TAG}),
    ("POST", "/api/report/summary", {"tag": TAG}),
]


def outage_request(url: str, method: str, path: str, body, experiment_id: str) -> requests.Response:
    path = path.format(id=experiment_id)
    if body is not None:
        body = {k: v.format(id=experiment_id) if isinstance(v, str) else v for k, v in body.items()}
    return requests.request(method, f"{url}{path}", json=body, timeout=30)


def test_a_database_outage_is_503_json_on_every_path_and_one_log_line(settings, redis_url, tmp_path, empty_broker):
    # Not under pytest's tmp root: the postgres system user must be able to enter it (see conftest).
    state = Path(tempfile.mkdtemp(prefix="ar-outage-"))
    port = embedded.free_port()
    database_url, stop_postgres = embedded.start_postgres(state, port)
    try:
        upgrade(database_url)
        with served(settings, tmp_path, database_url=database_url) as (url, log_file):
            experiment_id = running_experiment(url, TAG)
            stop_postgres()
            for _ in range(3):
                for method, path, body in OUTAGE_REQUESTS:
                    response = outage_request(url, method, path, body, experiment_id)
                    assert response.status_code == 503, (method, path, response.text)
                    assert "database" in response.json()["error"] and response.headers["Retry-After"]
            health = requests.get(f"{url}/health", timeout=30)
            assert health.status_code == 503
            assert health.json() == {"error": "database unreachable", "status": "degraded",
                                     "database": "unreachable: OperationalError", "broker": "ok"}

            database_url_again, stop_postgres = embedded.start_postgres(state, port)
            assert database_url_again == database_url
            wait_until(lambda: requests.get(f"{url}/health", timeout=30).status_code == 200, 60, "the API to recover")
            for _ in range(10):  # both worker processes see the database again
                assert requests.get(f"{url}/api/experiment/{experiment_id}", timeout=30).json()["status"] == "running"
            log = log_file.read_text()
    finally:
        stop_postgres()
        shutil.rmtree(state, ignore_errors=True)
    assert "Traceback" not in log
    # One line per outage in each API worker process that met it (`up` starts two), not one per request.
    assert 1 <= log.count("database unreachable (") <= 2, log
    assert 1 <= log.count("database reachable again") <= log.count("database unreachable ("), log


def test_a_database_that_never_answers_is_a_503_after_the_connect_timeout(settings, db, tmp_path):
    """A server that takes the connection and says nothing (a host gone behind a firewall that
    drops packets looks the same to libpq): requests end in 503, not in TCP's minutes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes each handshake; nobody ever reads or answers
        mute = f"postgresql+psycopg2://postgres@127.0.0.1:{silent.getsockname()[1]}/autoresearch"
        with served(settings, tmp_path, database_url=mute) as (url, _):
            for path in ("/api/experiment/exp-1", "/health"):
                response, seconds = timed(requests.get, f"{url}{path}")
                assert response.status_code == 503, response.text
                assert CONNECT_TIMEOUT_S <= seconds < CONNECT_TIMEOUT_S + 10, (path, seconds)


def raw_request(port: int, request: bytes) -> tuple[bytes, bytes]:
    """(status line, body) of one request sent byte for byte, as no HTTP client library would."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(request)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


NOT_TEXT = [
    (b"/api/pool/list", b"Authorization: Bearer \xc3\xa9t\xc3\xa9\r\n"),  # UTF-8 bytes in a header
    (b"/api/pool/list", b"Authorization: Bearer \xe9\r\n"),  # a lone latin-1 byte
    (b"/api/experiment/%00", None),
    (b"/api/experiment/%ff%fe", None),  # percent-escapes that are not UTF-8
    (b"/api/report/plot?tag=%c3", None),
]


def test_bytes_that_are_not_text_are_400_json(settings, db, tmp_path):
    with served(settings, tmp_path, api_token=TOKEN) as (url, log_file):
        port = int(url.rsplit(":", 1)[1])
        for target, header in NOT_TEXT:
            auth = header or f"Authorization: Bearer {TOKEN}\r\n".encode()
            status, body = raw_request(port, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                                       + auth + b"\r\n")
            assert status.startswith(b"HTTP/1.1 400"), (target, status, body)
            assert json.loads(body)["error"], body
        # The service is unharmed: a request with the token answers.
        assert requests.get(f"{url}/api/report/tags", headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=30).status_code == 200
    assert "Traceback" not in log_file.read_text()


def test_flower_asks_for_the_token_when_api_token_is_set(settings, tmp_path):
    settings = dataclasses.replace(settings, flower_port=embedded.free_port(), api_token=TOKEN,
                                   state_dir=tmp_path / "state")
    stack = Stack(settings, tmp_path / "logs")
    url = f"http://127.0.0.1:{settings.flower_port}"
    try:
        stack.start_flower()
        wait_for_http(url)
        assert requests.get(url, timeout=30).status_code == 401
        assert requests.get(f"{url}/api/workers", timeout=30).status_code == 401
        wrong = base64.b64encode(f"{FLOWER_USER}:wrong".encode()).decode()
        assert requests.get(url, headers={"Authorization": f"Basic {wrong}"}, timeout=30).status_code == 401
        assert requests.get(url, auth=(FLOWER_USER, TOKEN), timeout=30).status_code == 200
        # Not on its command line, which every user of the machine can read.
        assert TOKEN not in Path(f"/proc/{stack.processes['flower'].pid}/cmdline").read_text()
    finally:
        stack.stop_all()


def test_flower_asks_for_nothing_without_api_token(settings, tmp_path):
    settings = dataclasses.replace(settings, flower_port=embedded.free_port(), state_dir=tmp_path / "state")
    stack = Stack(settings, tmp_path / "logs")
    url = f"http://127.0.0.1:{settings.flower_port}"
    try:
        stack.start_flower()
        wait_for_http(url)
        assert requests.get(url, timeout=30).status_code == 200
    finally:
        stack.stop_all()
