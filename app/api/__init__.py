"""HTTP plumbing shared by the blueprints: one decorator declares an endpoint, parses and
validates its body, runs it in a transaction, serialises the answer, and records it for the
OpenAPI document. Every error becomes JSON here."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any
from urllib.parse import unquote_to_bytes

from flask import Blueprint, Flask, current_app, jsonify, request
from flask import Response as FlaskResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app.db import is_outage, transaction
from app.errors import DomainError, InvalidInput

log = logging.getLogger(__name__)
# Headers whose value the API reads as text. Others pass untouched: a browser sends the cookies
# of every localhost port, whatever bytes another app put in them.
TEXT_HEADERS = ("Authorization",)
RETRY_AFTER_S = 5  # what a 503 asks a client to wait before it tries again


@dataclass(frozen=True)
class Endpoint:
    rule: str
    method: str
    summary: str
    request: type[BaseModel] | None
    response: type[BaseModel] | None
    tag: str


ENDPOINTS: list[Endpoint] = []


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json_body() -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type: the seed's curl calls send -d
    without one, so form-encoded JSON must parse too."""
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # A chunked body has no Content-Length: werkzeug stops reading at the limit and hands
        # over the truncated start instead of raising, so a read that fills the limit is too large.
        raise RequestEntityTooLarge()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise InvalidInput("malformed JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidInput("the JSON body must be an object")
    return data


def _nul_path(data: Any) -> str | None:
    """Where a NUL character hides in the data, if anywhere: Postgres text cannot store one.
    Iterative, so a body nested as deep as json.loads allows cannot overflow the stack here."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return path or "body"
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\x00" in key:
                return where
            stack.append((where, item))
    return None


def parse(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    nul = _nul_path(data)
    if nul:
        raise InvalidInput(f"invalid fields: {nul}", fields=[{"field": nul, "message": "text must not contain NUL (\\u0000)"}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = [
            {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
            for err in exc.errors()
        ]
        names = ", ".join(f["field"] for f in fields)
        raise InvalidInput(f"invalid fields: {names}", fields=fields) from None


def settings():
    return current_app.config["SETTINGS"]


def endpoint(
    bp: Blueprint,
    rule: str,
    method: str,
    *,
    summary: str,
    request_model: type[BaseModel] | None = None,
    response_model: type[BaseModel] | None = None,
    transactional: bool = True,
):
    """Declare an endpoint. The view gets (session, body, **url_args), or (body, **url_args)
    when it manages its own transactions (long polls, enqueueing after commit)."""

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def handle(**url_args):
            if request_model is None:
                body = None
            elif method == "GET":
                body = parse(request_model, request.args.to_dict())
            else:
                body = parse(request_model, read_json_body())
            if transactional:
                with transaction(settings().database_url) as session:
                    result = view(session, body, **url_args)
            else:
                result = view(body, **url_args)
            if isinstance(result, FlaskResponse) or response_model is None:
                return result
            # exclude_unset: an optional key the view did not return stays absent, as in the seed
            # (adapt with too few results answers only mode and reason).
            return jsonify(response_model.model_validate(result).model_dump(mode="json", exclude_unset=True))

        bp.add_url_rule(rule, view.__name__, handle, methods=[method])
        ENDPOINTS.append(Endpoint(rule, method, summary, request_model, response_model, bp.name))
        return view

    return decorate


def error_body(status: int, message: str, **details) -> FlaskResponse:
    response = jsonify({"error": message, **details})
    response.status_code = status
    return response


def undecodable_request() -> FlaskResponse | None:
    """A 400 for bytes that are not text where the API reads text: a path or query string that
    is not UTF-8 once its percent-escapes are decoded (werkzeug would put U+FFFD in their place),
    a NUL in the path (Postgres text cannot hold one), a TEXT_HEADERS value that is not ASCII."""
    environ = request.environ
    try:
        # WSGI hands over the request's bytes as latin-1 strings; the query is still percent-encoded.
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
        unquote_to_bytes(environ.get("QUERY_STRING", "").encode("latin-1")).decode("utf-8")
    except UnicodeError:
        return error_body(400, "the URL is not UTF-8 text (its percent-escapes must encode UTF-8)")
    if "\x00" in path:
        return error_body(400, "the path must not contain NUL (%00)")
    for name in TEXT_HEADERS:
        if not request.headers.get(name, "").isascii():
            return error_body(400, f"the {name} header must be ASCII")
    return None


def install_error_handlers(app: Flask) -> None:
    # First of all hooks: the token check compares the Authorization header as text.
    app.before_request_funcs.setdefault(None, []).insert(0, undecodable_request)

    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError):
        return error_body(exc.status, exc.message, **exc.details)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            limit = current_app.config.get("MAX_CONTENT_LENGTH")
            return error_body(413, f"request body too large (limit {limit} bytes)")
        return error_body(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_body(500, f"internal error: {type(exc).__name__}")

    @app.errorhandler(DBAPIError)
    def database_error(exc: DBAPIError):
        if not is_outage(exc):
            return unexpected(exc)
        # Logged once per outage where it was met (app.db.transaction), not once per request.
        response = error_body(503, "the database is unreachable; retry shortly")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
