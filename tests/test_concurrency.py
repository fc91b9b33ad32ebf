"""Races through the HTTP API: two API server processes on two ports over one Postgres, with
requests from many threads released together by a barrier."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from conftest_data import registration
from sqlalchemy import text

from app.db import transaction

TAG = "race"
SERVER = """
from werkzeug.serving import make_server
from app.web import create_app
server = make_server("127.0.0.1", 0, create_app(), threaded=True)
print(server.port, flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def api_processes(database_url, redis_url, tmp_path_factory):
    """Base URLs of two API processes sharing the test database; started once (importing the
    app takes seconds), each test empties the database through `db`."""
    tmp_path = tmp_path_factory.mktemp("api")
    repo_root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": redis_url,
        "AUTORESEARCH_STATE": str(tmp_path / "state"),
        "AUTORESEARCH_PROFILE": "tiny",
        "PYTHONPATH": str(repo_root),
    }
    env.pop("API_TOKEN", None)
    processes = []
    for number in range(2):
        log = open(tmp_path / f"server{number}.log", "w")  # closed after the processes end
        processes.append(
            (
                subprocess.Popen(
                    [sys.executable, "-c", SERVER],
                    cwd=repo_root,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                ),
                log,
            )
        )
    try:
        urls = []
        for process, _ in processes:
            port = process.stdout.readline().strip()
            assert port.isdigit(), f"API server did not start; see {tmp_path}"
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for process, log in processes:
            process.terminate()
            process.wait(timeout=10)
            process.stdout.close()
            log.close()


@pytest.fixture
def servers(api_processes, db):
    return api_processes


def post(base, path, body):
    response = requests.post(base + path, json=body, timeout=60)
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    return response


