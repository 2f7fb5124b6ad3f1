"""Acknowledgements: consumers of groups that require acks publish one per outcome on
``outbox.acks`` through their own outbox, in the handler's transaction; the built-in
handler below applies them to ``deliveries`` on the producer side.

Run it there with ``outbox consume --group outbox-acks --topics outbox.acks``
(``outbox dev`` does). Applying is idempotent and only moves a delivery forward.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from consumer.handlers import Message, Permanent, handler
from outbox import queries
from outbox.models import MAX_ERROR_CHARS
from outbox.publishing import Message as OutboxMessage
from outbox.publishing import Publisher
from outbox.retry import RetryPolicy
from outbox.wire import ACK_TOPIC


def ack_payload(
    message: Message, group: str, instance: str, error: str | None = None
) -> dict[str, Any]:
    """The ack of one attempt at ``message`` by ``group``: success when ``error`` is None."""
    ack = success_ack(message.id, message.topic, group, instance, message.attempt)
    if error is not None:
        ack.update(status="failure", error=error[:MAX_ERROR_CHARS])
    return ack


def success_ack(
    message_id: object, topic: str, group: str, instance: str, attempt: int
) -> dict[str, Any]:
    """A success ack of ``message_id`` by ``group``, processed by ``instance``."""
    return {
        "message_id": str(message_id),
        "topic": topic,
        "group": group,
        "status": "success",
        "instance": instance,
        "attempt": attempt,
        "error": None,
    }


def register_ack_topic(session: Session) -> None:
    """Make sure the ack topic takes messages (it is left as it is if it exists)."""
    session.execute(queries.REGISTER_TOPICS, {"names": [ACK_TOPIC]})


def write_acks(session: Session, publisher: Publisher, acks: list[dict[str, Any]]) -> None:
    """Add acks to the session's transaction (the consumer's own outbox), in one statement."""
    publisher.publish_batch(
        session, [OutboxMessage(ACK_TOPIC, ack, key=ack["message_id"]) for ack in acks]
    )


@handler(ACK_TOPIC)
def apply_ack(message: Message, session: Session) -> None:
    """Record an ack on its delivery, however early or late it comes; one for a message
    that is not ours, or a group that needs no acks, changes nothing."""
    ack = message.payload
    try:
        ok = ack["status"] == "success"
        params = {
            "ok": ok,
            "error": ack.get("error"),
            "instance": ack.get("instance"),
            "group": ack["group"],
            "topic": ack["topic"],
            "message_id": ack["message_id"],
        }
    except (KeyError, TypeError) as exc:
        raise Permanent(f"not an ack: {exc!r}") from exc
    params["delay_s"] = 0.0
    if not ok:
        backoff = session.execute(queries.ACK_BACKOFF, params).first()
        if backoff is None:
            return  # no such group: nothing to record
        # The group's policy after its delivery's retries so far (the first counts from 1).
        params["delay_s"] = RetryPolicy.of_group(backoff).delay(backoff.attempts + 1)
    if session.execute(queries.APPLY_ACK, params).first() is not None:
        return
    if session.execute(queries.OPEN_DELIVERY_BY_ACK, params).first() is not None:
        return
    # The relay's mark opened the delivery between the two statements: apply it now.
    session.execute(queries.APPLY_ACK, params)
