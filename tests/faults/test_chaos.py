"""The fault ledger, seeded: the whole system under load and a fault every few seconds
(every kind at least once), and not one message lost, repeated, out of order or stuck."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from outbox.chaos.faults import Injector

SEED = 20261201


def test_a_seeded_minute_of_faults_loses_repeats_reorders_and_strands_nothing(tmp_path: Path):
    out = tmp_path / "chaos"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OUTBOX_DATABASE_URL", "OUTBOX_REDIS_URL", "OUTBOX_KAFKA_BOOTSTRAP")
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "outbox",
            "chaos",
            "--duration",
            "60",
            "--seed",
            str(SEED),
            "--catch-up",
            "180",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((out / "chaos.json").read_text())
    figures = report["figures"]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "PASS" in run.stdout
    assert figures["acknowledged"] > 5000
    # a third of them went in by COPY, in batches that are given up when a commit fails
    assert figures["acknowledged in COPY batches"] > 1000
    assert figures["lost"] == figures["duplicate effects"] == 0
    assert figures["order violations"] == figures["stuck"] == 0
    assert figures["delivered (an effect)"] == figures["acknowledged"]
    assert figures["faults injected"] >= 15
    kinds = {fault["kind"] for fault in report["faults"]}
    every = set(Injector.KINDS)
    assert kinds == every, every - kinds
    assert (out / "chaos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