def race(calls):
    """Run each call in its own thread, all released at once; return their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(index, call):
        barrier.wait()
        try:
            results[index] = call()
        except Exception as exc:  # reported by the assertions on results
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def register(base, tag=TAG):
    response = post(base, "/api/experiment/register", registration(tag))
    assert response.status_code == 200, response.text
    return response.json()["experiment_id"]


def test_32_simultaneous_completions_of_one_tag_are_decided_one_after_another(servers, db):
    a, b = servers
    assert post(a, "/api/experiment/setup", {"tag": TAG}).status_code == 200
    count = 32
    ids = [register(servers[i % 2]) for i in range(count)]
    values = [round(1.0 + 0.0007 * i, 6) for i in range(count)]
    random.Random(11).shuffle(values)
    value_of = dict(zip(ids, values, strict=True))

    responses = race(
        [
            (
                lambda i=i: post(
                    servers[i % 2], "/api/experiment/complete", {"experiment_id": ids[i], "val_bpb": values[i]}
                )
            )
            for i in range(count)
        ]
    )
    assert [r.status_code for r in responses] == [200] * count, [r.text for r in responses if r.status_code != 200]
    decisions = {r.json()["experiment_id"]: r.json() for r in responses}
    assert set(decisions) == set(ids)

    # Each answer says what the best was when it was decided: best_before = val_bpb + delta,
    # except for the very first result, kept against no best with delta 0.
    def best_before(d):
        return None if d["improved"] and d["delta"] == 0 else d["val_bpb"] + d["delta"]

    keeps = sorted((d for d in decisions.values() if d["improved"]), key=lambda d: -d["val_bpb"])
    discards = [d for d in decisions.values() if not d["improved"]]
    keep_values = [k["val_bpb"] for k in keeps]

    # Keeps form one chain: each was decided against the keep just above it, so each is strictly
    # lower than every keep decided before it, and none was decided against a stale best.
    assert best_before(keeps[0]) is None
    for previous, keep in zip(keeps, keeps[1:], strict=False):
        assert best_before(keep) == pytest.approx(previous["val_bpb"], abs=1e-9)
        assert keep["val_bpb"] < previous["val_bpb"]
    for keep in keeps:
        assert keep["status"] == "keep" and keep["action"] == "keep_commit"
        assert keep["best_val_bpb"] == keep["val_bpb"]
    # Every discard was decided against a best that existed, and was no better than it.
    for discard in discards:
        before = best_before(discard)
        assert any(before == pytest.approx(v, abs=1e-9) for v in keep_values), discard
        assert discard["val_bpb"] >= before - 1e-12
        assert discard["best_val_bpb"] == pytest.approx(before, abs=1e-9)
        assert discard["status"] == "discard" and discard["action"] == "git_reset"
        assert discard["near_miss"] is (discard["val_bpb"] - before < 0.002)

    # The database agrees, and finished_at orders the results the way they were decided:
    # replaying them in that order gives back every decision.
    with transaction(db) as session:
        tag = session.execute(text("SELECT * FROM tags WHERE name = :t"), {"t": TAG}).mappings().one()
        rows = session.execute(
            text("SELECT id, status, val_bpb, near_miss FROM experiments WHERE tag = :t ORDER BY finished_at, id"),
            {"t": TAG},
        ).all()
    assert tag["best_val_bpb"] == min(values)
    assert value_of[tag["best_experiment_id"]] == min(values)
    assert tag["total_experiments"] == count
    assert tag["kept_experiments"] + tag["discarded_experiments"] == tag["total_experiments"]
    assert tag["kept_experiments"] == len(keeps) == sum(1 for r in rows if r.status == "keep")
    assert tag["discarded_experiments"] == len(discards) == sum(1 for r in rows if r.status == "discard")
    best = None
    for row in rows:
        expected = "keep" if best is None or row.val_bpb < best else "discard"
        assert row.status == expected == decisions[row.id]["status"], row
        assert row.near_miss is decisions[row.id]["near_miss"]
        best = row.val_bpb if expected == "keep" else best

    progression = post(b, "/api/report/summary", {"tag": TAG}).json()["bpb_progression"]
    assert [p["val_bpb"] for p in progression] == keep_values


def test_simultaneous_completions_of_one_experiment_count_once(servers, db):
    a, _ = servers
    assert post(a, "/api/experiment/setup", {"tag": TAG}).status_code == 200
    eid = register(a)
    responses = race(
        [
            (lambda i=i: post(servers[i % 2], "/api/experiment/complete", {"experiment_id": eid, "val_bpb": 1.0 + i}))
            for i in range(8)
        ]
    )
    assert sorted(r.status_code for r in responses) == [200] + [409] * 7
    tag = post(a, "/api/report/summary", {"tag": TAG}).json()["stats"]
    assert (tag["total"], tag["kept"]) == (1, 1)


def test_two_agents_acquire_the_only_gpu_exactly_one_wins(servers, db):
    a, b = servers
    assert post(a, "/api/experiment/setup", {"tag": TAG}).status_code == 200
    assert (
        post(
            a,
            "/api/pool/register",
            {
                "gpu_id": "only",
                "gpu_index": 0,
                "gpu_name": "H100",
                "vram_mb": 81559.0,
            },
        ).status_code
        == 200
    )
    for _ in range(5):
        first, second = register(a), register(b)
        responses = race(
            [
                lambda first=first: post(a, "/api/pool/acquire", {"experiment_id": first}),
                lambda second=second: post(b, "/api/pool/acquire", {"experiment_id": second}),
            ]
        )
        bodies = [r.json() for r in responses]
        assert [r.status_code for r in responses] == [200, 200]
        winners = [body for body in bodies if body["acquired"]]
        assert len(winners) == 1, bodies
        loser = next(body for body in bodies if not body["acquired"])
        assert loser == {"acquired": False, "gpu_id": None, "reason": "no idle GPUs"}
        holder = first if bodies[0]["acquired"] else second
        (worker,) = requests.get(a + "/api/pool/list", timeout=10).json()["workers"]
        assert worker["status"] == "training" and worker["current_experiment_id"] == holder
        released = post(b, "/api/pool/release", {"gpu_id": "only", "experiment_id": holder})
        assert released.status_code == 200


def test_agents_racing_for_two_gpus_get_distinct_ones(servers, db):
    a, b = servers
    assert post(a, "/api/experiment/setup", {"tag": TAG}).status_code == 200
    for index in range(2):
        post(a, "/api/pool/register", {"gpu_id": f"g{index}", "gpu_index": index, "gpu_name": "H100", "vram_mb": 1.0})
    ids = [register(servers[i % 2]) for i in range(6)]
    responses = race(
        [(lambda i=i: post(servers[i % 2], "/api/pool/acquire", {"experiment_id": ids[i]})) for i in range(6)]
    )
    winners = [r.json() for r in responses if r.json()["acquired"]]
    assert sorted(w["gpu_id"] for w in winners) == ["g0", "g1"]


def test_simultaneous_setup_of_one_tag_creates_it_once(servers, db):
    responses = race([(lambda i=i: post(servers[i % 2], "/api/experiment/setup", {"tag": "same"})) for i in range(8)])
    assert sorted(r.status_code for r in responses) == [200] + [409] * 7, [r.text for r in responses]
    tags = requests.get(servers[0] + "/api/report/tags", timeout=10).json()["tags"]
    assert [t["name"] for t in tags] == ["same"]


def test_simultaneous_registration_of_one_gpu(servers, db):
    responses = race(
        [
            (
                lambda i=i: post(
                    servers[i % 2],
                    "/api/pool/register",
                    {
                        "gpu_id": "host:0",
                        "gpu_index": 0,
                        "gpu_name": "H100",
                        "vram_mb": 1.0,
                    },
                )
            )
            for i in range(8)
        ]
    )
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert requests.get(servers[1] + "/api/pool/list", timeout=10).json()["total"] == 1
