"""Beat's tasks, called as functions (dispatch is covered in test_workers.py)."""

from __future__ import annotations

import json

from conftest_data import registration

from app import control
from app.db import transaction
from app.services import experiments as svc
from app.services import lifecycle
from app.stack import settings_env

POLICY = lifecycle.Policy()


def use_settings(monkeypatch, settings) -> None:
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)


def finished_experiments(database_url: str, tag: str, values: list[float | None]) -> None:
    with transaction(database_url) as session:
        svc.setup_tag(session, name=tag, profile="tiny")
        for number, value in enumerate(values):
            experiment = svc.register(session, tag=tag, commit_sha=f"{number:07x}", description=f"run {number}",
                                      hypothesis="h", category="optimizer")
            if value is None:
                lifecycle.crash_manual(session, experiment_id=experiment.id, error="boom", policy=POLICY)
            else:
                lifecycle.complete_manual(session, experiment_id=experiment.id,
                                          metrics={"val_bpb": value, "peak_vram_mb": 2048.0}, policy=POLICY)


def test_scheduled_report_writes_summary_tsv_and_plot(settings, db, monkeypatch):
    use_settings(monkeypatch, settings)
    finished_experiments(db, "reported", [1.2, 1.1, 1.15, None, 1.05])
    written = control.write_reports()
    folder = settings.reports_dir / "reported"
    assert written == {"reported": str(folder)}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best"]["val_bpb"] == 1.05 and summary["stats"]["total"] == 5
    lines = (folder / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert lines[4] == "0000003\t0.000000\t0.0\tcrash\trun 3"
    assert len(lines) == 6
    png = (folder / "progress.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_adapt_active_tags_moves_a_crashing_tag_to_exploit(settings, db, monkeypatch):
    use_settings(monkeypatch, settings)
    finished_experiments(db, "crashy", [1.0, None, None, None, None, None])
    finished_experiments(db, "young", [1.0])
    modes = control.adapt_active_tags()
    assert modes == {"crashy": "exploit", "young": "explore"}


def test_sweep_marks_a_silent_gpu_offline(client, settings, db, monkeypatch):
    import dataclasses

    from app.services import pool

    use_settings(monkeypatch, dataclasses.replace(settings, stale_after=0.5))
    with transaction(db) as session:
        pool.register_gpu(session, gpu_id="silent", gpu_index=0, gpu_name="cpu", vram_mb=0.0)
    import time

    time.sleep(1.0)
    assert control.sweep() == {"requeued": [], "resent": []}
    entry = client.get("/api/pool/list").get_json()["workers"][0]
    assert entry["id"] == "silent" and entry["status"] == "offline"


def test_sweep_resends_the_message_of_a_queued_experiment_the_broker_lost(client, settings, db, monkeypatch):
    import redis
    from sqlalchemy import text

    from app.dispatch import task_ids_in_broker
    from app.models import Run

    use_settings(monkeypatch, settings)
    broker = redis.Redis.from_url(settings.broker_url)
    broker.flushdb()
    client.post("/api/experiment/setup", json={"tag": "lostmsg", "profile": "tiny"})
    submitted = client.post("/api/experiment/submit",
                            json=registration("lostmsg", train_py="print('hi')\n")).get_json()
    assert submitted["task_id"] in task_ids_in_broker(settings.broker_url)
    # Young and present: left alone.
    assert control.sweep()["resent"] == []
    broker.flushdb()  # Redis restarted without persistence: the message is gone
    with transaction(db) as session:
        session.execute(text("UPDATE runs SET queued_at = now() - interval '2 minutes'"))
    assert control.sweep()["resent"] == submitted["runs"]
    with transaction(db) as session:
        new_task_id = session.get(Run, submitted["runs"][0]).task_id
    assert new_task_id != submitted["task_id"] and task_ids_in_broker(settings.broker_url) == {new_task_id}
    assert control.sweep()["resent"] == []  # present again: nothing more to do
    broker.flushdb()
