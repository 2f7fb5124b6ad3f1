"""``outbox bench`` runs end to end: a table on stdout, JSON and a PNG in the output folder.

These check that the benchmarks work, on small inputs; they assert no speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("scenario", "args", "figures"),
    [
        (
            "relay",
            ["--rows", "3000", "--rounds", "1"],
            {
                "bare relay (limit)",
                "relay (one process)",
                "bare publish, 1,000 rows per INSERT (limit)",
                "publish_batch, 1,000 rows per transaction",
                "relay / bare relay",
                "worker relay, metrics + task events on",
                "worker relay, metrics + task events off",
            },
        ),
        (
            "api",
            ["--seconds", "1", "--rounds", "2", "--batch", "10"],
            {"bare Flask + one INSERT (limit)", "publish one message"},
        ),
        (
            "latency",
            ["--rate", "50", "--seconds", "3"],
            {"commit -> Kafka ack, p50", "commit -> Kafka ack, p99"},
        ),
        (
            "e2e",
            [
                *("--messages", "500", "--rate", "100", "--high-rate", "200"),
                *("--seconds", "3", "--rounds", "1"),
            ],
            {
                "bare pipeline: publish -> effect (limit)",
                "publish -> handler effect, sustained",
                "publish -> handler effect, sustained, acks on",
                "commit -> handler effect at 100 msg/s, p50",
                "bare: commit -> effect at 100 msg/s, p50",
                "bare Celery pipeline: publish -> effect",
                "bare Celery: commit -> effect at 100 msg/s, p50",
                "bare Celery: stage inbox -> effect at 100 msg/s, p50",
                "CPU per message at 100 msg/s, bare-celery, every process",
                "CPU per message at 100 msg/s, system, every process",
                "CPU per message at 100 msg/s, bare, every process",
            },
        ),
        (
            "metrics",
            ["--rows", "20000", "--scrapes", "5"],
            {"GET /metrics, p50", "heartbeat snapshot (background)"},
        ),
        (
            "scale",
            ["--rows", "2000", "--messages", "1000", "--rounds", "1"],
            {"relay, 2 worker processes", "publish -> handler effect, 2 worker processes"},
        ),
        (
            "retry",
            ["--messages", "200", "--rate", "100", "--rows", "2000", "--rounds", "1"],
            {"messages retried", "commit -> effect, p50, retried", "relay alone, median"},
        ),
    ],
)
def test_a_benchmark_prints_its_table_and_writes_json_and_png(
    tmp_path: Path, scenario: str, args: list[str], figures: set[str]
):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "bench", scenario, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in figures:
        assert name in result.stdout
    report = json.loads((out / f"{scenario}.json").read_text())
    assert report["command"].startswith(f"outbox bench {scenario}")
    values = {f["name"]: f["value"] for f in report["figures"]}
    assert figures <= set(values)
    assert all(values[name] > 0 for name in figures)
    assert report["targets"] and all("met" in t for t in report["targets"])
    assert (out / f"{scenario}.png").read_bytes().startswith(PNG_MAGIC)
