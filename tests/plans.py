"""Reading PostgreSQL's plans in tests: what a statement read, whatever plan it got; and
which statements ran."""

from __future__ import annotations

from typing import Any

from outbox import queries


def rows_read(plan: dict[str, Any], table: str) -> float:
    """Rows of ``table`` that a plan (``EXPLAIN (ANALYZE, FORMAT JSON)``) read in its
    scans (returned or dropped by a filter), and the rows that its joins dropped, over
    every loop."""
    node = plan.get("Plan", plan)
    fields = ["Rows Removed by Join Filter"]
    if node.get("Relation Name") == table and "Scan" in node["Node Type"]:
        fields += ["Actual Rows", "Rows Removed by Filter"]
    read = sum(node.get(field, 0) * node.get("Actual Loops", 1) for field in fields)
    return read + sum(rows_read(child, table) for child in node.get("Plans", []))


def pages_read(plan: dict[str, Any]) -> int:
    """The shared buffers a plan (``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)``) read, hit
    in memory or not: what a look walked, dead index entries included, which rows_read
    does not count."""
    node = plan.get("Plan", plan)
    return int(node["Shared Hit Blocks"] + node["Shared Read Blocks"])


def as_written(executed: list[str]) -> list[str]:
    """The statements that ran, as the hot-path SQL was written: a prepared statement's
    EXECUTE as the text it was prepared from, and the PREPAREs themselves (one per
    statement and connection, not per call) left out. Other entries stay as they are."""
    by_name = {prepared.name: clause.text for clause, prepared in queries.PREPARED.items()}
    written = []
    for sql in executed:
        if sql.startswith("PREPARE "):
            continue
        written.append(by_name[sql.split()[1]] if sql.startswith("EXECUTE ") else sql)
    return written
