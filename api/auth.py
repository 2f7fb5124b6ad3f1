"""Bearer-token authentication for everything under ``/v1``."""

from __future__ import annotations

import hmac

from flask import Request


def token_accepted(request: Request, tokens: tuple[str, ...]) -> bool:
    """True when the request carries one of ``tokens``.

    Every configured token is compared, in constant time, whatever matched first,
    so the response time says nothing about which token or how much of it was right.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    given = presented.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token.encode())
    return matched
