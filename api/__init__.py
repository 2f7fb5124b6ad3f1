"""The HTTP API: ``create_app(settings)`` builds it; ``gunicorn 'api:create_app()'`` serves it."""

from __future__ import annotations

from flask import Response, jsonify, redirect, request
from flask_openapi3 import Info, OpenAPI
from werkzeug.exceptions import BadRequest

from api.auth import token_accepted
from api.dashboard import dashboard
from api.deadletters import dead_letters
from api.errors import (
    error_response,
    join_path,
    register_error_handlers,
    validation_error_response,
)
from api.health import health
from api.messages import messages
from api.metrics import prometheus, stats
from api.operations import operations
from api.state import ApiState
from api.topics import topics
from outbox.logs import setup_logging
from outbox.settings import Settings
from outbox.storable import MAX_JSON_DEPTH, json_problem, text_problem

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def create_app(settings: Settings | None = None) -> OpenAPI:
    """The Flask app for ``settings`` (default: built from ``OUTBOX_*`` variables)."""
    if settings is None:
        settings = Settings.from_env()
        setup_logging(settings, "api")
    app = OpenAPI(
        __name__,
        static_folder=None,  # the dashboard serves its own files under /dashboard/static
        info=Info(title="celery-outbox", version="1"),
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        validation_error_status=422,
        validation_error_callback=validation_error_response,
        doc_prefix="/docs",
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # Werkzeug refuses a larger body from its Content-Length, before reading it.
    app.config["MAX_CONTENT_LENGTH"] = settings.api_max_body_bytes
    app.extensions["outbox"] = ApiState(settings)
    register_error_handlers(app)
    app.before_request(_guard)
    app.before_request(lambda: ApiState.current().ensure_heartbeat())
    app.register_blueprint(health)
    app.register_api(messages)
    app.register_api(topics)
    app.register_api(dead_letters)
    app.register_api(operations)
    app.register_api(stats)
    app.register_blueprint(prometheus)
    app.register_blueprint(dashboard)

    @app.get("/openapi.json", doc_ui=False)
    def openapi_json() -> Response:
        return jsonify(app.api_doc)

    @app.get("/docs", doc_ui=False)
    def docs() -> Response:
        return redirect("/docs/swagger")  # type: ignore[return-value]

    return app


def _guard() -> tuple[Response, int] | None:
    """Authenticate ``/v1``, ``/metrics`` and ``/dashboard``, then insist on a well-formed
    JSON body where one is sent.

    It runs on every request, so it reads the WSGI environment directly."""
    path = request.path
    browser = path == "/dashboard"
    if not (path.startswith("/v1/") or path == "/metrics" or browser):
        return None
    environ = request.environ
    tokens = ApiState.current().settings.api_tokens
    # Prometheus sends a bearer token or basic auth; a browser, basic auth.
    if not token_accepted(
        environ.get("HTTP_AUTHORIZATION", ""), tokens, basic=not path.startswith("/v1/")
    ):
        response, status = error_response(
            401,
            "unauthorized",
            "a valid bearer token is required"
            if not browser
            else "log in with an API token as the password",
            {"header": "Authorization"},
        )
        response.headers["WWW-Authenticate"] = (
            'Basic realm="outbox dashboard", charset="UTF-8"'
            if browser
            else 'Bearer realm="outbox"'
        )
        return response, status
    if browser:
        return None
    refused = _refused_text()
    if refused is not None:
        return refused
    # A bodiless POST (e.g. a requeue) is fine; a body, or one announced as JSON, must be JSON.
    if request.method in BODY_METHODS and (
        environ.get("CONTENT_LENGTH") not in (None, "", "0")
        or "HTTP_TRANSFER_ENCODING" in environ
        or "CONTENT_TYPE" in environ
    ):
        if not request.is_json:
            return error_response(
                415,
                "unsupported_media_type",
                "the body must be JSON (Content-Type: application/json)",
                {"header": "Content-Type"},
            )
        try:
            body = request.get_json()  # parsed once; the schema validation reuses Flask's cache
        except BadRequest:
            return error_response(
                400, "invalid_json", "the body is not well-formed JSON", {"field": "body"}
            )
        except RecursionError:
            return error_response(
                400,
                "invalid_json",
                f"the body nests deeper than {MAX_JSON_DEPTH} levels",
                {"field": "body"},
            )
        problem = json_problem(body)
        if problem is not None:
            where, reason = problem
            field = join_path(where)
            return error_response(422, "validation_error", f"{field}: {reason}", {"field": field})
    return None


def _refused_text() -> tuple[Response, int] | None:
    """422 for a query parameter, path segment or idempotency key that PostgreSQL could
    not store (a NUL, a lone surrogate), naming it; None when there is none."""
    places = [
        *request.args.items(multi=True),
        *(request.view_args or {}).items(),
        ("Idempotency-Key", request.headers.get("Idempotency-Key", "")),
    ]
    for name, value in places:
        for text in (name, value):
            reason = text_problem(text) if isinstance(text, str) else None
            if reason is not None:
                return error_response(422, "validation_error", f"{name}: {reason}", {"field": name})
    return None
