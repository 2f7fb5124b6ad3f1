"""The fault ledger's publishers: over HTTP in batches, through ``publish()`` in
application transactions, and through ``publish_batch()`` in batches large enough to go
in by COPY, each at its share of a steady rate.

Each publisher owns its keys and numbers each key's messages from 0; a message is
*acknowledged* once the publisher knows it was committed (a 202, a commit that
returned). The first two retry as a real client that never knows whether a timed-out
request landed: with the same idempotency keys, until it is acknowledged, so an
acknowledged message has one id however many times it was sent. The batches without
idempotency keys cannot be retried safely: a batch whose commit failed is given up, as
such a client would, and may have landed (its effects are counted apart).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import time
import uuid
from typing import Any

from sqlalchemy import Engine

from outbox.chaos.handlers import TOPIC
from outbox.publishing import COPY_MIN_ROWS, Message, Publisher
from outbox.settings import Settings

BATCH = 20
assert BATCH >= COPY_MIN_ROWS, "the keyless batches are to go in by COPY"
RETRY_PAUSE_S = 0.2
HTTP_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class Acked:
    """One acknowledged message: its id, key, number within its key, and when."""

    message_id: str
    key: str
    seq: int
    at: float


class Publishers:
    """Runs the publisher threads (HTTP, ``publish()``, COPY batches) until :meth:`stop`."""

    def __init__(
        self, settings: Settings, engine: Engine, api_port: int, rate: float, keys: int
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.api_port = api_port
        self.rate = rate
        self.keys = keys
        self.acked: list[Acked] = []
        self.retries = 0
        self.copied = 0  # acknowledged messages of the batches without idempotency keys
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._http, daemon=True),
            threading.Thread(target=self._library, daemon=True),
            threading.Thread(target=self._copied, daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _ack(self, ids: list[str], batch: list[tuple[str, int]]) -> None:
        now = time.time()
        with self._lock:
            self.acked += [Acked(i, k, n, now) for i, (k, n) in zip(ids, batch, strict=True)]

    def _batches(self, prefix: str, per_s: float) -> Any:
        """Batches of (key, seq), at ``per_s`` messages a second, until stopped."""
        seqs = [0] * self.keys
        sent = 0
        started = time.monotonic()
        while not self._stop.is_set():
            batch = []
            for _ in range(BATCH):
                k = sent % self.keys
                batch.append((f"{prefix}{k}", seqs[k]))
                seqs[k] += 1
                sent += 1
            yield batch
            ahead = started + sent / per_s - time.monotonic()
            if ahead > 0:
                self._stop.wait(ahead)

    def _http(self) -> None:
        token = self.settings.api_tokens[0]
        for batch in self._batches("h", self.rate / 3):
            body = json.dumps(
                {"messages": [{"topic": TOPIC, "key": k, "payload": {"seq": n}} for k, n in batch]}
            ).encode()
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Idempotency-Key": uuid.uuid4().hex,
            }
            while True:  # the same request, with the same key, until it is acknowledged
                ids = self._post(body, headers)
                if ids is not None:
                    self._ack(ids, batch)
                    break
                self.retries += 1
                time.sleep(RETRY_PAUSE_S)

    def _post(self, body: bytes, headers: dict[str, str]) -> list[str] | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=HTTP_TIMEOUT_S)
        try:
            conn.request("POST", "/v1/messages", body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            return None  # refused, reset or timed out: it may have landed, or not
        finally:
            conn.close()
        if response.status != 202:
            return None
        ids: list[str] = json.loads(payload)["message_ids"]
        return ids

    def _library(self) -> None:
        publisher = Publisher(self.settings)
        for batch in self._batches("p", self.rate / 3):
            # One application transaction per message, the way most services publish.
            for key, seq in batch:
                idempotency_key = uuid.uuid4().hex
                while True:
                    try:
                        with self.engine.begin() as conn:
                            message_id = publisher.publish(
                                conn, TOPIC, {"seq": seq}, key=key, idempotency_key=idempotency_key
                            )
                    except Exception:  # the database restarts: did the commit land? retry
                        self.retries += 1
                        time.sleep(RETRY_PAUSE_S)
                        continue
                    self._ack([str(message_id)], [(key, seq)])
                    break
                if self._stop.is_set():
                    return

    def _copied(self) -> None:
        publisher = Publisher(self.settings)
        for batch in self._batches("c", self.rate / 3):
            messages = [Message(TOPIC, {"seq": seq}, key=key) for key, seq in batch]
            try:
                with self.engine.begin() as conn:
                    ids = publisher.publish_batch(conn, messages)
            except Exception:  # the database restarts: the batch may have landed, or not
                self.retries += 1
                time.sleep(RETRY_PAUSE_S)
                continue
            self._ack([str(i) for i in ids], batch)
            self.copied += len(ids)
