"""Workers killed from outside, before they are ready or while they run jobs: the pool
keeps going, and only workers that cannot start at all make calls fail.

Everything here runs on real local worker processes with the run in ``tmp_path``; the
workers are found in /proc (children of this process running ``batchpool.worker
--serve``) and killed with SIGKILL, as the out-of-memory killer or ``kill -9`` would.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchpool import BatchPoolExecutor, LocalBackend, WorkerLostError

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- functions the workers run -------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def square_slowly(x: int) -> int:
    time.sleep(0.002)
    return x * x


# -- finding and killing the pool's workers ------------------------------------------------


def pool_workers() -> dict[int, float]:
    """The live worker processes of this process's pools: pid -> age in seconds."""
    me = str(os.getpid()).encode()
    with open("/proc/uptime", "rb") as f:
        uptime = float(f.read().split()[0])
    workers: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        # After the command name, which may hold spaces: state, ppid, ..., start time (22).
        fields = stat.rsplit(b")", 1)[-1].split()
        if fields[0] in (b"Z", b"X") or fields[1] != me:
            continue
        if b"batchpool.worker" in argv and b"--serve" in argv:
            workers[int(entry.name)] = uptime - int(fields[19]) / CLOCK_TICKS
    return workers


def sigkill(pid: int) -> bool:
    """Kill ``pid``; False if it had ended already."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


#: Put first on the workers' PYTHONPATH, this holds each new pool worker at start-up,
#: before it imports ``batchpool.worker`` (so before it can report ready), until the file
#: ``go`` appears in $CHAOS_HOLD; it says so first with a file ``held-<pid>`` there.
HOLD_AT_START = """
import os, time
if b"batchpool.worker" in open("/proc/self/cmdline", "rb").read():
    folder = os.environ["CHAOS_HOLD"]
    open(os.path.join(folder, "held-%d" % os.getpid()), "w").close()
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.005)
"""


def kill_held_workers(
    folder: Path, wanted: int, deadline: float, stop: Callable[[], bool]
) -> tuple[int, list[int]]:
    """SIGKILL each pool worker held at start-up (see HOLD_AT_START), until ``wanted`` of
    them were killed, ``deadline`` passes or ``stop()`` is true. Returns how many were
    killed, and the pids of any that were gone before their kill."""
    seen: set[str] = set()
    killed, missed = 0, []
    while killed < wanted and time.monotonic() < deadline and not stop():
        for held in sorted(folder.glob("held-*")):
            if held.name in seen:
                continue
            seen.add(held.name)
            pid = int(held.name.split("-")[1])
            if sigkill(pid):
                killed += 1
            else:
                missed.append(pid)
        time.sleep(0.005)
    return killed, missed


class Chaos(threading.Thread):
    """SIGKILLs a random live pool worker every ``period`` seconds until it has killed
    ``wanted`` of them (or 120 s have passed: a hang guard)."""

    def __init__(self, period: float, wanted: int, seed: int) -> None:
        super().__init__(name="chaos", daemon=True)
        self.period = period
        self.wanted = wanted
        self.random = random.Random(seed)
        self.kills = 0

    def run(self) -> None:
        end = time.monotonic() + 120
        while self.kills < self.wanted and time.monotonic() < end:
            workers = sorted(pool_workers())
            if workers and sigkill(self.random.choice(workers)):
                self.kills += 1
            time.sleep(self.period)


def assert_pool_works(ex: BatchPoolExecutor, n: int) -> None:
    assert ex.submit(square, 12).result(timeout=60) == 144
    results = list(ex.map(square, range(n), chunksize=10, timeout=60))
    assert results == [x * x for x in range(n)]


# -- workers killed before they are ready --------------------------------------------------


@pytest.mark.timeout(120)
def test_killing_fresh_workers_before_they_are_ready_does_not_break_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the pool told kills from failures to start, three workers killed before
    they were ready made every later call fail with "local worker processes ... exit
    before they are ready"."""
    # Each new worker waits at start-up until the test lets it go: killed there, it is
    # surely not ready, however fast or slow the machine.
    hold, held = tmp_path / "hold", tmp_path / "held"
    hold.mkdir()
    held.mkdir()
    (hold / "sitecustomize.py").write_text(HOLD_AT_START)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(hold), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("CHAOS_HOLD", str(held))
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path / "runs")) as ex:
        future = ex.submit(square, 7)  # starts the pool; the call waits for a ready worker
        # Stop early if the call fails: its error then says why the pool gave up.
        killed, missed = kill_held_workers(held, 6, time.monotonic() + 60, stop=future.done)
        assert not future.done(), future.exception()  # no worker got past its hold
        assert (killed, missed) == (6, []), "workers held at start-up were not killed there"
        (held / "go").touch()  # the next workers start and report ready
        assert future.result(timeout=60) == 49
        results = list(ex.map(square, range(200), timeout=60))
        assert results == [x * x for x in range(200)]


