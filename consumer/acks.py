"""Acknowledgements: consumers of groups that require acks publish one per outcome on
``outbox.acks`` through their own outbox, in the handler's transaction; the built-in
handler below applies them to ``deliveries`` on the producer side.

Run it there with ``outbox consume --group outbox-acks --topics outbox.acks``
(``outbox dev`` does). Applying is idempotent and only moves a delivery forward.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy.orm import Session

from consumer.handlers import Message, Permanent, batch_handler
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


@batch_handler(ACK_TOPIC)
def apply_acks(messages: list[Message], session: Session) -> None:
    """Record acks on their deliveries, however early or late they come; one for a
    message that is not ours, or a group that needs no acks, changes nothing.

    The success acks go first, all in one statement, then the failure acks one by one:
    the outcome is the same as in the batch's order, since a success moves a delivery to
    acked, which no later ack changes (the first success of a delivery wins, as it would),
    and a failure ack changes only a delivery that still waits."""
    acks = [_ack_params(message) for message in messages]
    successes: dict[tuple[str, str, str], dict[str, Any]] = {}
    for params in acks:
        if params["ok"]:
            successes.setdefault((params["group"], params["topic"], params["message_id"]), params)
    if successes:
        document = json.dumps(list(successes.values()))
        applied = {
            (row.group, row.topic, str(row.message_id))
            for row in session.execute(queries.APPLY_SUCCESS_ACKS, {"acks": document})
        }
        rest = [v for k, v in successes.items() if k not in applied]
        if rest:
            # The relay's mark opened their deliveries meanwhile (or there are none to
            # move): apply them now.
            session.execute(queries.APPLY_SUCCESS_ACKS_AGAIN, {"acks": json.dumps(rest)})
    for params in acks:
        if not params["ok"]:
            _apply(params, session)


def apply_ack(message: Message, session: Session) -> None:
    """Record one ack on its delivery (:func:`apply_acks` of one message)."""
    _apply(_ack_params(message), session)


def _ack_params(message: Message) -> dict[str, Any]:
    """The statement parameters of an ack; :class:`Permanent` if it is not one."""
    ack = message.payload
    try:
        params = {
            "ok": ack["status"] == "success",
            "error": ack.get("error"),
            "instance": ack.get("instance"),
            "group": ack["group"],
            "topic": ack["topic"],
            "message_id": str(uuid.UUID(ack["message_id"])),
            "delay_s": 0.0,
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Permanent(f"not an ack: {exc!r}") from exc
    texts = all(isinstance(params[name], str) for name in ("group", "topic"))
    if not texts or not all(
        isinstance(params[n], (str, type(None))) for n in ("instance", "error")
    ):
        raise Permanent(f"not an ack: {ack!r}"[:MAX_ERROR_CHARS])
    return params


def _apply(params: dict[str, Any], session: Session) -> None:
    ok = params["ok"]
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
