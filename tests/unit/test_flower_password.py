"""Flower never starts with a password anyone could guess."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from outbox.devstack import processes
from outbox.devstack.dev import flower_password
from outbox.settings import Settings


def test_outbox_dev_makes_one_password_per_data_folder_and_keeps_it(tmp_path: Path):
    first = flower_password(tmp_path / "a")
    assert len(first) >= 20
    assert flower_password(tmp_path / "a") == first  # the same on the next start
    assert flower_password(tmp_path / "b") != first
    mode = (tmp_path / "a" / "flower-password").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_flower_refuses_to_start_without_a_password(tmp_path: Path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUTBOX_FLOWER_PASSWORD": ""}
    run = subprocess.run(
        processes.flower(Settings.from_env({"OUTBOX_FLOWER_PORT": "0"})).argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "OUTBOX_FLOWER_PASSWORD is not set" in run.stdout + run.stderr
