"""/api/pool/*: registration, heartbeats, the offline sweep, leases."""

from __future__ import annotations

import dataclasses

from conftest_data import registration
from sqlalchemy import text

from app.db import transaction


def register_gpu(client, gpu_id="host-a:0", gpu_index=0, **extra):
    body = {"gpu_id": gpu_id, "gpu_index": gpu_index, "gpu_name": "NVIDIA H100 80GB HBM3", "vram_mb": 81559.0, **extra}
    response = client.post("/api/pool/register", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def experiment(client, tag="mar11"):
    client.post("/api/experiment/setup", json={"tag": tag})
    return client.post("/api/experiment/register", json=registration(tag)).get_json()["experiment_id"]


def pool(client):
    response = client.get("/api/pool/list")
    assert response.status_code == 200
    return response.get_json()


def silence(database_url, gpu_id, seconds):
    with transaction(database_url) as session:
        session.execute(
            text("UPDATE gpus SET last_heartbeat = now() - make_interval(secs => :s) WHERE id = :id"),
            {"s": seconds, "id": gpu_id},
        )


def test_register_returns_the_seed_worker_record(client):
    body = register_gpu(client, "host-a:1", 1, host="host-a")
    assert body["registered"] is True
    worker = body["worker"]
    assert worker["id"] == "host-a:1"
    assert worker["name"] == "gpu-1"
    assert worker["gpu_index"] == 1
    assert worker["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert worker["vram_mb"] == 81559.0
    assert worker["status"] == "idle"
    assert worker["current_experiment_id"] is None
    assert worker["registered_at"] and worker["last_heartbeat"]


def test_list_counts_by_status(client):
    register_gpu(client, "g0", 0)
    register_gpu(client, "g1", 1)
    body = pool(client)
    assert (body["total"], body["idle"], body["training"], body["offline"]) == (2, 2, 0, 0)
    assert [w["id"] for w in body["workers"]] == ["g0", "g1"]
    client.post("/api/pool/acquire", json={"experiment_id": experiment(client)})
    body = pool(client)
    assert (body["total"], body["idle"], body["training"], body["offline"]) == (2, 1, 1, 0)


def test_silent_gpu_goes_offline_and_a_heartbeat_brings_it_back(client, db):
    register_gpu(client, "g0", 0)
    silence(db, "g0", 61)
    body = pool(client)
    assert body["offline"] == 1 and body["workers"][0]["status"] == "offline"
    beat = client.post("/api/pool/heartbeat", json={"gpu_id": "g0", "telemetry": {"util": 97, "temp_c": 61}})
    assert beat.status_code == 200 and beat.get_json() == {"ok": True}
    (worker,) = pool(client)["workers"]
    assert worker["status"] == "idle"
    assert worker["telemetry"] == {"util": 97, "temp_c": 61}


def test_offline_gpu_holding_a_lease_comes_back_training(client, db):
    register_gpu(client, "g0", 0)
    eid = experiment(client)
    assert client.post("/api/pool/acquire", json={"experiment_id": eid}).get_json()["acquired"] is True
    silence(db, "g0", 120)
    assert pool(client)["workers"][0]["status"] == "offline"
    client.post("/api/pool/heartbeat", json={"gpu_id": "g0"})
    worker = pool(client)["workers"][0]
    assert worker["status"] == "training"
    assert worker["current_experiment_id"] == eid


def test_stale_after_comes_from_settings(settings, db):
    from app.web import create_app

    client = create_app(dataclasses.replace(settings, stale_after=5.0)).test_client()
    register_gpu(client, "g0", 0)
    silence(db, "g0", 6)
    assert pool(client)["offline"] == 1


def test_heartbeat_of_an_unknown_gpu_is_404(client):
    response = client.post("/api/pool/heartbeat", json={"gpu_id": "ghost"})
    assert response.status_code == 404
    assert response.get_json()["error"] == "GPU worker not found"


def test_acquire_leases_the_lowest_idle_gpu_then_reports_none(client):
    register_gpu(client, "g1", 1)
    register_gpu(client, "g0", 0)
    first, second, third = experiment(client), experiment(client), experiment(client)
    assert client.post("/api/pool/acquire", json={"experiment_id": first}).get_json() == {
        "acquired": True,
        "gpu_id": "g0",
        "gpu_index": 0,
    }
    assert client.post("/api/pool/acquire", json={"experiment_id": second}).get_json()["gpu_id"] == "g1"
    assert client.post("/api/pool/acquire", json={"experiment_id": third}).get_json() == {
        "acquired": False,
        "gpu_id": None,
        "reason": "no idle GPUs",
    }
    leases = {w["id"]: w["current_experiment_id"] for w in pool(client)["workers"]}
    assert leases == {"g0": first, "g1": second}


def test_acquire_skips_a_silent_gpu(client, db):
    register_gpu(client, "g0", 0)
    silence(db, "g0", 61)
    body = client.post("/api/pool/acquire", json={"experiment_id": experiment(client)}).get_json()
    assert body["acquired"] is False


def test_acquire_for_an_unknown_experiment_is_404_and_leases_nothing(client):
    register_gpu(client, "g0", 0)
    response = client.post("/api/pool/acquire", json={"experiment_id": "exp-nope"})
    assert response.status_code == 404
    assert pool(client)["idle"] == 1


def test_release_by_the_holder_frees_the_gpu(client):
    register_gpu(client, "g0", 0)
    eid = experiment(client)
    client.post("/api/pool/acquire", json={"experiment_id": eid})
    response = client.post("/api/pool/release", json={"gpu_id": "g0", "experiment_id": eid})
    assert response.status_code == 200 and response.get_json() == {"released": True}
    worker = pool(client)["workers"][0]
    assert worker["status"] == "idle" and worker["current_experiment_id"] is None


def test_release_by_a_non_holder_is_409_and_keeps_the_lease(client):
    register_gpu(client, "g0", 0)
    holder, other = experiment(client), experiment(client)
    client.post("/api/pool/acquire", json={"experiment_id": holder})
    response = client.post("/api/pool/release", json={"gpu_id": "g0", "experiment_id": other})
    assert response.status_code == 409
    body = response.get_json()
    assert "not leased by this experiment" in body["error"]
    assert body["leased_to"] == holder
    worker = pool(client)["workers"][0]
    assert worker["status"] == "training" and worker["current_experiment_id"] == holder


def test_release_of_an_idle_gpu_is_409(client):
    register_gpu(client, "g0", 0)
    response = client.post("/api/pool/release", json={"gpu_id": "g0", "experiment_id": experiment(client)})
    assert response.status_code == 409


def test_release_needs_the_experiment_id_as_in_the_seed(client):
    register_gpu(client, "g0", 0)
    eid = experiment(client)
    client.post("/api/pool/acquire", json={"experiment_id": eid})
    response = client.post("/api/pool/release", json={"gpu_id": "g0"})
    assert response.status_code == 400
    assert "experiment_id" in response.get_json()["error"]
    assert pool(client)["training"] == 1


def test_release_of_an_unknown_gpu_is_404(client):
    response = client.post("/api/pool/release", json={"gpu_id": "ghost", "experiment_id": "exp-x"})
    assert response.status_code == 404


def test_reregister_comes_back_idle_and_deregister_removes(client):
    register_gpu(client, "g0", 0)
    client.post("/api/pool/acquire", json={"experiment_id": experiment(client)})
    worker = register_gpu(client, "g0", 0, vram_mb=40960.0)["worker"]
    assert worker["status"] == "idle" and worker["current_experiment_id"] is None
    assert worker["vram_mb"] == 40960.0
    assert pool(client)["total"] == 1
    response = client.post("/api/pool/deregister", json={"gpu_id": "g0"})
    assert response.status_code == 200 and response.get_json() == {"deregistered": True}
    assert pool(client)["total"] == 0
    assert client.post("/api/pool/deregister", json={"gpu_id": "g0"}).status_code == 404
