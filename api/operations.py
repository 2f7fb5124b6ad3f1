"""``/v1/agents``, ``/v1/health/summary`` and ``/v1/deliveries``: who is alive, how the
system stands, and where each message is with each group that acks."""

from __future__ import annotations

from flask import Response, jsonify
from flask_openapi3 import Tag

from api.auth import v1_blueprint
from api.errors import error_response
from api.schemas import (
    AgentList,
    AgentQuery,
    DeliveryList,
    DeliveryPath,
    DeliveryQuery,
    ErrorOut,
    HealthSummaryOut,
    RetryForcedOut,
)
from api.state import state
from outbox import queries, tasknames
from outbox.agents import list_agents
from outbox.heartbeat import latest_snapshot
from outbox.message_reads import list_deliveries

TAG = Tag(name="operations", description="Agents, health snapshots and deliveries")
operations = v1_blueprint("operations", __name__, TAG)


@operations.get("/agents", responses={200: AgentList, 422: ErrorOut})
def agents(query: AgentQuery) -> tuple[Response, int]:
    """Workers, consumers, API processes and beat, most recently seen first."""
    with state().sessions() as session:
        items = list_agents(session, role=query.role, group=query.group, active=query.active)
    return jsonify(items=items), 200


@operations.get("/health/summary", responses={200: HealthSummaryOut, 404: ErrorOut})
def health_summary() -> tuple[Response, int]:
    """The latest health snapshot (``outbox.heartbeat``), with its age."""
    with state().sessions() as session:
        snapshot = latest_snapshot(session)
    if snapshot is None:
        return error_response(
            404, "not_found", "no health snapshot yet: outbox.heartbeat has not run", {}
        )
    return jsonify(snapshot), 200


@operations.get("/deliveries", responses={200: DeliveryList, 422: ErrorOut})
def deliveries(query: DeliveryQuery) -> tuple[Response, int]:
    """Deliveries to groups that ack, newest first."""
    with state().sessions() as session:
        items = list_deliveries(
            session,
            group=query.group,
            status=query.status,
            message_id=query.message_id,
            limit=query.limit,
        )
    return jsonify(items=items), 200


@operations.post(
    "/deliveries/<message_id>/<group>/retry",
    responses={200: RetryForcedOut, 404: ErrorOut, 409: ErrorOut},
)
def force_retry(path: DeliveryPath) -> tuple[Response, int]:
    """Retry one delivery now (a dead one with a fresh budget); an acked one is refused."""
    s = state()
    params = {"group": path.group, "message_id": str(path.message_id)}
    with s.sessions.begin() as session:
        status = session.scalar(queries.FORCE_RETRY, params)
        if status is None:
            found = session.scalar(queries.DELIVERY_STATUS, params)
    where = {"message_id": str(path.message_id), "group": path.group}
    if status is None:
        if found is None:
            return error_response(404, "not_found", "no such delivery", where)
        return error_response(409, "conflict", f"the delivery is {found}: nothing to retry", where)
    s.celery.send_task(tasknames.RETRY_TARGETED, expires=max(s.settings.retry_interval_s, 1.0))
    return jsonify(message_id=str(path.message_id), group=path.group, status=status), 200
