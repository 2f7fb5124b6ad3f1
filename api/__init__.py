"""The HTTP API: ``create_app(settings)`` builds it; ``gunicorn 'api:create_app()'`` serves it."""

from __future__ import annotations

from flask import Flask

from api.errors import register_error_handlers
from api.health import health
from api.state import ApiState
from outbox.logs import setup_logging
from outbox.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """The Flask app for ``settings`` (default: built from ``OUTBOX_*`` variables)."""
    if settings is None:
        settings = Settings.from_env()
        setup_logging(settings, "api")
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["outbox"] = ApiState(settings)
    register_error_handlers(app)
    app.register_blueprint(health)
    return app
