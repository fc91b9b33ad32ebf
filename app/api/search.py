"""/api/search/*: the search strategy of a tag."""

from __future__ import annotations

from flask import Blueprint

from app import schemas
from app.api import endpoint
from app.services import strategy as svc

bp = Blueprint("search", __name__)


@endpoint(bp, "/api/search/strategy", "POST", summary="Current search strategy of a tag",
          request_model=schemas.TagQuery, response_model=schemas.StrategyPublic)
def strategy(session, body: schemas.TagQuery):
    return svc.strategy_public(svc.get_strategy(session, tag=body.tag))


@endpoint(bp, "/api/search/set-strategy", "POST", summary="Override the search strategy",
          request_model=schemas.StrategySet, response_model=schemas.StrategyPublic)
def set_strategy(session, body: schemas.StrategySet):
    return svc.strategy_public(svc.set_strategy(session, **body.model_dump()))


@endpoint(bp, "/api/search/adapt", "POST", summary="Adapt the strategy to recent results",
          request_model=schemas.TagQuery, response_model=schemas.StrategyPublic)
def adapt(session, body: schemas.TagQuery):
    return svc.adapt(session, tag=body.tag)


@endpoint(bp, "/api/search/suggest", "POST", summary="What to try next",
          request_model=schemas.TagQuery, response_model=schemas.SuggestionPublic)
def suggest(session, body: schemas.TagQuery):
    return svc.suggest(session, tag=body.tag)
