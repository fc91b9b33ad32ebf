"""/api/experiment/*: the seed's manual mode plus submit, wait, cancel and logs."""

from __future__ import annotations

from flask import Blueprint

from app import schemas
from app.api import endpoint, settings
from app.errors import InvalidInput
from app.profiles import check_profile
from app.services import experiments as svc
from app.services.strategy import CATEGORIES

bp = Blueprint("experiment", __name__)


def rules() -> svc.Rules:
    s = settings()
    return svc.Rules(near_miss_threshold=s.near_miss_threshold, max_consecutive_crashes=s.max_consecutive_crashes)


def check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise InvalidInput(f"category must be one of: {', '.join(CATEGORIES)}", fields={"category": category})


@endpoint(bp, "/api/experiment/setup", "POST", summary="Create a run tag and its branch name",
          request_model=schemas.SetupCreate, response_model=schemas.SetupPublic)
def setup(session, body: schemas.SetupCreate):
    profile = check_profile(body.profile or settings().default_profile)
    tag = svc.setup_tag(session, name=body.tag, profile=profile)
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
    return svc.complete(session, experiment_id=body.experiment_id, metrics=metrics, rules=rules())


@endpoint(bp, "/api/experiment/crash", "POST", summary="Record a crashed experiment",
          request_model=schemas.ExperimentCrash, response_model=schemas.CrashRecorded)
def crash(session, body: schemas.ExperimentCrash):
    return svc.record_failure(session, experiment_id=body.experiment_id, error=body.error, rules=rules())


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
