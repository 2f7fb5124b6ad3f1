from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from outbox.cli import cli
from outbox.errors import SettingsError
from outbox.settings import Settings, describe

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_leave_services_unset_so_they_are_embedded():
    s = Settings.from_env({})
    assert (s.database_url, s.redis_url, s.kafka_bootstrap) == (None, None, None)
    assert s.buckets == 64
    assert s.publish_interval_s == 1.0
    assert s.consumer_topics == ("outbox.acks",)


def test_values_are_parsed_by_type():
    s = Settings.from_env(
        {
            "OUTBOX_BUCKETS": "16",
            "OUTBOX_PUBLISH_INTERVAL_S": "0.5",
            "OUTBOX_API_TOKENS": "a, b,,c",
            "OUTBOX_DATABASE_URL": "postgresql://u@h/db",
            "OUTBOX_LOG_LEVEL": "",
        }
    )
    assert s.buckets == 16
    assert s.publish_interval_s == 0.5
    assert s.api_tokens == ("a", "b", "c")
    assert s.database_url == "postgresql://u@h/db"
    assert s.log_level == "INFO"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("OUTBOX_BUCKETS", "many", "invalid literal"),
        ("OUTBOX_BUCKETS", "0", "at least 1"),
        ("OUTBOX_PUBLISH_INTERVAL_S", "fast", "could not convert"),
        ("OUTBOX_CONSUMER_LEASE_S", "1", "at least 3"),
        ("OUTBOX_DATABASE_URL", "mysql://x", "postgresql"),
        ("OUTBOX_REDIS_URL", "amqp://x", "redis://"),
        ("OUTBOX_LOG_LEVEL", "LOUD", "not a log level"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(variable, value, says):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    message = str(info.value)
    assert variable in message
    assert repr(value) in message
    assert says in message


def test_settings_survive_a_trip_through_the_environment():
    s = Settings.from_env({"OUTBOX_API_TOKENS": "t1,t2", "OUTBOX_BUCKETS": "8"})
    assert Settings.from_env(s.as_env()) == s


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.buckets = 3  # type: ignore[misc]


def test_the_readme_table_lists_every_setting_with_its_default():
    readme = README.read_text()
    table = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(OUTBOX_\w+)` \| `([^`]*)` \|", readme, re.M)
    }
    expected = {name: default for name, default, _ in describe()}
    assert table == expected


def test_the_cli_refuses_a_bad_setting_with_its_name():
    result = CliRunner().invoke(cli, ["settings"], env={"OUTBOX_BUCKETS": "-1"})
    assert result.exit_code == 2
    assert "OUTBOX_BUCKETS='-1'" in result.output


def test_the_cli_prints_the_settings_table():
    result = CliRunner().invoke(cli, ["settings"], env={})
    assert result.exit_code == 0
    assert "| `OUTBOX_DATABASE_URL` | `(embedded)` |" in result.output
    assert result.output.count("| `OUTBOX_") == len(describe())


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("OUTBOX_RETENTION_SENT", "OUTBOX_RETENTION_SENT_S", "retention_sent_s"),
        ("OUTBOX_AGENT_INACTIVE_AFTER", "OUTBOX_AGENT_INACTIVE_AFTER_S", "agent_inactive_after_s"),
    ],
)
def test_a_setting_renamed_for_its_unit_still_reads_its_old_name_with_a_warning(
    old: str, new: str, field: str
):
    with pytest.warns(FutureWarning, match=f"{old} is deprecated: name it {new}"):
        assert getattr(Settings.from_env({old: "42"}), field) == 42.0
    with pytest.warns(FutureWarning, match=f"{old} is ignored: {new} is set"):
        assert getattr(Settings.from_env({old: "42", new: "7"}), field) == 7.0
    with pytest.raises(SettingsError, match=old), pytest.warns(FutureWarning):
        Settings.from_env({old: "soon"})


def test_every_duration_setting_names_its_unit():
    units = ("_s", "_ms", "_bytes", "_port", "_size")
    timed = [f.name for f in dataclasses.fields(Settings) if f.type in ("float", float)]
    assert timed and [name for name in timed if not name.endswith(units)] == []


def test_a_consumer_of_acks_alone_waits_longer_for_data_than_any_other():
    from outbox.kafka import consumer_config

    settings = Settings.from_env(
        {
            "OUTBOX_KAFKA_BOOTSTRAP": "kafka.example:9092",
            "OUTBOX_KAFKA_FETCH_WAIT_MAX_MS": "7",
            "OUTBOX_KAFKA_ACK_FETCH_WAIT_MAX_MS": "250",
        }
    )

    def wait(*topics: str) -> int:
        return consumer_config(settings, "g", topics=topics)["fetch.wait.max.ms"]

    assert wait("outbox.acks") == 250
    assert wait("orders") == 7
    # a consumer that also reads another topic must not delay its messages
    assert wait("orders", "outbox.acks") == 7
    assert wait() == 7
    assert Settings.from_env({}).kafka_ack_fetch_wait_max_ms == 100
