"""Early stopping with a real worker: in a tag that opted in, a run whose training loss is
clearly worse than the best's at the same progress is stopped and ends `pruned`, with the curve
it was judged on, and no crash is counted."""

from __future__ import annotations

import dataclasses
import textwrap
import uuid

import redis
from conftest_data import registration
from test_workers import pool_entry, wait_for, wait_until

from app.config import load_settings
from app.db import transaction
from app.models import Tag
from app.stack import Stack
from app.web import create_app


def curve_script(loss_scale: float, steps: int, every_s: float) -> str:
    """Progress lines whose loss falls from 6 to 3 (times loss_scale) over the budget, then a summary."""
    return textwrap.dedent(f"""
        import time
        for step in range(1, {steps} + 1):
            share = step / {steps}
            loss = {loss_scale} * (6 - 3 * share)
            print(f"step {{step}} | progress {{100 * share:.1f}}% | loss {{loss:.4f}} | tok/s 1000 | remaining 1s", flush=True)
            time.sleep({every_s})
        print("---")
        print("profile: tiny")
        print("val_bpb: 1.5")
        print("training_seconds: 1.0")
    """)


def test_a_clear_loser_is_pruned_with_its_curve(database_url, redis_url, tiny_cache, tmp_path, db):
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=tmp_path / "state", cache_dir=tiny_cache,
        default_profile="tiny", heartbeat_interval=1.0, stale_after=5.0, baseline_runs=1,
        trusted_scoring=False,  # stand-in scripts: the curve is the point, not the score
    )
    redis.Redis.from_url(redis_url).flushdb()
    gpu_id = f"prune-{uuid.uuid4().hex[:6]}"
    stack = Stack(settings, tmp_path / "logs")
    stack.start_gpu_worker(0, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
    client = create_app(settings).test_client()
    try:
        wait_until(lambda: pool_entry(client, gpu_id), 60, "the worker")
        tag = f"prune{uuid.uuid4().hex[:6]}"
        setup = client.post("/api/experiment/setup", json={"tag": tag, "profile": "tiny", "early_stopping": True})
        assert setup.status_code == 200 and setup.get_json()["tag"]["early_stopping"] is True

        def submit(source: str) -> str:
            response = client.post("/api/experiment/submit", json=registration(tag, train_py=source))
            assert response.status_code == 200, response.get_json()
            return response.get_json()["experiment_id"]

        assert wait_for(client, submit(curve_script(1.0, steps=30, every_s=0.1)))["status"] == "keep"
        # Twice the best's loss all along; it would train for 60 s if nobody stopped it.
        record = wait_for(client, submit(curve_script(2.0, steps=300, every_s=0.2)), timeout_s=120)
        assert record["status"] == "pruned", record
        run = record["runs"][0]
        assert run["status"] == "pruned" and "stopped early" in run["error"] and "training loss" in run["error"]
        assert run["curve"] and 10 <= run["curve"][-1]["progress_pct"] < 100
        assert record["val_bpb"] is None
        with transaction(database_url) as session:
            row = session.get(Tag, tag)
            assert (row.consecutive_crashes, row.crashed_experiments, row.total_experiments) == (0, 0, 2)
    finally:
        stack.stop_all()
