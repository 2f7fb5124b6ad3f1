"""A small HTTP load generator: processes of threads with keep-alive connections."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import threading
import time
from collections.abc import Mapping
from typing import Any


def _worker(
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    seconds: float,
    threads: int,
    out: Any,
) -> None:
    counts = [0] * threads
    errors = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < deadline:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if 200 <= response.status < 300:
                counts[i] += 1
            else:
                errors[i] += 1
        conn.close()

    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((sum(counts), sum(errors)))


def post_load(
    port: int,
    path: str,
    payload: Mapping[str, Any],
    *,
    token: str | None,
    seconds: float,
    processes: int = 2,
    threads: int = 8,
) -> tuple[float, int]:
    """POST ``payload`` as fast as the server answers; return (requests/s, error count)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(payload).encode()
    queue: Any = multiprocessing.get_context("spawn").Queue()
    procs = [
        multiprocessing.get_context("spawn").Process(
            target=_worker, args=(port, path, body, headers, seconds, threads, queue)
        )
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    # Each thread counts only what finished within its own ``seconds``.
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results)
