"""``outbox bench``: one command per scenario, each a module of this package with a
``run(settings, command=..., **options)`` that returns its report. A scenario runs on
services of its own (:mod:`outbox.bench.env`); its table is printed, and its JSON and
PNG are written to ``--out``."""

from __future__ import annotations

import functools
import gc
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from outbox.settings import Settings

option = functools.partial(click.option, show_envvar=True, show_default=True)


@click.group()
def bench() -> None:
    """Benchmarks: each prints a table and writes JSON and a PNG plot."""


def run_scenario(settings: Settings, scenario: str, out: str, **options: Any) -> None:
    """Run ``outbox.bench.<scenario>`` on its own services; print and write its report."""
    from outbox.bench.env import bench_environment

    module = importlib.import_module(f"outbox.bench.{scenario}")
    shown = " ".join(
        f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
        for k, v in options.items()
    )
    with bench_environment(settings) as live:
        report = module.run(live, command=f"outbox bench {scenario} {shown}", **options)
        # Kafka clients caught in reference cycles close now, while their broker still runs.
        gc.collect()
    click.echo(report.table())
    json_path, png_path = report.write(Path(out))
    click.echo(f"wrote {json_path} and {png_path}")


def _scenario(name: str, doc: str, *options: Callable[[Any], Any]) -> None:
    """Add ``outbox bench <name>`` with ``options`` and ``--out``."""

    @click.pass_context
    def command(ctx: click.Context, out: str, **values: Any) -> None:
        run_scenario(ctx.obj, name, out, **values)

    command.__doc__ = doc
    for decorate in reversed(
        [*options, option("--out", default="bench-results", help="Output folder.")]
    ):
        command = decorate(command)
    bench.command(name)(command)


WORKERS = option(
    "--workers",
    default=3,
    help="Celery pool processes (3: a worker's own default on two CPUs, where tasks linger).",
)

_scenario(
    "relay",
    "Relay and publish_batch next to the bare relay and the bare publish, in alternating "
    "rounds; then the relay in a worker, with metrics and task events on and off.",
    option("--rows", default=100_000, help="Outbox rows to relay."),
    option("--payload-bytes", default=200, help="Payload size."),
    option("--keys", default=1000, help="Distinct message keys."),
    option("--rounds", default=3, help="Alternating rounds of each comparison."),
)
_scenario(
    "api",
    "Publish requests/s under gunicorn next to a bare Flask endpoint doing one INSERT.",
    option("--seconds", default=4.0, help="Load time per measurement."),
    option("--rounds", default=5, help="Rounds of bare and single publish."),
    option("--workers", default=2, help="gunicorn worker processes."),
    option("--threads", default=4, help="Threads per gunicorn worker."),
    option("--batch", default=100, help="Messages per batch request."),
)
_scenario(
    "latency",
    "Commit-to-Kafka latency percentiles at a fixed offered load, via a real worker.",
    option("--rate", default=500.0, help="Offered messages per second."),
    option("--seconds", default=20.0, help="How long to offer them."),
    WORKERS,
)
_scenario(
    "e2e",
    "Publish to handler effect next to the bare pipeline: sustained throughput, latency "
    "at two fixed loads, CPU per message by process.",
    option("--messages", default=50_000, help="Messages of each throughput phase."),
    option("--rate", default=500.0, help="Offered msg/s of the first latency phase."),
    option("--high-rate", default=2000.0, help="Offered msg/s of the second latency phase."),
    option("--seconds", default=20.0, help="Length of each latency phase."),
    option("--rounds", default=3, help="Alternating rounds of the system and the bare pipeline."),
    WORKERS,
)
_scenario(
    "metrics",
    "Time of a /metrics scrape with a large outbox, next to counting it directly.",
    option("--rows", default=1_000_000, help="Outbox rows."),
    option("--scrapes", default=50, help="Timed scrapes of /metrics."),
)
_scenario(
    "scale",
    "Relay and end-to-end throughput with 1 and 2 worker processes.",
    option("--rows", default=50_000, help="Rows per relay measurement."),
    option("--messages", default=20_000, help="Messages per end-to-end one."),
    option("--rounds", default=2, help="Rounds of 1 and 2 workers."),
)
_scenario(
    "retry",
    "Extra time and database cost of a targeted retry; the relay with and without it.",
    option("--messages", default=2_000, help="Messages of each phase."),
    option("--rate", default=200.0, help="Offered msg/s in each phase."),
    option("--fail-percent", default=10, help="Messages failing once, in %."),
    option("--retry-interval", default=1.0, help="Beat interval of the retry task."),
    option("--rows", default=20_000, help="Rows per relay measurement."),
    option("--rounds", default=5, help="Rounds of relay alone and with retries."),
    WORKERS,
)
