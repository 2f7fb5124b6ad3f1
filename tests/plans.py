"""Reading PostgreSQL's plans in tests: what a statement read, whatever plan it got."""

from __future__ import annotations

from typing import Any


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
