"""A benchmark's results: a table on stdout, and JSON and a PNG plot in the output folder."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Figure:
    name: str
    value: float
    unit: str
    note: str = ""


@dataclasses.dataclass
class Report:
    """Figures of one scenario; ``targets`` compare a figure with a limit or a bound."""

    scenario: str
    command: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    targets: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    series: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    # A bar chart per title: a value per (group, bar), e.g. CPU per message by process.
    breakdown: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.time)

    def add(self, name: str, value: float, unit: str, note: str = "") -> float:
        self.figures.append(Figure(name, value, unit, note))
        return value

    def value(self, name: str) -> float:
        return next(f.value for f in self.figures if f.name == name)

    def target(self, what: str, actual: float, bound: float, *, at_most: bool = False) -> None:
        """Record whether ``actual`` meets ``bound`` (at least, or at most)."""
        met = actual <= bound if at_most else actual >= bound
        self.targets.append(
            {"target": what, "actual": round(actual, 4), "bound": round(bound, 4), "met": met}
        )

    def table(self) -> str:
        width = max(len(f.name) for f in self.figures)
        lines = [f"{'figure':<{width}}  {'value':>12}  unit", "-" * (width + 24)]
        for f in self.figures:
            note = f"  ({f.note})" if f.note else ""
            lines.append(f"{f.name:<{width}}  {f.value:>12,.1f}  {f.unit}{note}")
        for t in self.targets:
            verdict = "met" if t["met"] else "NOT met"
            lines.append(f"target: {t['target']}: {t['actual']:,} vs {t['bound']:,} -> {verdict}")
        return "\n".join(lines)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``<scenario>.json`` and ``<scenario>.png``; return their paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / f"{self.scenario}.json"
        png_path = out_dir / f"{self.scenario}.png"
        json_path.write_text(
            json.dumps(
                {
                    "scenario": self.scenario,
                    "command": self.command,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": sys.version.split()[0],
                        "platform": platform.platform(),
                    },
                    "figures": [dataclasses.asdict(f) for f in self.figures],
                    "targets": self.targets,
                },
                indent=2,
            )
            + "\n"
        )
        self._plot(png_path)
        return json_path, png_path

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 1 + bool(self.series) + len(self.breakdown)
        # A latency report shows its percentiles; a throughput report its rates (figures
        # in other units, such as CPU time, are in the breakdowns' panels).
        unit = "ms" if self.series else "/s"
        rates = [f for f in self.figures if f.unit.endswith(unit)]
        # Tall enough for one readable label per bar.
        height = max(4.0, 0.25 * len(rates))
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, height), squeeze=False)
        ax = axes[0][0]
        ax.barh([f.name for f in rates], [f.value for f in rates], color="#4472c4")
        ax.set_xlabel(rates[0].unit if rates else "")
        ax.set_title(f"outbox bench {self.scenario}")
        ax.invert_yaxis()
        for i, f in enumerate(rates):
            ax.text(
                f.value,
                i,
                f" {f.value:,.1f}" if f.value < 100 else f" {f.value:,.0f}",
                va="center",
                fontsize=8,
            )
        if self.series:
            ax2 = axes[0][1]
            # In name order, as the breakdowns' groups: a side has one colour in both.
            for name, values in sorted(self.series.items()):
                ordered = sorted(values)
                n = len(ordered)
                ax2.plot(ordered, [(i + 1) / n for i in range(n)], label=name)
            ax2.set_xscale("log")
            ax2.set_xlabel("ms")
            ax2.set_ylabel("fraction of messages")
            ax2.set_title("latency (CDF)")
            ax2.grid(True, alpha=0.3)
            ax2.legend()
        for n, (title, groups) in enumerate(self.breakdown.items(), start=1 + bool(self.series)):
            ax3 = axes[0][n]
            bars = sorted({bar for heights in groups.values() for bar in heights})
            width = 0.8 / max(len(groups), 1)
            for g, (group, heights) in enumerate(sorted(groups.items())):
                ax3.bar(
                    [i + g * width for i in range(len(bars))],
                    [heights.get(bar, 0.0) for bar in bars],
                    width,
                    label=group,
                )
            ax3.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(bars))])
            ax3.set_xticklabels(bars, rotation=30, ha="right", fontsize=8)
            ax3.set_title(title)
            ax3.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def progress(message: str) -> None:
    """One progress line on stderr, so the table on stdout stays clean."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)
