"""Log lines: readable text by default, one JSON object per line on request, each with
the process role and, where there is one, the message it concerns."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator

import pytest

from outbox.errors import SettingsError
from outbox.logs import log_message, setup_logging
from outbox.settings import Settings


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_carry_the_role_and_the_message(capsys: pytest.CaptureFixture[str]):
    setup_logging(Settings.from_env({}, log_format="json"), "worker")
    message_id = uuid.uuid4()
    with log_message(message_id):
        logging.getLogger("consumer.lanes").warning("attempt %d failed", 2)
    logging.getLogger("outbox.relay").info("outside")
    first, second = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert first["role"] == "worker" and first["level"] == "WARNING"
    assert (first["logger"], first["message"]) == ("consumer.lanes", "attempt 2 failed")
    assert first["message_id"] == str(message_id)
    assert "message_id" not in second and "task_id" not in second


def test_text_lines_name_the_role_and_the_message(capsys: pytest.CaptureFixture[str]):
    setup_logging(Settings.from_env({}), "consumer")
    with log_message("m-1"):
        logging.getLogger("consumer.loop").warning("slow commit")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("WARNING consumer consumer.loop: slow commit [message=m-1]")


def test_an_unknown_log_format_is_refused():
    with pytest.raises(SettingsError, match="OUTBOX_LOG_FORMAT"):
        Settings.from_env({"OUTBOX_LOG_FORMAT": "xml"})


def test_a_handlers_log_lines_name_its_message(capsys: pytest.CaptureFixture[str]):
    import consumer
    from consumer.calls import call

    @consumer.handler("test.logs.named")
    def handle(message: consumer.Message, session: object) -> None:
        logging.getLogger("billing").warning("charged %s", message.payload["n"])

    setup_logging(Settings.from_env({}, log_format="json"), "worker")
    message_id = uuid.uuid4()
    call(consumer.Message(message_id, "test.logs.named", "k", {"n": 7}, {}, 1, 0, 0), None, 5.0)  # type: ignore[arg-type]
    logging.getLogger("consumer.lanes").info("after the call")
    inside, after = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert (inside["message"], inside["message_id"]) == ("charged 7", str(message_id))
    assert "message_id" not in after
