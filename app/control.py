"""Beat's tasks, run by the control worker: the offline sweep, strategy adaptation, reports."""

from __future__ import annotations

import logging

from app.celery_app import celery
from app.config import load_settings
from app.db import transaction
from app.dispatch import send
from app.services import reports, runs, strategy
from app.services.experiments import Rules

log = logging.getLogger(__name__)


@celery.task(name="app.control.sweep")
def sweep() -> dict:
    settings = load_settings()
    rules = Rules(settings.near_miss_threshold, settings.max_consecutive_crashes)
    with transaction(settings.database_url) as session:
        dispatches = runs.recover_lost_runs(session, stale_after=settings.stale_after, rules=rules)
    for dispatch in dispatches:
        send(dispatch)
        log.warning("requeued %s on %s after its worker went silent", dispatch.experiment_id, dispatch.queue)
    return {"requeued": [d.experiment_id for d in dispatches]}


@celery.task(name="app.control.adapt_active_tags")
def adapt_active_tags() -> dict:
    settings = load_settings()
    with transaction(settings.database_url) as session:
        tags = reports.active_tags(session)
        modes = {tag: strategy.adapt(session, tag=tag)["mode"] for tag in tags}
    return modes


@celery.task(name="app.control.write_reports")
def write_reports() -> dict:
    from app.report_files import write_tag_report

    settings = load_settings()
    with transaction(settings.database_url) as session:
        tags = reports.active_tags(session)
    return {tag: str(write_tag_report(settings, tag)) for tag in tags}
