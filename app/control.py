"""Beat's tasks, run by the control worker: the lease sweep, strategy adaptation, reports."""

from __future__ import annotations

import logging

from app.celery_app import celery
from app.config import load_settings
from app.db import transaction
from app.dispatch import send_all, task_ids_in_broker
from app.services import reports, runs, strategy
from app.services.lifecycle import Policy

log = logging.getLogger(__name__)


# A queued run is given a new message only after this long without one in the broker.
LOST_MESSAGE_AFTER_S = 60.0


@celery.task(name="app.control.sweep")
def sweep() -> dict:
    """Runs whose lease expired are queued again; queued runs whose message is gone get a new one."""
    settings = load_settings()
    with transaction(settings.database_url) as session:
        requeued = runs.sweep_leases(session, policy=Policy.from_settings(settings))
    send_all(requeued, settings.broker_url)
    for dispatch in requeued:
        log.warning("queued %s on %s after a lease expired", dispatch.run_id, dispatch.queue)
    # Only now look into the broker: the messages just sent must count as present.
    present = task_ids_in_broker(settings.broker_url)
    with transaction(settings.database_url) as session:
        resent = runs.redispatch_lost_messages(session, present_task_ids=present, min_age_s=LOST_MESSAGE_AFTER_S)
    send_all(resent, settings.broker_url)
    for dispatch in resent:
        log.warning("resent the lost message of queued run %s to %s", dispatch.run_id, dispatch.queue)
    return {"requeued": [d.run_id for d in requeued], "resent": [d.run_id for d in resent]}


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
