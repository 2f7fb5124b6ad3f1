"""The garbage collector in long-lived processes.

What a worker or consumer process builds as it starts (modules, classes, its app and
settings, the handlers) lives as long as the process, yet every full pass of Python's
cyclic garbage collector walks all of it: tens of milliseconds of CPU a pass, and under
a backlog, where batches keep thousands of rows alive across collections, a process
makes a full pass every few seconds. Frozen once the process is set up, those objects
are left out of every later pass (``gc.freeze``), which then walks only what the
process made since.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect once (so that no garbage is kept for good), then leave every object alive
    now out of the collector's later passes. Call it once a process is set up, before
    its work starts: what it makes after is collected as usual."""
    gc.collect()
    gc.freeze()
