"""Acknowledgements: consumers of groups that require acks publish one per outcome on
``outbox.acks`` through their own outbox, in the handler's transaction; the built-in
handler below applies them to ``deliveries`` on the producer side.

The acks of a lane batch travel together: each message on ``outbox.acks`` carries
``{"acks": [ack, ...]}``, the acks of one lane of one group in the order they were made
(up to :data:`ACKS_PER_MESSAGE`, within the largest payload allowed), keyed
``<group>/<lane>``. Every ack of a message by a group comes from the lane that holds the
message, so they stay in order, as when each ack was a message of its own keyed by the
message id; a batch of a thousand messages then costs a few ack messages rather than a
thousand (each one a row to relay, a record to consume and a row to apply). The success
acks that answer a targeted retry of a message processed already are keyed by the group
alone: no later ack changes a success, so their order does not matter. A message that
carries one ack as its whole payload (as they were written before) is applied too.

Run it there with ``outbox consume --group outbox-acks --topics outbox.acks``
(``outbox dev`` does). Applying is idempotent and only moves a delivery forward.
"""

from __future__ import annotations

import functools
import json
from json.encoder import encode_basestring_ascii
from typing import Any

from sqlalchemy.orm import Session

from consumer.handlers import Message, Permanent, batch_handler
from outbox import queries
from outbox.models import MAX_ERROR_CHARS
from outbox.publishing import Message as OutboxMessage
from outbox.publishing import Publisher
from outbox.retry import RetryPolicy
from outbox.wire import ACK_TOPIC, canonical_message_id


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


# Acks in one message on the ack topic: a few hundred bytes each (a failure's error up to
# MAX_ERROR_CHARS), so a message stays well under Kafka's usual limit of 1 MB.
ACKS_PER_MESSAGE = 100
_EMPTY_BYTES = len('{"acks":[]}')


def register_ack_topic(session: Session) -> None:
    """Make sure the ack topic takes messages (it is left as it is if it exists)."""
    session.execute(queries.REGISTER_TOPICS, {"names": [ACK_TOPIC]})


def ack_key(group: str, lane: int) -> str:
    """The key of the ack messages of one lane of ``group``."""
    return f"{group}/{lane}"


# A success ack's fields, and what it takes as compact JSON besides its four texts and
# its attempt (the names, the punctuation, its status and its null error): an ack with
# empty texts and a one-digit attempt, less those.
_SUCCESS_FIELDS = frozenset(success_ack("", "", "", "", 0))
_SUCCESS_FRAME_BYTES = (
    len(json.dumps(success_ack("", "", "", "", 0), separators=(",", ":"))) - 4 * len('""') - 1
)


@functools.lru_cache(maxsize=4096)
def _text_bytes(value: str) -> int:
    """The length of ``value`` as a JSON string, non-ASCII escaped (a group, topic or
    instance name: the same few over and over)."""
    return len(encode_basestring_ascii(value))


def ack_bytes(ack: dict[str, Any]) -> int:
    """The length of ``ack`` as compact JSON, non-ASCII escaped (at least the bytes it
    takes in a payload), and a comma. A success ack as success_ack makes it is measured
    field by field, without encoding it whole: a burst's acks are measured by the
    thousand, and each is encoded again as its message is written."""
    if ack.get("error") is None and ack.keys() == _SUCCESS_FIELDS:
        message_id, topic, group, instance, attempt = (
            ack["message_id"],
            ack["topic"],
            ack["group"],
            ack["instance"],
            ack["attempt"],
        )
        if (
            ack["status"] == "success"
            and type(attempt) is int
            and type(message_id) is str
            and type(topic) is str
            and type(group) is str
            and type(instance) is str
        ):
            return (
                _SUCCESS_FRAME_BYTES
                + len(encode_basestring_ascii(message_id))
                + _text_bytes(topic)
                + _text_bytes(group)
                + _text_bytes(instance)
                + len(str(attempt))
                + 1
            )
    return len(json.dumps(ack, separators=(",", ":"))) + 1


