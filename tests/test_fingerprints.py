"""A tag pins the setup of its first run; a worker of another setup (here: another tokenizer)
refuses the tag's runs, which then complete on a worker that matches. Real Celery workers."""

from __future__ import annotations

import dataclasses
import shutil
import uuid

import redis
from conftest_data import registration
from test_workers import pool_entry, summary_script, wait_for, wait_until

from app.config import load_settings
from app.stack import Stack
from app.web import create_app


def test_a_worker_of_another_setup_refuses_and_a_matching_one_trains(database_url, redis_url, tiny_cache, tmp_path,
                                                                     db):
    other_cache = tmp_path / "other-cache"
    shutil.copytree(tiny_cache, other_cache)
    with open(other_cache / "tokenizer" / "tokenizer.pkl", "ab") as f:
        f.write(b"\0")  # another tokenizer, as far as its sha256 goes
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=tmp_path / "state", cache_dir=tiny_cache,
        default_profile="tiny", heartbeat_interval=1.0, stale_after=5.0, baseline_runs=1,
        trusted_scoring=False,  # stand-in scripts export no model: the worker takes their printed number
    )
    redis.Redis.from_url(redis_url).flushdb()
    suffix = uuid.uuid4().hex[:6]
    matching, other = f"match-{suffix}", f"other-{suffix}"
    stack = Stack(settings, tmp_path / "logs")
    other_stack = Stack(dataclasses.replace(settings, cache_dir=other_cache), tmp_path / "logs-other")
    stack.start_gpu_worker(0, cpu=True, gpu_id=matching, hostname=f"{matching}@%h")
    other_stack.start_gpu_worker(1, cpu=True, gpu_id=other, hostname=f"{other}@%h")
    client = create_app(settings).test_client()
    try:
        wait_until(lambda: pool_entry(client, matching) and pool_entry(client, other), 60, "both workers")
        tag = f"fp{suffix}"
        client.post("/api/experiment/setup", json={"tag": tag, "profile": "tiny"})

        def submit(source: str, **pin) -> str:
            response = client.post("/api/experiment/submit", json=registration(tag, train_py=source, **pin))
            assert response.status_code == 200, response.get_json()
            return response.get_json()["experiment_id"]

        first = wait_for(client, submit(summary_script(), gpu_id=matching))
        assert first["status"] == "keep"
        tag_record = next(t for t in client.get("/api/report/tags").get_json()["tags"] if t["name"] == tag)
        assert tag_record["fingerprint"]["tokenizer"] == first["runs"][0]["fingerprint"]["tokenizer"]

        # The matching worker is busy; the other one is idle and gets the next run first.
        busy = submit(summary_script(sleep_s=6), gpu_id=matching)
        wait_until(lambda: client.get(f"/api/experiment/{busy}").get_json()["status"] == "running", 30, "busy")
        refused = submit(summary_script())
        wait_until(lambda: "refused by" in (client.get(f"/api/experiment/{refused}").get_json()["runs"][0]["error"]
                                            or ""), 30, "the other worker to refuse")
        run = client.get(f"/api/experiment/{refused}").get_json()["runs"][0]
        assert "tokenizer" in run["error"] and other in run["error"] and run["queue"].startswith("setup.")
        record = wait_for(client, refused)
        assert record["status"] in ("keep", "discard")
        assert record["gpu_id"] == matching
        assert [r["status"] for r in record["runs"]] == ["finished"]
        assert wait_for(client, busy)["gpu_id"] == matching
    finally:
        other_stack.stop_all()
        stack.stop_all()
