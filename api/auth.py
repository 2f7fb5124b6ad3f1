"""Token authentication: a bearer token for ``/v1`` and ``/metrics``; for the dashboard,
a browser's basic auth whose password is a token (the user name is not checked)."""

from __future__ import annotations

import base64
import binascii
import hmac

from flask_openapi3 import APIBlueprint, Tag

from api.schemas import ErrorOut


def presented_token(header: str, *, basic: bool = False) -> str:
    """The token an ``Authorization`` header presents: a bearer token, or, if ``basic``,
    the password of basic auth; "" when there is none."""
    scheme, _, presented = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "basic" and basic:
        try:
            decoded = base64.b64decode(presented.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
        presented = decoded.partition(":")[2]
    elif scheme != "bearer":
        return ""
    return presented.strip()


def token_accepted(header: str, tokens: tuple[str, ...], *, basic: bool = False) -> bool:
    """True when the ``Authorization`` header carries one of ``tokens``
    (:func:`presented_token`).

    Every configured token is compared, in constant time, whatever matched first,
    so the response time says nothing about which token or how much of it was right.
    """
    presented = presented_token(header, basic=basic)
    if not presented:
        return False
    given = presented.encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token.encode())
    return matched


def v1_blueprint(name: str, import_name: str, tag: Tag) -> APIBlueprint:
    """A blueprint under ``/v1`` behind the bearer token. Every operation documents what
    the guard may answer before it runs (401 without a valid token; 400, 413 and 415 for
    a body that is not well-formed JSON, too large or not JSON) and the 422 error
    envelope of a refused request (not the framework's own validation body)."""
    return APIBlueprint(
        name,
        import_name,
        url_prefix="/v1",
        abp_tags=[tag],
        abp_security=[{"bearer": []}],
        abp_responses={400: ErrorOut, 401: ErrorOut, 413: ErrorOut, 415: ErrorOut, 422: ErrorOut},
    )
