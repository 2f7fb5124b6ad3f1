from __future__ import annotations

from api.auth import token_accepted
from api.errors import field_path


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


def test_field_paths_read_like_the_request_body():
    assert field_path(("batch", "messages", 3, "topic")) == "messages[3].topic"
    assert field_path(("message", "payload")) == "payload"
    assert field_path(("headers", "x")) == "headers.x"
    assert field_path(()) == "body"
