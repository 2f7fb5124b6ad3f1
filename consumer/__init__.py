"""The consumer side: Kafka to inbox, and processing of inbox rows by handlers.

import consumer

@consumer.handler("orders")
def on_order(message: consumer.Message, session) -> None:
    session.execute(...)  # commits with the inbox row: exactly once
"""

from __future__ import annotations

from consumer.handlers import Message, NoHandler, Permanent, batch_handler, handler
from consumer.loop import Consumer

__all__ = ["Consumer", "Message", "NoHandler", "Permanent", "batch_handler", "handler"]
