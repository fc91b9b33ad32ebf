"""/health and /openapi.json."""

from __future__ import annotations

from flask import Blueprint, jsonify
from pydantic.json_schema import models_json_schema
from sqlalchemy import text

from app import schemas
from app.api import ENDPOINTS, settings
from app.broker import ping_broker
from app.db import transaction

bp = Blueprint("system", __name__)


@bp.get("/health")
def health():
    try:
        with transaction(settings().database_url) as session:
            session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # health reports every failure, it never raises one
        database = f"unreachable: {type(exc).__name__}"
    broker = broker_health()
    body = {"status": "ok" if database == "ok" else "degraded", "database": database, "broker": broker}
    if database != "ok":
        # Not error_body(503, ..., **body): body's own "status" key would clash with its argument.
        response = jsonify({"error": "database unreachable", **body})
        response.status_code = 503
        return response
    return jsonify(body)


def broker_health() -> str:
    try:
        ping_broker(settings().broker_url, timeout_s=1)
        return "ok"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())


def openapi_document() -> dict:
    models = {m for e in ENDPOINTS for m in (e.request, e.response) if m is not None} | {schemas.ErrorPublic}
    keyed = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
    refs, components = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict] = {}
    for e in ENDPOINTS:
        operation: dict = {
            "summary": e.summary,
            "tags": [e.tag],
            "operationId": f"{e.method.lower()}_{e.rule.strip('/').replace('/', '_').replace('-', '_').replace('<', '').replace('>', '')}",
            "responses": {
                "200": {"description": "OK"},
                "400": _error_response("invalid input"),
                "404": _error_response("not found"),
                "409": _error_response("conflict"),
            },
        }
        if e.response is not None:
            operation["responses"]["200"]["content"] = {"application/json": {"schema": refs[(e.response, "validation")]}}
        if e.request is not None and e.method == "GET":
            schema = e.request.model_json_schema()
            operation["parameters"] = [
                {"name": name, "in": "query", "required": name in schema.get("required", []), "schema": prop}
                for name, prop in schema["properties"].items()
            ]
        elif e.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(e.request, "validation")]}},
            }
        path = e.rule.replace("<", "{").replace(">", "}").replace("{int:", "{").replace("{path:", "{")
        if "{" in path:
            operation["parameters"] = operation.get("parameters", []) + [
                {"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
                for part in path.split("/") if part.startswith("{")
            ]
        paths.setdefault(path, {})[e.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "autoresearch", "version": "1.0.0",
                 "description": "Experiment tracking, search strategy, GPU pool and training dispatch."},
        "paths": paths,
        "components": {
            "schemas": components.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _error_response(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}}}
