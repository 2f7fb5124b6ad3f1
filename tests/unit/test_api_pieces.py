from __future__ import annotations

import base64
import re
from pathlib import Path

from api import create_app
from api.auth import token_accepted
from api.errors import field_path
from outbox.settings import Settings

DASHBOARD_JS = Path(__file__).resolve().parents[2] / "api" / "static" / "dashboard.js"


def _accepted(header: str | None, tokens: tuple[str, ...]) -> bool:
    return token_accepted(header or "", tokens)


def test_only_a_configured_bearer_token_is_accepted():
    tokens = ("alpha", "beta")
    assert _accepted("Bearer beta", tokens)
    assert _accepted("bearer alpha", tokens)
    assert not _accepted("Bearer gamma", tokens)
    assert not _accepted("Bearer alph", tokens)
    assert not _accepted("Basic YWxwaGE6", tokens)
    assert not _accepted("Bearer ", tokens)
    assert not _accepted(None, tokens)
    assert not _accepted("Bearer alpha", ())


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_carries_a_token_as_its_password_only_where_allowed():
    tokens = ("alpha",)
    assert token_accepted(_basic("anyone", "alpha"), tokens, basic=True)
    assert token_accepted(_basic("", "alpha"), tokens, basic=True)
    assert not token_accepted(_basic("alpha", "wrong"), tokens, basic=True)
    assert not token_accepted(_basic("anyone", ""), tokens, basic=True)
    assert not token_accepted("Basic not-base64!", tokens, basic=True)
    assert not token_accepted(_basic("anyone", "alpha"), tokens)  # /v1: bearer only


def test_the_dashboard_reads_only_endpoints_of_the_openapi_document():
    app = create_app(Settings(api_tokens=("t",), redis_url="redis://127.0.0.1:1/0"))
    documented = [
        re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(path)) + "$")
        for path in app.test_client().get("/openapi.json").get_json()["paths"]
    ]
    script = DASHBOARD_JS.read_text()
    used = re.findall(r"[\"`](/v1/[^\"`?]*)", script)
    assert len(used) >= 6, used
    for path in used:
        concrete = re.sub(r"\$\{[^}]+\}", "x", path)
        assert any(p.match(concrete) for p in documented), path


def test_field_paths_read_like_the_request_body():
    assert field_path(("batch", "messages", 3, "topic")) == "messages[3].topic"
    assert field_path(("message", "payload")) == "payload"
    assert field_path(("headers", "x")) == "headers.x"
    assert field_path(()) == "body"
