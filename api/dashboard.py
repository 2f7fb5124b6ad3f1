"""``/dashboard``: one server-rendered page for operators.

The browser logs in with basic auth whose password is an API token (any user
name). The page then reads only documented JSON endpoints with that token as a
bearer token, and refreshes itself: ``/v1/health/summary``, ``/v1/stats``,
``/v1/agents``, ``/v1/dead-letters`` and ``/v1/held-keys``; its buttons call
``/v1/dead-letters/<id>/requeue`` and ``/v1/tasks/<name>/run``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, Response, render_template, request

from api.auth import presented_token
from api.state import state
from outbox.tasknames import BEAT_TASKS

dashboard = Blueprint(
    "dashboard",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/dashboard/static",
)


@dashboard.get("/dashboard")
def page() -> Response:
    """The dashboard (the guard has checked the token)."""
    settings = state().settings
    host = urlsplit(request.host_url).hostname or "127.0.0.1"
    flower = settings.flower_url or f"http://{host}:{settings.flower_port}"
    html = render_template(
        "dashboard.html",
        token=presented_token(request.headers.get("Authorization", ""), basic=True),
        flower_url=flower,
        tasks=list(BEAT_TASKS),
        refresh_ms=2000,
    )
    # The page carries the token: never cache it.
    return Response(html, headers={"Cache-Control": "no-store"})
