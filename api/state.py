"""What the API process shares between requests: settings and lazily made clients."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from functools import cached_property

import redis
from celery import Celery
from confluent_kafka.admin import AdminClient
from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import celeryconfig
from api.kick import Kicker
from outbox.agents import instance_id, upsert_agent
from outbox.db import make_engine, make_sessionmaker
from outbox.errors import SettingsError
from outbox.health import redis_client
from outbox.kafka import admin_client
from outbox.publishing import Publisher
from outbox.settings import Settings, env_name

log = logging.getLogger(__name__)


class ApiState:
    """Clients are made on first use, so a gunicorn worker makes its own after fork."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._heartbeat_pid: int | None = None

    def ensure_heartbeat(self) -> None:
        """Start this process's heartbeat on its first request (so after gunicorn forks):
        an ``api`` agent, refreshed every ``OUTBOX_HEARTBEAT_INTERVAL_S``."""
        if self._heartbeat_pid == os.getpid():
            return
        with self._lock:
            if self._heartbeat_pid == os.getpid():
                return
            self._heartbeat_pid = os.getpid()
        threading.Thread(
            target=_heartbeat, args=(weakref.ref(self),), name="outbox-heartbeat", daemon=True
        ).start()

    @cached_property
    def engine(self) -> Engine:
        with self._lock:
            return make_engine(self.settings)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @cached_property
    def redis(self) -> redis.Redis:
        if self.settings.redis_url is None:
            raise SettingsError(f"{env_name('redis_url')} is not set")
        return redis_client(self.settings.redis_url)

    @cached_property
    def kafka_admin(self) -> AdminClient:
        return admin_client(self.settings)

    @cached_property
    def publisher(self) -> Publisher:
        return Publisher(self.settings)

    @cached_property
    def celery(self) -> Celery:
        """A Celery client for sending tasks (the workers run them)."""
        app = Celery("outbox-api")
        app.conf.update(celeryconfig.from_settings(self.settings))
        return app

    @cached_property
    def kicker(self) -> Kicker:
        return Kicker(self.settings)

    @staticmethod
    def current() -> ApiState:
        """The current app's shared state."""
        result: ApiState = current_app.extensions["outbox"]
        return result


def _heartbeat(ref: weakref.ref[ApiState]) -> None:
    """Refresh the ``api`` agent until the app that owns ``ref`` is gone."""
    instance = instance_id("api")
    failing = False
    while (api := ref()) is not None:
        try:
            with api.sessions.begin() as session:
                upsert_agent(session, instance, "api")
        except Exception as exc:
            # once per outage, not once per beat
            (log.debug if failing else log.warning)(
                "api heartbeat failed: %s: %s", type(exc).__name__, exc
            )
            failing = True
        else:
            if failing:
                log.warning("api heartbeat recovered")
            failing = False
        interval = api.settings.heartbeat_interval_s
        del api  # hold no reference while asleep
        time.sleep(interval)


def state() -> ApiState:
    """The current app's shared state."""
    return ApiState.current()
