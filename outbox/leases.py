"""Leases on (scope, bucket): one owner at a time, until expiry; a fencing token per grant.

The relay leases key buckets (scope ``relay``); consumer lanes use the same
table. An owner that dies simply stops renewing: its leases expire and anyone
may take them. Expiry is judged by the database clock only.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.orm import Session

from outbox import queries


def ensure_rows(session: Session, scope: str, buckets: int) -> None:
    """Create the lease rows of ``scope`` for buckets ``0..buckets-1`` that do not exist."""
    session.execute(queries.ENSURE_LEASE_ROWS, {"scope": scope, "buckets": buckets})


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
