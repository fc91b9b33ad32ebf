"""/api/report/*: summaries, results.tsv, diffs, tags."""

from __future__ import annotations

from flask import Blueprint, Response

from app import schemas
from app.api import endpoint
from app.plot import progress_png
from app.services import reports as svc

bp = Blueprint("report", __name__)


@endpoint(bp, "/api/report/summary", "POST", summary="Summary of a tag",
          request_model=schemas.TagQuery, response_model=schemas.SummaryPublic)
def summary(session, body: schemas.TagQuery):
    return svc.summary(session, tag=body.tag)


@endpoint(bp, "/api/report/tsv", "POST", summary="autoresearch's results.tsv for a tag",
          request_model=schemas.TagQuery, response_model=schemas.TsvPublic)
def tsv(session, body: schemas.TagQuery):
    return svc.tsv(session, tag=body.tag)


@endpoint(bp, "/api/report/diff", "POST", summary="Compare two experiments, with the train.py diff",
          request_model=schemas.DiffQuery, response_model=schemas.DiffPublic)
def diff(session, body: schemas.DiffQuery):
    return svc.diff(session, experiment_a=body.experiment_a, experiment_b=body.experiment_b)


@endpoint(bp, "/api/report/tags", "GET", summary="All run tags, newest first", response_model=schemas.TagsPublic)
def tags(session, body):
    return svc.tags(session)


@endpoint(bp, "/api/report/plot", "GET", summary="PNG of the tag's progress: dots and the running best",
          request_model=schemas.TagQuery)
def plot(session, body: schemas.TagQuery):
    png = progress_png(body.tag, svc.progress_points(session, tag=body.tag))
    return Response(png, mimetype="image/png")


@endpoint(bp, "/api/report/progress", "GET", summary="Every result of a tag in completion order, with the running best",
          request_model=schemas.TagQuery, response_model=schemas.ProgressPublic)
def progress(session, body: schemas.TagQuery):
    return {"tag": body.tag, "points": svc.progress_points(session, tag=body.tag)}


@endpoint(bp, "/api/report/overview", "GET",
          summary="Every tag with its counts, live experiments, noise floor, GPU-hours and experiments per GPU-hour",
          response_model=schemas.OverviewPublic)
def overview(session, body):
    return svc.overview(session)
