"""The Flask app factory."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, request

from app import pages
from app.api import error_body, experiments, install_error_handlers, pool, reports, search, system
from app.config import Settings, load_settings

# Paths anyone may read even when API_TOKEN is set: probes and the API's own description.
PUBLIC_PATHS = {"/health", "/openapi.json"}
# The dashboard's pages and files hold no data: their scripts ask the API, with the token.
PUBLIC_ENDPOINTS = {"static"}
PUBLIC_BLUEPRINTS = {pages.bp.name}


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    logging.basicConfig(level=logging.INFO)

    if settings.api_token:
        expected = f"Bearer {settings.api_token}"

        @app.before_request
        def require_token():
            if request.path in PUBLIC_PATHS or request.endpoint in PUBLIC_ENDPOINTS \
                    or request.blueprint in PUBLIC_BLUEPRINTS:
                return None
            if not hmac.compare_digest(request.headers.get("Authorization", ""), expected):
                return error_body(401, "missing or wrong bearer token (Authorization: Bearer $API_TOKEN)")
            return None

    for module in (experiments, search, pool, reports, system, pages):
        app.register_blueprint(module.bp)
    install_error_handlers(app)
    return app
