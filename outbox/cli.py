"""The ``outbox`` command. It is the composition root, so its commands may reach
every layer; everything they do is a call into a module that tests call directly."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from outbox.bench.cli import bench
from outbox.errors import OutboxError
from outbox.heap import freeze_startup_objects
from outbox.logs import setup_logging
from outbox.settings import Settings, describe, env_name

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

# Every option can also come from an OUTBOX_* variable (explicit, or OUTBOX_<COMMAND>_<OPTION>
# by click's auto prefix), and --help shows which.
option = functools.partial(click.option, show_envvar=True)


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


@contextlib.contextmanager
def _sessions(ctx: click.Context) -> Iterator[sessionmaker[Session]]:
    """Sessions on the settings' database; the engine goes when the command is done."""
    from outbox.db import make_engine, make_sessionmaker

    engine = make_engine(_settings(ctx), pool_size=1)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@contextlib.contextmanager
def _session(ctx: click.Context, *, write: bool = False) -> Iterator[Session]:
    """One session on the settings' database; with ``write``, one transaction committed
    at the end (rolled back on an error)."""
    with _sessions(ctx) as sessions, sessions.begin() if write else sessions() as session:
        yield session


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Transactional outbox and inbox on PostgreSQL, Kafka and Celery.

    Every setting comes from an OUTBOX_* environment variable: `outbox settings` lists them.
    """
    try:
        ctx.obj = Settings.from_env()
    except OutboxError as exc:
        raise click.UsageError(str(exc)) from exc


DLQ_FILTERS = [
    option("--side", type=click.Choice(["outbox", "inbox", "delivery"]), help="One side only."),
    option("--group", help="Consumer group (inbox and delivery sides)."),
    option("--topic", help="Topic."),
    option("--error", help="Part of the last error, case-insensitive."),
    option("--after", type=click.DateTime(), help="Created or received at or after (UTC)."),
    option("--before", type=click.DateTime(), help="Created or received before (UTC)."),
]


def _dlq_filters(fn: Any) -> Any:
    for decorate in reversed(DLQ_FILTERS):
        fn = decorate(fn)
    return fn


def _dead_letter_filter(**options: Any) -> Any:
    from datetime import UTC

    from outbox.deadletters import DeadLetterFilter

    def aware(at: Any) -> Any:
        return at if at is None or at.tzinfo else at.replace(tzinfo=UTC)

    return DeadLetterFilter.of(
        {**options, "after": aware(options["after"]), "before": aware(options["before"])}
    )


@cli.group()
def dlq() -> None:
    """Dead letters of every side: list them, requeue them, discard them, see held keys."""


@dlq.command("list")
@_dlq_filters
@option("--limit", default=50, show_default=True, help="Most dead letters to show.")
@option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def dlq_list(ctx: click.Context, limit: int, as_json: bool, **filters: Any) -> None:
    """Dead letters, newest first."""
    import json

    from outbox.deadletters import list_dead_letters

    with _session(ctx) as session:
        items, more = list_dead_letters(session, _dead_letter_filter(**filters), limit=limit)
    for item in items:
        if as_json:
            click.echo(json.dumps(item))
        else:
            where = item["group"] or "-"
            click.echo(
                f"{item['id']:<16} {item['at'][:19]}  {item['topic']}  group={where}  "
                f"key={item['key']}  attempts={item['attempts']}  {item['error']}"
            )
    if more and not as_json:
        click.echo(f"... more than {limit}; narrow the filters or raise --limit", err=True)


@dlq.command("requeue")
@click.argument("ids", nargs=-1)
@option("--all", "matching", is_flag=True, help="Requeue every dead letter the filters match.")
@_dlq_filters
@option("--limit", default=1000, show_default=True, help="Most dead letters to requeue.")
@click.pass_context
def dlq_requeue(
    ctx: click.Context, ids: tuple[str, ...], matching: bool, limit: int, **filters: Any
) -> None:
    """Requeue dead letters by id (outbox:N, inbox:N, delivery:N), or --all that match.

    A requeued message keeps its id and headers and gets a fresh attempt budget; beat's
    next relay tick, lane sweep or targeted retry picks it up."""
    from outbox.deadletters import requeue, requeue_matching

    if bool(ids) == matching:
        raise click.UsageError("give dead-letter ids, or --all with filters (not both)")
    missing = []
    with _session(ctx, write=True) as session:
        if matching:
            counts = requeue_matching(session, _dead_letter_filter(**filters), limit=limit)
        else:
            counts = {"outbox": 0, "inbox": 0, "delivery": 0}
            for dead_letter_id in ids:
                if requeue(session, dead_letter_id):
                    counts[dead_letter_id.partition(":")[0]] += 1
                else:
                    missing.append(dead_letter_id)
    click.echo(
        f"requeued {counts['outbox']} outbox, {counts['inbox']} inbox and "
        f"{counts['delivery']} delivery dead letters"
    )
    if missing:
        raise click.ClickException(f"no such dead letter: {', '.join(missing)}")


@dlq.command("discard")
@click.argument("ids", nargs=-1, required=True)
@click.pass_context
def dlq_discard(ctx: click.Context, ids: tuple[str, ...]) -> None:
    """Let inbox dead letters (inbox:N) go without running them: in a hold_key group
    their keys move on. Each is kept as done, its last error saying it was discarded."""
    from outbox.deadletters import discard

    with _session(ctx, write=True) as session:
        missing = [i for i in ids if not discard(session, i)]
    click.echo(f"discarded {len(ids) - len(missing)} inbox dead letters")
    if missing:
        raise click.ClickException(f"no such inbox dead letter: {', '.join(missing)}")


@dlq.command("held")
@option("--group", help="Only this consumer group.")
@option("--limit", default=100, show_default=True, help="Most keys to show.")
@click.pass_context
def dlq_held(ctx: click.Context, group: str | None, limit: int) -> None:
    """Keys parked by a dead letter (groups with on_dead hold_key), with the dead letter
    that holds each and how many messages wait behind it."""
    from outbox.deadletters import held_keys

    with _session(ctx) as session:
        items = held_keys(session, group, limit)
    for item in items:
        click.echo(
            f"{item['group']}  {item['topic']}  key={item['key']}  held={item['held']}  "
            f"by {item['dead_letter']}  {item['error']}"
        )


@cli.command()
@option(
    "--dir",
    "dev_dir",
    type=click.Path(file_okay=False),
    envvar=env_name("dev_dir"),
    show_envvar=True,
    help="Data directory of the embedded services.",
)
@option(
    "--api-port",
    type=int,
    envvar=env_name("api_port"),
    show_envvar=True,
    help="API port (0: a free port).",
)
@option(
    "--flower-port",
    type=int,
    envvar=env_name("flower_port"),
    show_envvar=True,
    help="Flower port (0: a free port).",
)
@option(
    "--workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Celery worker processes.",
)
@option(
    "--consumers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Consumer processes (one group).",
)
@click.pass_context
def dev(
    ctx: click.Context,
    dev_dir: str | None,
    api_port: int | None,
    flower_port: int | None,
    workers: int,
    consumers: int,
) -> None:
    """Run everything on this machine: services, API, workers, beat, consumers, Flower."""
    from outbox.devstack import dev as dev_mod

    settings = _settings(ctx)
    changes = {
        k: v
        for k, v in {"dev_dir": dev_dir, "api_port": api_port, "flower_port": flower_port}.items()
        if v is not None
    }
    settings = settings.replace(**changes)
    setup_logging(settings, "dev")
    sys.exit(dev_mod.run(settings, workers=workers, consumers=consumers))


@cli.command()
@option("--duration", default=60.0, show_default=True, help="Seconds of faults under load.")
@option("--rate", default=200.0, show_default=True, help="Messages per second offered.")
@option("--seed", type=int, default=None, help="Seed of the faults (default: a random one).")
@option(
    "--catch-up",
    default=300.0,
    show_default=True,
    help="Longest wait, after the last fault, for every message to finish.",
)
@option(
    "--out",
    type=click.Path(file_okay=False),
    default=".outbox-chaos",
    show_default=True,
    help="Folder for chaos.json, chaos.png and every process's log.",
)
@click.pass_context
def chaos(
    ctx: click.Context, duration: float, rate: float, seed: int | None, catch_up: float, out: str
) -> None:
    """The fault ledger: the whole system under load and random faults, then every
    acknowledged message judged; exits 1 when one is lost, repeated, out of order or
    stuck."""
    import random

    from outbox import chaos as chaos_mod

    settings = _settings(ctx)
    setup_logging(settings.replace(log_level="WARNING"), "chaos")
    seed = random.randrange(1 << 32) if seed is None else seed
    ledger = chaos_mod.run(
        settings,
        duration_s=duration,
        rate=rate,
        seed=seed,
        out_dir=Path(out),
        catch_up_s=catch_up,
        say=lambda line: click.echo(line, err=True),
    )
    click.echo(ledger.table())
    click.echo(f"wrote {Path(out) / 'chaos.json'} and {Path(out) / 'chaos.png'}", err=True)
    sys.exit(0 if ledger.ok else 1)


@cli.command()
@option(
    "--group",
    required=True,
    envvar=env_name("consumer_group"),
    show_envvar=True,
    help="Kafka consumer group.",
)
@option(
    "--topics",
    required=True,
    envvar=env_name("consumer_topics"),
    show_envvar=True,
    help="Comma-separated topics.",
)
@click.pass_context
def consume(ctx: click.Context, group: str, topics: str) -> None:
    """Read TOPICS as a member of GROUP into the inbox, until SIGTERM; Celery workers run
    the handlers (``consumer.process_lane``), kicked as each batch commits."""
    from consumer import Consumer
    from tasks import make_celery
    from tasks.lanes import kick_lanes, kick_targeted

    settings = _settings(ctx)
    setup_logging(settings, "consumer")
    names = [t.strip() for t in topics.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("needs at least one topic", param_hint="--topics")
    app = make_celery(settings)

    def kick(group: str, lanes: set[int]) -> None:
        kick_lanes(app, settings, {(group, lane) for lane in lanes})

    def route(group: str, lane: int, worker: str) -> None:
        kick_targeted(app, group, lane, worker)

    consumer = Consumer(settings, group, names, on_recorded=kick, on_targeted=route)
    consumer.install_signal_handlers()
    freeze_startup_objects()
    consumer.run()


@cli.command()
@option("--once", is_flag=True, help="One pass: relay what is claimable now, then exit.")
@click.pass_context
def relay(ctx: click.Context, once: bool) -> None:
    """Relay outbox rows to Kafka from this process (workers do this via outbox.publish)."""
    import json
    import time

    from outbox.relay import Relay

    settings = _settings(ctx)
    setup_logging(settings, "relay")
    relay = Relay(settings)
    try:
        while True:
            report = relay.run()
            if once:
                click.echo(json.dumps(report.as_dict()))
                return
            if not report.sent:
                time.sleep(settings.publish_interval_s)
    finally:
        relay.close()


@cli.command("agents")
@option("--role", type=click.Choice(["api", "worker", "beat", "consumer"]), help="Only this role.")
@option("--group", help="Only consumers of this group.")
@option("--active/--inactive", default=None, help="Only active (or inactive) agents.")
@option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def agents_command(
    ctx: click.Context, role: str | None, group: str | None, active: bool | None, as_json: bool
) -> None:
    """Workers, consumers, API processes and beat, most recently seen first."""
    import json

    from outbox.agents import list_agents

    with _session(ctx) as session:
        items = list_agents(session, role=role, group=group, active=active)
    for a in items:
        if as_json:
            click.echo(json.dumps(a))
        else:
            state = "active" if a["active"] else "inactive"
            click.echo(
                f"{a['role']:<9} {state:<9} {a['instance_id']}  pid={a['pid']}  "
                f"seen={a['last_seen_at'][:19]}  group={a['consumer_group'] or '-'}  "
                f"{json.dumps(a['health'])}"
            )


@cli.command("deliveries")
@option("--group", help="Only this consumer group.")
@option(
    "--status",
    type=click.Choice(["awaiting_ack", "acked", "failed", "dead"]),
    help="Only this status.",
)
@option("--message-id", type=click.UUID, help="Only this message.")
@option("--limit", default=50, show_default=True, help="Most deliveries to show.")
@option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def deliveries_command(
    ctx: click.Context,
    group: str | None,
    status: str | None,
    message_id: Any,
    limit: int,
    as_json: bool,
) -> None:
    """Deliveries to the groups that ack, newest first."""
    import json

    from outbox.message_reads import list_deliveries

    with _session(ctx) as session:
        items = list_deliveries(
            session, group=group, status=status, message_id=message_id, limit=limit
        )
    for d in items:
        if as_json:
            click.echo(json.dumps(d))
        else:
            click.echo(
                f"{d['message_id']}  {d['group']:<16} {d['status']:<13} "
                f"attempts={d['attempts']}  by={d['instance_id'] or '-'}  {d['error'] or ''}"
            )


@cli.command("cleanup")
@option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.pass_context
def cleanup_command(ctx: click.Context, dry_run: bool) -> None:
    """Delete finished rows past their retention now (beat runs this as outbox.cleanup)."""
    from outbox.cleanup import cleanup

    settings = _settings(ctx)
    setup_logging(settings, "cleanup")
    with _sessions(ctx) as sessions:
        report = cleanup(settings, sessions, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for kind, count in report.deleted.items():
        click.echo(f"{kind:<18} {verb} {count:>10,}")


@cli.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command()
@click.argument("revision", default="head")
@click.pass_context
def upgrade(ctx: click.Context, revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from outbox import migrate

    migrate.upgrade(_settings(ctx), revision)
    click.echo(f"database upgraded to {revision}")


@db.command()
@click.argument("revision", default="base")
@click.pass_context
def downgrade(ctx: click.Context, revision: str) -> None:
    """Revert migrations down to REVISION (default: base, an empty schema)."""
    from outbox import migrate

    migrate.downgrade(_settings(ctx), revision)
    click.echo(f"database downgraded to {revision}")


@db.command()
@click.pass_context
def current(ctx: click.Context) -> None:
    """Show the database's migration revision."""
    from outbox import migrate

    migrate.current(_settings(ctx))