def write_acks(
    session: Session, publisher: Publisher, acks: list[tuple[str, dict[str, Any]]]
) -> None:
    """Add acks, each with its key, to the session's transaction (the consumer's own
    outbox), in one statement: those of a key together, in order, in messages of up to
    :data:`ACKS_PER_MESSAGE` acks and at most the largest payload allowed."""
    limit = publisher.settings.max_payload_bytes
    by_key: dict[str, list[dict[str, Any]]] = {}
    for key, ack in acks:
        by_key.setdefault(key, []).append(ack)
    messages = []
    for key, keyed in by_key.items():
        chunk: list[dict[str, Any]] = []
        size = _EMPTY_BYTES
        for ack in keyed:
            ack_size = ack_bytes(ack)
            if chunk and (len(chunk) == ACKS_PER_MESSAGE or size + ack_size > limit):
                messages.append(OutboxMessage(ACK_TOPIC, {"acks": chunk}, key=key))
                chunk, size = [], _EMPTY_BYTES
            chunk.append(ack)
            size += ack_size
        messages.append(OutboxMessage(ACK_TOPIC, {"acks": chunk}, key=key))
    publisher.publish_batch(session, messages)


@batch_handler(ACK_TOPIC)
def apply_acks(messages: list[Message], session: Session) -> None:
    """Record acks on their deliveries, however early or late they come; one for a
    message that is not ours, or a group that needs no acks, changes nothing.

    The success acks go first, all in one statement, then the failure acks one by one:
    the outcome is the same as in the batch's order, since a success moves a delivery to
    acked, which no later ack changes (the first success of a delivery wins, as it would),
    and a failure ack changes only a delivery that still waits."""
    acks = [params for message in messages for params in _acks_in(message)]
    successes: dict[tuple[str, str, str], dict[str, Any]] = {}
    for params in acks:
        if params["ok"]:
            successes.setdefault((params["group"], params["topic"], params["message_id"]), params)
    if successes:
        # What the statements read of each ack, and nothing else.
        fields = {
            k: {"message_id": k[2], "group": k[0], "topic": k[1], "instance": v["instance"]}
            for k, v in successes.items()
        }
        document = json.dumps(list(fields.values()))
        applied = set(map(tuple, session.execute(queries.APPLY_SUCCESS_ACKS, {"acks": document})))
        rest = [v for k, v in fields.items() if k not in applied]
        if rest:
            # The relay's mark opened their deliveries meanwhile (or there are none to
            # move): apply them now.
            session.execute(queries.APPLY_SUCCESS_ACKS_AGAIN, {"acks": json.dumps(rest)})
    for params in acks:
        if not params["ok"]:
            _apply(params, session)


def apply_ack(message: Message, session: Session) -> None:
    """Record the acks of one message on their deliveries, one by one, in order."""
    for params in _acks_in(message):
        _apply(params, session)


def _acks_in(message: Message) -> list[dict[str, Any]]:
    """The statement parameters of each ack that a message carries (``{"acks": [...]}``,
    or one ack as the whole payload); :class:`Permanent` if one of them is not an ack."""
    payload = message.payload
    if isinstance(payload, dict) and "acks" in payload:
        acks = payload["acks"]
        if not isinstance(acks, list) or not acks:
            raise Permanent(f"not a list of acks: {acks!r}"[:MAX_ERROR_CHARS])
        return [_ack_params(ack) for ack in acks]
    return [_ack_params(payload)]


def _ack_params(ack: Any) -> dict[str, Any]:
    """The statement parameters of an ack; :class:`Permanent` if it is not one."""
    try:
        message_id = canonical_message_id(ack["message_id"])
        params = {
            "ok": ack["status"] == "success",
            "error": ack.get("error"),
            "instance": ack.get("instance"),
            "group": ack["group"],
            "topic": ack["topic"],
            "message_id": message_id,
            "delay_s": 0.0,
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Permanent(f"not an ack: {exc!r}") from exc
    instance, error = params["instance"], params["error"]
    if not (
        isinstance(params["group"], str)
        and isinstance(params["topic"], str)
        and (instance is None or isinstance(instance, str))
        and (error is None or isinstance(error, str))
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
