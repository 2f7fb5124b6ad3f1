"""Leases on (scope, bucket): one owner at a time, until expiry; a fencing token per grant.

The relay leases key buckets (scope ``relay``); consumer lanes use the same
table. An owner that dies simply stops renewing: its leases expire and anyone
may take them. Expiry is judged by the database clock only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, TextClause
from sqlalchemy.orm import Session

from outbox import queries
from outbox.errors import SettingsError

RELAY_SCOPE = "relay"


def ensure_rows(session: Session | Connection, scope: str, buckets: int) -> None:
    """Create the lease rows of ``scope`` for buckets ``0..buckets-1`` that do not exist."""
    session.execute(queries.ENSURE_LEASE_ROWS, {"scope": scope, "buckets": buckets})


def fit_rows(
    session: Session | Connection,
    scope: str,
    buckets: int,
    *,
    unfinished: TextClause,
    params: dict[str, Any],
    setting: str,
) -> None:
    """Make ``scope`` have exactly ``buckets`` lease rows, the count the rows were spread
    by. While rows spread by another count are unfinished (``unfinished`` says whether
    any is), a changed count would strand some (a bucket that no longer exists) or split
    a key between two holders (its new bucket and its old one): it is refused, with
    :class:`~outbox.errors.SettingsError` naming ``setting``."""
    have = session.scalar(queries.LEASE_ROWS, {"scope": scope}) or 0
    if have == buckets:
        return
    if have and session.scalar(unfinished, params):
        raise SettingsError(
            _changed(setting, buckets, have) + "; rows spread by it are "
            "unfinished: set it back until they are done, then change it"
        )
    session.execute(queries.DROP_LEASE_ROWS, {"scope": scope, "buckets": buckets})
    ensure_rows(session, scope, buckets)


def check_rows(session: Session | Connection, scope: str, buckets: int, setting: str) -> None:
    """Refuse to spread rows by ``buckets`` when ``scope`` has a different number of lease
    rows (those who relay or process them use another count)."""
    have = session.scalar(queries.LEASE_ROWS, {"scope": scope}) or 0
    if have not in (0, buckets):
        raise SettingsError(_changed(setting, buckets, have) + "; every process must use one")


def _changed(setting: str, buckets: int, have: int) -> str:
    return f"{setting}={buckets}, but the rows in the database are spread over {have}"


def acquire(
    session: Session,
    scope: str,
    owner: str,
    candidates: Iterable[int],
    *,
    limit: int,
    lease_s: float,
) -> dict[int, int]:
    """Take or renew up to ``limit`` of ``candidates``; return ``{bucket: fencing_token}``.

    Buckets ``owner`` already holds are renewed first. Buckets another owner holds
    (unexpired) or has locked right now are skipped, never waited for.
    """
    granted, _ = take(session, scope, owner, candidates, limit=limit, lease_s=lease_s)
    return granted


def take(
    session: Session,
    scope: str,
    owner: str,
    candidates: Iterable[int],
    *,
    limit: int,
    lease_s: float,
) -> tuple[dict[int, int], set[int]]:
    """:func:`acquire`, also returning the buckets taken over from a holder whose lease
    lapsed without being given back (it died or stalled in the middle of its work)."""
    wanted = sorted(set(candidates))
    if not wanted or limit <= 0:
        return {}, set()
    rows = session.execute(
        queries.ACQUIRE_LEASES,
        {"scope": scope, "owner": owner, "candidates": wanted, "limit": limit, "lease_s": lease_s},
    ).all()
    return {bucket: token for bucket, token, _ in rows}, {b for b, _, lapsed in rows if lapsed}


def release(session: Session, scope: str, owner: str, buckets: Iterable[int]) -> None:
    """Give back ``buckets`` held by ``owner`` so that others may take them at once."""
    held = sorted(set(buckets))
    if held:
        session.execute(queries.RELEASE_LEASES, {"scope": scope, "owner": owner, "buckets": held})
