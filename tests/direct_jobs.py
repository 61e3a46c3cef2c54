"""Jobs handed to a backend directly (no executor), and a wait for the events it pushes:
what the Dask and Ray backends' own tests share."""

from __future__ import annotations

import time
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from batchpool.backends.base import JobEvent, JobSpec, Resources
from batchpool.serialization import SECRET_ENV
from batchpool.store import STORE_ENV, Store


def direct_spec(tmp_path: Path, chunk: str, resources: Resources | None = None) -> JobSpec:
    """A job of attempt 1 of ``chunk`` in an empty run under ``tmp_path``: its input is
    missing, so its worker fails at once, unless it is cancelled before it starts."""
    store = Store(LocalFileSystem(), str(tmp_path / "run"))
    env = {STORE_ENV: store.spec(), SECRET_ENV: "00" * 32}
    return JobSpec(
        name=f"direct-{chunk}",
        args=("--chunk", chunk, "--attempt", "1"),
        env=env,
        resources=resources or Resources(),
    )


def wait_for_events(events: list[JobEvent], n: int, timeout: float) -> None:
    """Until ``n`` events arrived; ``timeout`` is a hang guard, not a measure."""
    deadline = time.monotonic() + timeout
    while len(events) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(events) >= n, events
