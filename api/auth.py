"""Bearer-token authentication for everything under ``/v1``."""

from __future__ import annotations

import hmac


def token_accepted(header: str, tokens: tuple[str, ...]) -> bool:
    """True when the ``Authorization`` header carries one of ``tokens``.

    Every configured token is compared, in constant time, whatever matched first,
    so the response time says nothing about which token or how much of it was right.
    """
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    given = presented.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token.encode())
    return matched
