"""The core of ``outbox`` (everything but the entry layer: the ``outbox`` command, the
dev stack, the benchmarks and the fault ledger) works with a plain SQLAlchemy session:
it imports neither ``api``, ``tasks`` nor ``consumer``, nor the entry layer."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ("outbox.cli", "outbox.__main__", "outbox.bench", "outbox.chaos", "outbox.devstack")
FORBIDDEN = ("api", "tasks", "consumer", *ENTRY)


def _core_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "outbox").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith(ENTRY):
            names.append(name)
    return names


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_no_core_module_names_the_entry_layer_or_the_processes_in_an_import():
    found = []
    for name in _core_modules():
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            else:
                continue
            found += [f"{name}:{node.lineno} imports {m}" for m in modules if _forbidden(m)]
    assert len(_core_modules()) > 20
    assert found == []


def test_importing_the_whole_core_loads_nothing_of_the_entry_layer_or_the_processes():
    code = (
        "import importlib, json, sys\n"
        f"for name in {_core_modules()!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    )
    assert "outbox.relay" in loaded
    assert [m for m in loaded if _forbidden(m)] == []
