"""The dashboard: HTML shells that hold no data. Their scripts read everything from the JSON API
with the bearer token kept in the browser's sessionStorage, so with API_TOKEN set a page without
the token shows nothing, and the token never appears in a URL."""

from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def overview():
    return render_template("overview.html")


@bp.get("/tag/<name>")
def tag(name: str):
    return render_template("tag.html", tag=name)


@bp.get("/experiment/<experiment_id>")
def experiment(experiment_id: str):
    return render_template("experiment.html", experiment_id=experiment_id)
