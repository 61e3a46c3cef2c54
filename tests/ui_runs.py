"""Real runs for the web page's tests (tests/test_ui.py, tests/test_ui_browser.py): made
by a BatchPoolExecutor on the local backend, kept in a test's storage folder."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from batchpool import BatchPoolExecutor
from batchpool.ui import UIServer

#: The items of ``shard`` that raise, and the one whose worker is killed (SIGKILL).
FAILING = (3, 5)
KILLED = 6
ITEMS = list(range(8))
#: What item 0 prints: the page must show it as text, never run it.
SCRIPT = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


def shard(i: int) -> int:
    print(f"processing shard {i}", flush=True)
    if i == 0:
        print(SCRIPT, flush=True)
    if i in FAILING:
        print(f"shard {i}: checksum mismatch in block 17", flush=True)
        raise ValueError(f"shard {i} is corrupt")
    if i == KILLED:
        os.kill(os.getpid(), signal.SIGKILL)
    return i * 100


def hold(gate: str, i: int = 0) -> int:
    """Print, then wait until ``gate`` exists (a job that stays Running)."""
    print(f"holding {i}", flush=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return i


@dataclass
class EndedRun:
    storage: Path
    folder: str
    #: {item: chunk id} of each call (one call per job)
    chunks: dict[int, str]


def ended_run(storage: Path, name: str = "nightly") -> EndedRun:
    """A closed run of 8 calls (submits coalesce into 5-8 jobs): 2 raise, the worker of
    one is killed (its job is Error), the others return."""
    with BatchPoolExecutor(
        name=name,
        storage=str(storage),
        max_workers=2,
        max_attempts=1,
        cleanup_bucket=False,
        cost_per_core_hour=0.05,
    ) as bpe:
        folder = bpe.run_url.rstrip("/").rsplit("/", 1)[-1]
        # The killed worker goes last: a pool worker writes its end markers just after
        # it reports a job done, and a SIGKILL meanwhile would lose those of its jobs.
        first = {i: bpe.submit(shard, i) for i in ITEMS if i != KILLED}
        for future in first.values():
            future.exception(timeout=120)
        wait_for_end_markers(storage / folder)
        killed = bpe.submit(shard, KILLED)
        killed.exception(timeout=120)
        futures = {**first, KILLED: killed}
        chunks = {i: f.job.chunk for i, f in futures.items() if f.job is not None}
    wait_for_end_markers(storage / folder)
    return EndedRun(storage, folder, chunks)


def wait_for_end_markers(run: Path, timeout: float = 60.0) -> None:
    """Until each outcome has its end marker: a pool worker writes the marker just after
    it told the pool the job is done, so it may land after the executor closed."""
    deadline = time.monotonic() + timeout
    while len(list(run.glob("events/*.end"))) < len(list(run.glob("results/*.out"))):
        if time.monotonic() > deadline:
            raise AssertionError(f"the end markers of {run} did not all arrive in {timeout} s")
        time.sleep(0.05)


@dataclass
class LiveRun:
    executor: BatchPoolExecutor
    server: UIServer
    futures: list[cf.Future[int]]
    storage: Path
    folder: str


@contextmanager
def live_run(tmp_path: Path, name: str = "live", calls: int = 4) -> Iterator[LiveRun]:
    """A run whose ``calls`` jobs hold until the block ends (two run at once), and a page
    server for its storage. The gate opens in any case, so a failing test never leaves
    the executor's shutdown waiting on held jobs."""
    storage = tmp_path / "runs"
    gate = tmp_path / "gate"
    with (
        BatchPoolExecutor(
            name=name, storage=str(storage), max_workers=2, max_attempts=1, cleanup_bucket=False
        ) as bpe,
        UIServer(str(storage)) as server,
    ):
        futures = [bpe.submit(hold, str(gate), i) for i in range(calls)]
        try:
            yield LiveRun(bpe, server, futures, storage, bpe.run_url.rsplit("/", 1)[-1])
        finally:
            gate.touch()


@dataclass
class UICommand:
    """A running ``batchpool ui ... --port 0``: the URL it printed, and its process."""

    said: str
    url: str
    process: subprocess.Popen[str]


@contextmanager
def ui_command(*args: str) -> Iterator[UICommand]:
    """Run ``batchpool ui ARGS --port 0`` until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-m", "batchpool", "ui", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        said = process.stdout.readline()
        url = process.stdout.readline().strip()
        assert url.startswith("http://"), f"batchpool ui printed {said!r} {url!r}"
        yield UICommand(said, url, process)
    finally:
        process.terminate()
        process.wait(timeout=30)
