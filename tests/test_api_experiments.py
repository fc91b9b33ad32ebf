"""/api/experiment/*: the seed's manual mode, with the seed's field names and decisions."""

from __future__ import annotations

import pytest
from conftest_data import registration

SHA = "abc1234def"


def setup_tag(client, tag="mar11", **extra):
    response = client.post("/api/experiment/setup", json={"tag": tag, **extra})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def register(client, tag="mar11", **extra):
    body = {
        "tag": tag,
        "commit_sha": SHA,
        "description": "increase depth 8->12",
        "hypothesis": "more depth lowers bpb",
        "category": "architecture",
        "diff_summary": "DEPTH=8 -> DEPTH=12",
        "parent_id": None,
        **extra,
    }
    response = client.post("/api/experiment/register", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["experiment_id"]


def complete(client, experiment_id, val_bpb, **metrics):
    response = client.post(
        "/api/experiment/complete", json={"experiment_id": experiment_id, "val_bpb": val_bpb, **metrics}
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def crash(client, experiment_id, error="RuntimeError: CUDA out of memory"):
    response = client.post("/api/experiment/crash", json={"experiment_id": experiment_id, "error": error})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def tag_record(client, tag="mar11"):
    tags = client.get("/api/report/tags").get_json()["tags"]
    return next(t for t in tags if t["name"] == tag)


def test_setup_returns_tag_and_branch_with_initial_strategy(client):
    body = setup_tag(client, "mar11")
    assert body["branch"] == "autoresearch/mar11"
    tag = body["tag"]
    assert tag["name"] == "mar11"
    assert tag["branch"] == "autoresearch/mar11"
    assert tag["best_val_bpb"] is None
    assert tag["total_experiments"] == 0
    assert tag["kept_experiments"] == 0
    assert tag["profile"] == "tiny"  # the test settings' default profile
    strategy = client.post("/api/search/strategy", json={"tag": "mar11"}).get_json()
    assert strategy["mode"] == "explore"
    assert strategy["explore_ratio"] == 0.7
    assert strategy["temperature"] == 1.0
    assert strategy["reason"] == "initial exploration phase"


def test_setup_takes_a_profile_and_rejects_an_unknown_one(client):
    assert setup_tag(client, "big", profile="h100")["tag"]["profile"] == "h100"
    response = client.post("/api/experiment/setup", json={"tag": "other", "profile": "nope"})
    assert response.status_code == 400
    assert "profile" in response.get_json()["error"]
    assert all(t["name"] != "other" for t in client.get("/api/report/tags").get_json()["tags"])


def test_register_returns_an_id_and_a_running_record(client):
    setup_tag(client)
    response = client.post(
        "/api/experiment/register",
        json={
            "tag": "mar11",
            "commit_sha": "deadbee",
            "description": "baseline",
            "hypothesis": "baseline",
            "category": "other",
            "diff_summary": "none",
            "parent_id": None,
        },
    )
    body = response.get_json()
    assert response.status_code == 200
    assert body["status"] == "registered"
    assert body["experiment_id"].startswith("exp-")
    experiments = client.post("/api/experiment/history", json={"tag": "mar11"}).get_json()["experiments"]
    assert [e["id"] for e in experiments] == [body["experiment_id"]]
    record = experiments[0]
    assert record["status"] == "running"
    assert record["commit_sha"] == "deadbee"
    assert record["started_at"] is not None and record["finished_at"] is None


def test_register_with_parent(client):
    setup_tag(client)
    parent = register(client)
    child = register(client, parent_id=parent)
    history = client.post("/api/experiment/history", json={"tag": "mar11"}).get_json()["experiments"]
    assert {e["id"]: e["parent_id"] for e in history} == {parent: None, child: parent}
    response = client.post(
        "/api/experiment/register",
        json={
            "tag": "mar11",
            "commit_sha": SHA,
            "description": "d",
            "hypothesis": "h",
            "category": "other",
            "parent_id": "exp-nope",
        },
    )
    assert response.status_code == 404
    assert response.get_json()["fields"] == {"parent_id": "exp-nope"}


def test_first_completion_is_kept_with_zero_delta(client):
    setup_tag(client)
    eid = register(client)
    decision = complete(
        client,
        eid,
        0.9979,
        peak_vram_mb=45060.2,
        training_seconds=300.1,
        total_tokens_m=499.6,
        mfu_percent=39.8,
        num_steps=953,
        num_params_m=50.3,
        depth=8,
    )
    assert decision == {
        "experiment_id": eid,
        "status": "keep",
        "val_bpb": 0.9979,
        "improved": True,
        "delta": 0.0,
        "best_val_bpb": 0.9979,
        "near_miss": False,
        "action": "keep_commit",
        # The uncertainty fields: no noise floor yet (manual mode runs each experiment once).
        "sigma": None,
        "z": None,
        "runs": 1,
        "best_runs": 0,
    }
    best = client.post("/api/experiment/best", json={"tag": "mar11"}).get_json()
    assert best["best"]["experiment_id"] == eid
    assert best["best"]["val_bpb"] == 0.9979
    assert best["best"]["commit_sha"] == SHA
    assert best["best"]["updated_at"] is not None
    record = best["experiment"]
    assert record["status"] == "keep"
    assert record["peak_vram_mb"] == 45060.2
    assert record["num_steps"] == 953
    assert record["depth"] == 8
    assert record["finished_at"] is not None


def test_keep_only_on_strictly_lower_val_bpb(client):
    setup_tag(client)
    complete(client, register(client), 1.0)
    equal = complete(client, register(client), 1.0)
    assert equal["improved"] is False and equal["status"] == "discard" and equal["action"] == "git_reset"
    assert equal["delta"] == 0.0 and equal["best_val_bpb"] == 1.0
    worse = complete(client, register(client), 1.1)
    assert worse["status"] == "discard"
    assert worse["delta"] == pytest.approx(-0.1)
    assert worse["best_val_bpb"] == 1.0
    better = complete(client, register(client), 0.9)
    assert better["status"] == "keep" and better["action"] == "keep_commit"
    assert better["delta"] == pytest.approx(0.1)
    assert better["best_val_bpb"] == 0.9
    tag = tag_record(client)
    assert tag["best_val_bpb"] == 0.9
    assert (tag["total_experiments"], tag["kept_experiments"], tag["discarded_experiments"]) == (4, 2, 2)


def test_near_miss_is_a_discard_within_the_threshold(client):
    setup_tag(client)
    complete(client, register(client), 1.0)
    inside = register(client, hypothesis="close one", category="optimizer", diff_summary="lr 0.04")
    assert complete(client, inside, 1.0015)["near_miss"] is True
    equal = register(client, hypothesis="equal one")
    assert complete(client, equal, 1.0)["near_miss"] is True
    outside = register(client)
    assert complete(client, outside, 1.0021)["near_miss"] is False
    kept = register(client)
    assert complete(client, kept, 0.99)["near_miss"] is False

    body = client.post("/api/experiment/near-misses", json={"tag": "mar11"}).get_json()
    assert body["total"] == 2
    # Closest to the best first, with the seed's fields and delta as a positive distance.
    assert [n["experiment_id"] for n in body["near_misses"]] == [equal, inside]
    first, second = body["near_misses"]
    assert first["delta"] == 0.0
    assert second == {
        "experiment_id": inside,
        "tag": "mar11",
        "val_bpb": 1.0015,
        "delta": pytest.approx(0.0015),
        "hypothesis": "close one",
        "category": "optimizer",
        "diff_summary": "lr 0.04",
    }
    limited = client.post("/api/experiment/near-misses", json={"tag": "mar11", "limit": 1}).get_json()
    assert [n["experiment_id"] for n in limited["near_misses"]] == [equal]
    assert limited["total"] == 2


def test_near_miss_threshold_comes_from_settings(settings, db):
    import dataclasses

    from app.web import create_app

    client = create_app(dataclasses.replace(settings, near_miss_threshold=0.05)).test_client()
    setup_tag(client)
    complete(client, register(client), 1.0)
    assert complete(client, register(client), 1.04)["near_miss"] is True


def test_three_consecutive_crashes_abort_and_a_completion_resets(client):
    setup_tag(client)
    first = crash(client, register(client))
    assert first["status"] == "crash"
    assert first["action"] == "git_reset"
    assert (first["consecutive_crashes"], first["should_abort"]) == (1, False)
    assert crash(client, register(client))["should_abort"] is False
    third = crash(client, register(client))
    assert (third["consecutive_crashes"], third["should_abort"]) == (3, True)
    assert crash(client, register(client))["consecutive_crashes"] == 4
    complete(client, register(client), 1.0)
    assert tag_record(client)["consecutive_crashes"] == 0
    after = crash(client, register(client))
    assert (after["consecutive_crashes"], after["should_abort"]) == (1, False)
    tag = tag_record(client)
    assert tag["total_experiments"] == 6
    assert tag["crashed_experiments"] == 5
    assert (
        tag["total_experiments"] == tag["kept_experiments"] + tag["discarded_experiments"] + tag["crashed_experiments"]
    )


def test_crash_records_the_error(client):
    setup_tag(client)
    eid = register(client)
    crash(client, eid, "Traceback: boom")
    record = client.post("/api/experiment/history", json={"tag": "mar11"}).get_json()["experiments"][0]
    assert record["status"] == "crash"
    assert record["error"] == "Traceback: boom"
    assert record["finished_at"] is not None


def test_history_filters_limits_and_orders_oldest_first(client):
    setup_tag(client)
    setup_tag(client, "other")
    ids = [register(client) for _ in range(4)]
    register(client, tag="other")
    complete(client, ids[0], 1.0)
    complete(client, ids[1], 1.2)
    crash(client, ids[2])

    everything = client.post("/api/experiment/history", json={"tag": "mar11"}).get_json()
    assert everything["total"] == 4
    assert [e["id"] for e in everything["experiments"]] == ids
    kept = client.post("/api/experiment/history", json={"tag": "mar11", "status": "keep"}).get_json()
    assert [e["id"] for e in kept["experiments"]] == [ids[0]]
    running = client.post("/api/experiment/history", json={"tag": "mar11", "status": "running"}).get_json()
    assert [e["id"] for e in running["experiments"]] == [ids[3]]
    last_two = client.post("/api/experiment/history", json={"tag": "mar11", "limit": 2}).get_json()
    assert [e["id"] for e in last_two["experiments"]] == ids[2:]
    assert last_two["total"] == 2


def test_best_before_any_result_is_404(client):
    setup_tag(client)
    register(client)
    response = client.post("/api/experiment/best", json={"tag": "mar11"})
    assert response.status_code == 404
    assert response.get_json() == {"error": "No results yet", "tag": "mar11"}


def test_tags_are_independent(client):
    setup_tag(client, "a")
    setup_tag(client, "b")
    complete(client, register(client, tag="a"), 0.9)
    first_b = complete(client, register(client, tag="b"), 1.5)
    assert first_b["improved"] is True and first_b["best_val_bpb"] == 1.5
    assert tag_record(client, "a")["best_val_bpb"] == 0.9
    assert tag_record(client, "b")["best_val_bpb"] == 1.5


def test_completion_accepts_integers_for_float_metrics(client):
    setup_tag(client)
    decision = complete(client, register(client), 1, peak_vram_mb=45060, training_seconds=300)
    assert decision["val_bpb"] == 1.0


def test_complete_and_crash_are_refused_for_a_submitted_experiment(client):
    """A submitted experiment is scored by the worker: the agent cannot report its numbers."""
    client.post("/api/experiment/setup", json={"tag": "dispatched", "profile": "tiny"})
    submitted = client.post("/api/experiment/submit",
                            json=registration("dispatched", train_py="print('x')\n")).get_json()
    for path, body in (("/api/experiment/complete", {"val_bpb": 0.01}), ("/api/experiment/crash", {"error": "x"})):
        response = client.post(path, json={"experiment_id": submitted["experiment_id"], **body})
        assert response.status_code == 409 and "score comes from the worker" in response.get_json()["error"]
    record = client.get(f"/api/experiment/{submitted['experiment_id']}").get_json()
    assert record["status"] == "queued" and record["scored_by"] == "worker"