@cli.command()
@option(
    "--dir",
    "dev_dir",
    type=click.Path(file_okay=False),
    envvar=env_name("dev_dir"),
    show_envvar=True,
    help="Data directory of the embedded services.",
)
@click.pass_context
def services(ctx: click.Context, dev_dir: str | None) -> None:
    """Run only the embedded services (for pointing other processes at them)."""
    import signal
    import threading

    from outbox.devstack.services import EmbeddedServices

    settings = _settings(ctx)
    root = Path(dev_dir or settings.dev_dir).resolve()
    setup_logging(settings, "services")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with EmbeddedServices(settings, root).running() as live:
        for name in ("database_url", "redis_url", "kafka_bootstrap"):
            click.echo(f"export {env_name(name)}={getattr(live, name)}")
        click.echo("# Ctrl-C stops the services.")
        stop.wait()


@cli.command("settings")
def settings_cmd() -> None:
    """Print every OUTBOX_* setting with its default and meaning (a Markdown table)."""
    click.echo("| variable | default | meaning |")
    click.echo("| --- | --- | --- |")
    for name, default, doc in describe():
        click.echo(f"| `{name}` | `{default}` | {doc} |")


cli.add_command(bench)


def main() -> None:
    """Console-script entry point; a bad setting exits 2 with its message."""
    try:
        cli(standalone_mode=True, auto_envvar_prefix="OUTBOX")
    except OutboxError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
