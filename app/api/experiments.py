"""/api/experiment/*: the seed's manual mode plus submit, wait, cancel and logs."""

from __future__ import annotations

import time

from flask import Blueprint

from app import schemas
from app.api import endpoint, settings
from app.db import transaction
from app.dispatch import send_all
from app.errors import InvalidInput, Unavailable
from app.gitsource import train_py_at
from app.models import FINISHED_STATUSES
from app.profiles import check_profile
from app.services import experiments as svc
from app.services import lifecycle, runs
from app.services.strategy import CATEGORIES

bp = Blueprint("experiment", __name__)
WAIT_POLL_S = 0.5


def policy() -> lifecycle.Policy:
    return lifecycle.Policy.from_settings(settings())


def check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise InvalidInput(f"category must be one of: {', '.join(CATEGORIES)}", fields={"category": category})


@endpoint(bp, "/api/experiment/setup", "POST", summary="Create a run tag and its branch name",
          request_model=schemas.SetupCreate, response_model=schemas.SetupPublic)
def setup(session, body: schemas.SetupCreate):
    profile = check_profile(body.profile or settings().default_profile)
    tag = svc.setup_tag(session, name=body.tag, profile=profile, early_stopping=body.early_stopping)
    return {"tag": svc.tag_public(tag), "branch": tag.branch}


@endpoint(bp, "/api/experiment/register", "POST", summary="Register an experiment the agent runs itself",
          request_model=schemas.ExperimentCreate, response_model=schemas.Registered)
def register(session, body: schemas.ExperimentCreate):
    check_category(body.category)
    experiment = svc.register(session, **body.model_dump())
    return {"experiment_id": experiment.id, "status": "registered"}


@endpoint(bp, "/api/experiment/complete", "POST", summary="Record metrics; decides keep or discard",
          request_model=schemas.ExperimentComplete, response_model=schemas.Decision)
def complete(session, body: schemas.ExperimentComplete):
    metrics = body.model_dump(exclude={"experiment_id"})
    return lifecycle.complete_manual(session, experiment_id=body.experiment_id, metrics=metrics, policy=policy())


@endpoint(bp, "/api/experiment/crash", "POST", summary="Record a crashed experiment",
          request_model=schemas.ExperimentCrash, response_model=schemas.CrashRecorded)
def crash(session, body: schemas.ExperimentCrash):
    return lifecycle.crash_manual(session, experiment_id=body.experiment_id, error=body.error, policy=policy())


@endpoint(bp, "/api/experiment/history", "POST", summary="Experiments of a tag, oldest first",
          request_model=schemas.HistoryQuery, response_model=schemas.HistoryPublic)
def history(session, body: schemas.HistoryQuery):
    rows = svc.history(session, tag=body.tag, status=body.status, limit=body.limit)
    return {"experiments": [svc.experiment_public(e) for e in rows], "total": len(rows)}


@endpoint(bp, "/api/experiment/best", "POST", summary="The tag's best experiment",
          request_model=schemas.TagQuery, response_model=schemas.BestPublic)
def best(session, body: schemas.TagQuery):
    tag, experiment = svc.best(session, tag=body.tag)
    return {
        "best": {
            "experiment_id": experiment.id,
            "val_bpb": experiment.val_bpb,
            "commit_sha": experiment.commit_sha,
            "updated_at": experiment.finished_at.isoformat() if experiment.finished_at else None,
        },
        "experiment": svc.experiment_public(experiment),
    }


@endpoint(bp, "/api/experiment/near-misses", "POST", summary="Discards within NEAR_MISS_THRESHOLD of the best",
          request_model=schemas.NearMissQuery, response_model=schemas.NearMissesPublic)
def near_misses(session, body: schemas.NearMissQuery):
    rows, total = svc.near_misses(session, tag=body.tag, limit=body.limit)
    return {
        "near_misses": [
            {
                "experiment_id": e.id, "tag": e.tag, "val_bpb": e.val_bpb, "delta": abs(e.delta or 0.0),
                "hypothesis": e.hypothesis, "category": e.category, "diff_summary": e.diff_summary,
            }
            for e in rows
        ],
        "total": total,
    }


@endpoint(bp, "/api/experiment/submit", "POST", summary="Register and queue an experiment for a GPU worker",
          request_model=schemas.ExperimentSubmit, response_model=schemas.Submitted, transactional=False)
def submit(body: schemas.ExperimentSubmit):
    check_category(body.category)
    s = settings()
    train_py = body.train_py if body.train_py is not None else train_py_at(s.repo_dir, body.commit_sha)
    fields = body.model_dump(exclude={"train_py", "gpu_index", "gpu_id", "acknowledge_crashes"})
    with transaction(s.database_url) as session:
        experiment, dispatches = runs.submit(
            session, policy=policy(), acknowledge_crashes=body.acknowledge_crashes, gpu_index=body.gpu_index,
            gpu_id=body.gpu_id, train_py=train_py, **fields,
        )
    try:
        send_all(dispatches, s.broker_url)
    except Exception as exc:
        # Without a message the row would wait forever: say so, and leave no queued orphan.
        with transaction(s.database_url) as session:
            lifecycle.request_cancel(session, experiment_id=experiment.id, policy=policy(),
                                     reason=f"broker unavailable: {exc}")
        raise Unavailable(f"the broker is unreachable ({type(exc).__name__}); experiment not queued",
                          experiment_id=experiment.id) from None
    first = dispatches[0]
    return {"experiment_id": experiment.id, "status": "queued", "task_id": first.task_id, "queue": first.queue,
            "runs": [d.run_id for d in dispatches]}


@endpoint(bp, "/api/experiment/<experiment_id>", "GET", summary="One experiment, with live progress while running",
          response_model=schemas.ExperimentPublic)
def get_one(session, body, experiment_id: str):
    return svc.experiment_public(svc.get_experiment(session, experiment_id))


@endpoint(bp, "/api/experiment/wait", "POST", summary="Long-poll until the experiment finishes or the timeout",
          request_model=schemas.ExperimentWait, response_model=schemas.ExperimentPublic, transactional=False)
def wait(body: schemas.ExperimentWait):
    # Under the API's gevent workers the sleep yields this greenlet: a waiting agent holds no thread.
    deadline = time.monotonic() + body.timeout_s
    while True:
        # A fresh short transaction per look: nothing is held open while waiting. The full record
        # (runs, progress) is built only for the answer, so many waiting agents cost little.
        with transaction(settings().database_url) as session:
            experiment = svc.get_experiment(session, body.experiment_id)
            if experiment.status in FINISHED_STATUSES or time.monotonic() >= deadline:
                return svc.experiment_public(experiment)
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))


@endpoint(bp, "/api/experiment/cancel", "POST", summary="Cancel a queued or running experiment",
          request_model=schemas.ExperimentRef, response_model=schemas.ExperimentPublic)
def cancel(session, body: schemas.ExperimentRef):
    lifecycle.request_cancel(session, experiment_id=body.experiment_id, policy=policy())
    return svc.experiment_public(svc.get_experiment(session, body.experiment_id, fresh=True))


@endpoint(bp, "/api/experiment/<experiment_id>/log", "GET", summary="The tail of the training log",
          request_model=schemas.LogQuery, response_model=schemas.LogPublic)
def log_tail(session, body: schemas.LogQuery, experiment_id: str):
    run = svc.current_run(svc.get_experiment(session, experiment_id))
    return {"experiment_id": experiment_id, **runs.log_of(run, max_bytes=body.max_bytes)}
