"""What the outage tests share: a call that leaves a mark per run, the counts of those
marks, a map consumed in a thread while the test breaks the engine or the store, and
a wait on a condition with a generous bound (never a fixed sleep)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchpool import BatchPoolExecutor
from batchpool.store import Store

#: The longest wait for a condition of a test: a hang guard, not a measure.
WAIT_TIMEOUT = 120.0


def mark_and_sleep(x: int, folder: str, seconds: float) -> int:
    """Mark the start, sleep, wait while the file ``hold`` is there, mark the end."""
    path = os.path.join(folder, f"{x}.runs")
    with open(path, "a") as f:
        f.write(f"start {os.getpid()}\n")
    time.sleep(seconds)
    while os.path.exists(os.path.join(folder, "hold")):
        time.sleep(0.05)
    with open(path, "a") as f:
        f.write(f"end {os.getpid()}\n")
    return x * 10


def marks(folder: Path) -> dict[int, list[str]]:
    """Each call's mark lines: "start PID" as it began, "end PID" as it returned."""
    return {int(p.stem): p.read_text().splitlines() for p in folder.glob("*.runs")}


def count(folder: Path, kind: str = "start") -> dict[int, int]:
    """How many "start" (or "end") lines each call's mark file has: its runs."""
    return {x: sum(line.startswith(kind) for line in got) for x, got in marks(folder).items()}


def attempts(files: Iterable[Path], folder: str) -> list[int]:
    """The attempt of each of these chunk objects of a run's ``folder`` ("results",
    "events"), sorted: read by ``Store.parse_key``, the one reader of the layout."""
    found: list[int] = []
    for path in files:
        parsed = Store.parse_key(f"{folder}/{path.name}")
        assert parsed is not None, f"{path} is no chunk object of {folder}/"
        found.append(parsed[2])
    return sorted(found)


def wait_until(what: str, condition: Any, timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


def map_in_thread(
    ex: BatchPoolExecutor, folder: Path, calls: int, seconds: float
) -> tuple[threading.Thread, dict[str, Any]]:
    """``list(ex.map(mark_and_sleep, ...))`` in a thread, so the test can break the
    engine or the store meanwhile: ``out["results"]``, or ``out["error"]``."""
    out: dict[str, Any] = {}

    def consume() -> None:
        try:
            out["results"] = list(
                ex.map(
                    mark_and_sleep,
                    range(calls),
                    [str(folder)] * calls,
                    [seconds] * calls,
                    chunksize=1,
                    timeout=240,  # no future waits forever: a hang fails here
                )
            )
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=consume, name="map", daemon=True)
    thread.start()
    return thread, out