# -- workers killed at random under load ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_kills_random_workers_under_load_and_the_pool_recovers(tmp_path: Path) -> None:
    """5,000 calls in chunks of 25 while a random worker is killed every 0.3 s, 15 in all:
    a chunk either returns the right results or, killed ``max_attempts`` times, raises
    WorkerLostError; nearly all succeed, none is wrong, and the pool works afterwards."""
    n, chunksize, rounds = 5000, 25, 3
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), max_attempts=3) as ex:
        for round_ in range(rounds):
            chaos = Chaos(period=0.3, wanted=15, seed=round_)
            chaos.start()
            # One map per chunk: a failed chunk must not hide the outcome of the others.
            one_chunk = {"chunksize": chunksize, "timeout": 300}  # a hang guard
            maps = [
                (start, ex.map(square_slowly, range(start, start + chunksize), **one_chunk))
                for start in range(0, n, chunksize)
            ]
            succeeded = lost = 0
            for start, results in maps:
                try:
                    values = list(results)
                except WorkerLostError:
                    lost += chunksize
                    continue
                assert values == [x * x for x in range(start, start + chunksize)]
                succeeded += chunksize
            chaos.join(timeout=150)  # a hang guard; the kills may outlast the maps
            assert not chaos.is_alive()
            assert chaos.kills == 15, f"round {round_}: only {chaos.kills} workers killed"
            assert succeeded + lost == n
            # A chunk is lost only when each of its 3 attempts was killed.
            assert lost <= chaos.kills // 3 * chunksize, f"round {round_}: {lost} calls lost"
            assert_pool_works(ex, 100)


# -- workers that cannot start -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_workers_that_cannot_start_fail_clearly_and_the_next_submit_tries_again(
    tmp_path: Path,
) -> None:
    """An interpreter that exits at once fails the calls clearly, but the pool does not
    refuse for good: once the interpreter works, the next submit runs."""
    flag = tmp_path / "python-works"
    starts = tmp_path / "starts"
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        f"echo start >> {shlex.quote(str(starts))}\n"
        f"if [ -e {shlex.quote(str(flag))} ]; then exec {shlex.quote(sys.executable)} "
        '"$@"; fi\n'
        "exec /bin/false\n"
    )
    python.chmod(0o755)

    def count_starts() -> int:
        return starts.read_text().count("start\n") if starts.exists() else 0

    backend = LocalBackend(max_workers=1, python=str(python))
    try:
        with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "store")) as ex:
            with pytest.raises(WorkerLostError, match="exit before they are ready"):
                ex.submit(square, 2).result(timeout=60)
            first = count_starts()
            assert first >= 3
            with pytest.raises(WorkerLostError, match="exit before they are ready"):
                ex.submit(square, 3).result(timeout=60)
            assert count_starts() >= first + 3  # the pool tried again, as many times
            flag.touch()
            assert ex.submit(square, 4).result(timeout=60) == 16
            assert list(ex.map(square, range(20), timeout=60)) == [x * x for x in range(20)]
    finally:
        backend.close()
