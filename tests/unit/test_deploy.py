"""The compose file, the Dockerfile and .env.example, checked as they are read: one
image for every role, every service healthy-checked and pinned, workers and
consumers free to scale, exactly one beat, and settings from one documented file.
``docker compose config`` checks the file too wherever a Docker client has compose.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from outbox.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
APP_ROLES = ("migrate", "api", "worker", "beat", "consumer", "flower")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_every_service_is_there_pinned_and_health_checked(compose: dict[str, Any]):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "kafka", *APP_ROLES}
    for name, service in services.items():
        check = " ".join(service["healthcheck"]["test"][1:])
        assert check not in ("true", "test -d /proc/1"), name  # a check that can fail
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), (name, image)  # a version tag
    app_images = {services[role]["image"] for role in APP_ROLES}
    assert len(app_images) == 1  # one image for every role
    # Where a Docker client has compose, it must accept the file as well.
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        result = subprocess.run(
            [docker, "compose", "config", "--quiet"], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr


def test_redis_keeps_what_it_is_given_and_kafka_runs_without_zookeeper(compose: dict[str, Any]):
    redis = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    kafka = compose["services"]["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, single node
    assert not any("ZOOKEEPER" in k for k in kafka)


def test_every_role_waits_for_the_migration_and_workers_and_consumers_scale(
    compose: dict[str, Any],
):
    services = compose["services"]
    assert services["migrate"]["command"] == ["outbox", "db", "upgrade"]
    for role in APP_ROLES[1:]:
        wait = services[role]["depends_on"]["migrate"]["condition"]
        assert wait == "service_completed_successfully", role
    for name, service in services.items():
        assert "container_name" not in service, name
        # a published port lets Docker choose the host side, so replicas never clash
        assert all(":" not in str(port) for port in service.get("ports", [])), name
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    api = services["api"]["command"]
    assert api[api.index("--logger-class") + 1] == "api.gunicorn_logging.Logger"
    for role in ("worker", "beat", "flower"):  # JSON logs: no banners in between
        assert "--quiet" in " ".join(services[role]["command"]), role
    # beat and consumers are healthy while they heartbeat as active agents
    for role in ("beat", "consumer"):
        assert f"outbox agents --role {role} --active" in services[role]["healthcheck"]["test"][1]
    assert "beat" in services["beat"]["command"]
    # Flower's /metrics answers without credentials: its port is not published
    assert "ports" not in services["flower"] and services["flower"]["expose"] == ["5555"]


def test_settings_come_from_one_documented_file(compose: dict[str, Any]):
    for role in APP_ROLES:
        files = compose["services"][role]["env_file"]
        assert files[0] == ".env.example", role
        assert files[1] == {"path": ".env", "required": False}, role
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    lines = (ROOT / ".env.example").read_text().splitlines()
    names = [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]
    assert names and set(names) <= known, set(names) - known
    Settings.from_env(dict(line.split("=", 1) for line in lines if "=" in line))  # valid


def test_the_image_installs_the_package_and_runs_as_a_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M)
    assert base and re.fullmatch(r"python:\d+\.\d+[\w.-]*", base.group(1))
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "tests", "**/__pycache__", ".pytest_cache", ".git"} <= ignored
