"""Token authentication: a bearer token for ``/v1`` and ``/metrics``; for the dashboard,
a browser's basic auth whose password is a token (the user name is not checked)."""

from __future__ import annotations

import base64
import binascii
import hmac


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
