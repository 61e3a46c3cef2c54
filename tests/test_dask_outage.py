"""The Dask backend rides out an outage of the engine itself: the scheduler restarted
on the same port in the middle of a map, or the client's connection to it cut.

A real ``distributed`` scheduler and worker run as separate processes (``dask
scheduler`` / ``dask worker``), so that the scheduler can be killed and started again.
Each call appends a line to its own mark file, so the tests count how often a call ran;
nothing here asserts a wall-clock time.

What happens (distributed 2026.8): the client cancels every future it holds (reason
``scheduler-connection-lost``) and reconnects to the address within its timeout; a
``dask worker`` whose scheduler goes away finishes the task it runs, then exits
(nanny and all: something must start workers again, as the test does); a task that
waited in that worker for the job before it is not started. The backend hands each
job the client lost to the scheduler again (the same attempt): its task finds the
outcome the first run wrote, or waits for that run, or runs a job that never began.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from outages import attempts, count, map_in_thread, marks, wait_until
from services import HOST, _die_with_parent, _prctl, free_port

# test_dask's guard: distributed missing skips these tests too, or fails them with CI set.
from test_dask import DaskBackend, distributed

from batchpool import BatchPoolExecutor
from batchpool.errors import BackendError
from batchpool.processes import process_started

pytestmark = pytest.mark.dask

#: Bounded waits for the cluster's processes (they are not what the tests measure).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
#: How long each call runs: long enough to be caught running by the outage.
CALL_SECONDS = 3.0
CALLS = 6


class DaskProcesses:
    """A scheduler on a fixed port and its workers, each a process of its own, each
    stopped by its pid (SIGTERM, then SIGKILL of the process group it leads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.address = f"tcp://{HOST}:{self.port}"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.started: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.folder / f"{name}-{len(self.started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,  # its own group: the nanny's worker goes with it
                preexec_fn=_die_with_parent if _prctl is not None else None,
            )
        self.started.append(process)
        return process

    def start_scheduler(self) -> None:
        cli = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
        self.scheduler = self._spawn(
            "scheduler",
            [*cli, "--host", HOST, "--port", str(self.port), "--dashboard-address", ":0"],
        )

    def start_worker(self, threads: int = 2) -> subprocess.Popen[bytes]:
        cli = [sys.executable, "-m", "distributed.cli.dask_worker", self.address]
        opts = ["--nworkers", "1", "--nthreads", str(threads), "--no-dashboard"]
        worker = self._spawn("worker", [*cli, *opts])
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """SIGKILL a ``dask worker``, its nanny's worker process with it (its group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(STOP_TIMEOUT)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.kill()  # SIGKILL: no goodbye to the client or the workers
        self.scheduler.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        for process in reversed(self.started):
            if process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_TIMEOUT)

    def worker_log(self, worker: subprocess.Popen[bytes]) -> str:
        index = self.started.index(worker)
        [path] = self.folder.glob(f"worker-{index}.log")
        return path.read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
            for p in sorted(self.folder.glob("*.log"))
        )


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[DaskProcesses]:
    folder = tmp_path / "dask"
    folder.mkdir()
    processes = DaskProcesses(folder)
    try:
        yield processes
    finally:
        processes.stop()


def mid_map(folder: Path, storage: Path) -> set[int]:
    """Wait until a call returned with its outcome in storage and another one runs;
    the calls that returned by then."""

    def ready() -> bool:
        lines = marks(folder)
        ended = {x for x, got in lines.items() if any(g.startswith("end") for g in got)}
        return bool(ended) and len(lines) > len(ended) and any(storage.glob("*/results/*.out"))

    wait_until("a call returned and another one runs", ready, START_TIMEOUT)
    return {x for x, got in marks(folder).items() if any(g.startswith("end") for g in got)}


def worker_pids(client: Any) -> set[int]:
    return set(client.run(os.getpid).values())


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie that nobody reaped has ended)."""
    return process_started(pid) is not None


def wait_gone(worker: subprocess.Popen[bytes], pid: int) -> None:
    """The old ``dask worker`` (``worker``, its nanny) finished its job and exited with
    its scheduler, and its worker process ``pid`` is gone: no orphan runs on."""
    wait_until("the old worker exited", lambda: worker.poll() is not None)
    wait_until("the old worker process ended", lambda: not alive(pid))


@contextlib.contextmanager
def executor(backend: DaskBackend, storage: Path) -> Iterator[BatchPoolExecutor]:
    """An executor that waits for its calls when the block ends well, and does not
    when it raised (a failed check must not wait on jobs the outage left behind)."""
    ex = BatchPoolExecutor(
        backend=backend, storage=str(storage), cleanup_bucket=False, engine_outage_grace=120
    )
    try:
        yield ex
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def started_cluster(procs: DaskProcesses, timeout: float = START_TIMEOUT) -> Any:
    """A scheduler, a worker, and a client whose ``timeout`` is also how long it tries
    to reconnect when it loses the scheduler."""
    procs.start_scheduler()
    procs.start_worker()
    wait_until("the scheduler listens", lambda: accepts(procs.port))
    client = distributed.Client(procs.address, set_as_default=False, timeout=timeout)
    client.wait_for_workers(1, timeout=START_TIMEOUT)
    return client


@pytest.mark.timeout(300)
def test_scheduler_restarted_mid_map(dask_processes: DaskProcesses, tmp_path: Path) -> None:
    procs = dask_processes
    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()
    client = started_cluster(procs)
    try:
        [old_pid] = worker_pids(client)
        old_worker = procs.workers[0]
        storage = tmp_path / "store"
        with executor(DaskBackend(client), storage) as ex:
            thread, out = map_in_thread(ex, marks_dir, CALLS, CALL_SECONDS)
            done_before = mid_map(marks_dir, storage)
            (marks_dir / "hold").touch()  # the running call ends when the test says
            running = set(count(marks_dir)) - done_before
            procs.kill_scheduler()
            procs.start_scheduler()  # the same port
            # What a supervisor of the workers does, while the old one runs its job.
            # One thread: it takes the tasks in the order they were handed over again.
            new_worker = procs.start_worker(threads=1)
            waiting = f"still runs in process {old_pid} of this machine"
            wait_until(
                "the job handed over again waits for the old worker's run",
                lambda: waiting in procs.worker_log(new_worker),
            )
            (marks_dir / "hold").unlink()
            thread.join(240)
            assert not thread.is_alive(), "the map still waits\n" + procs.logs()
            assert "error" not in out, f"{out.get('error')!r}\n{procs.logs()}"
            assert out["results"] == [x * 10 for x in range(CALLS)]
            assert client.status == "running"  # it reconnected to the new scheduler
        counts = count(marks_dir)
        assert done_before and all(counts[x] == 1 for x in done_before), counts
        # None ran twice: the call that ran through the outage wrote its outcome, which
        # its task, handed over again, found after waiting for the old worker's job.
        assert counts == dict.fromkeys(range(CALLS), 1), counts
        [ran_through] = running
        assert all(line.endswith(f" {old_pid}") for line in marks(marks_dir)[ran_through])
        assert "already has its result" in procs.worker_log(new_worker)
        # A task that waited in the old worker for the job before it was not started.
        assert "is not started: its Dask worker is closing" in procs.worker_log(old_worker)
        # Every result came from attempt 1: the outage cost no attempt.
        assert attempts(storage.glob("*/results/*.out"), "results") == [1] * CALLS
        # The old worker finished its job and exited with its scheduler: no orphan runs.
        wait_gone(old_worker, old_pid)
    finally:
        client.close()


@pytest.mark.timeout(300)
def test_scheduler_and_the_running_worker_die_mid_map(
    dask_processes: DaskProcesses, tmp_path: Path
) -> None:
    """The machine of the worker goes down with the scheduler: the call it ran is lost,
    and run again once, as a new attempt; every other call runs once."""
    procs = dask_processes
    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()
    client = started_cluster(procs)
    try:
        [old_pid] = worker_pids(client)
        storage = tmp_path / "store"
        with executor(DaskBackend(client), storage) as ex:
            thread, out = map_in_thread(ex, marks_dir, CALLS, CALL_SECONDS)
            done_before = mid_map(marks_dir, storage)
            [cut] = set(count(marks_dir)) - done_before
            procs.kill_scheduler()
            procs.kill_worker(procs.workers[0])
            assert not alive(old_pid)
            procs.start_scheduler()
            procs.start_worker()
            thread.join(240)
            assert not thread.is_alive(), "the map still waits\n" + procs.logs()
            assert "error" not in out, f"{out.get('error')!r}\n{procs.logs()}"
            assert out["results"] == [x * 10 for x in range(CALLS)]
        counts = count(marks_dir)
        assert counts == {x: 2 if x == cut else 1 for x in range(CALLS)}, counts
        found = attempts(storage.glob("*/results/*.out"), "results")
        assert found == [1] * (CALLS - 1) + [2], found
    finally:
        client.close()


@pytest.mark.timeout(300)
def test_client_connection_cut_mid_map(dask_processes: DaskProcesses, tmp_path: Path) -> None:
    procs = dask_processes
    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()
    client = started_cluster(procs)
    try:
        storage = tmp_path / "store"
        with executor(DaskBackend(client), storage) as ex:
            thread, out = map_in_thread(ex, marks_dir, CALLS, CALL_SECONDS)
            done_before = mid_map(marks_dir, storage)
            # Cut the client's connection; the scheduler and its worker go on.
            client.loop.add_callback(client.scheduler_comm.comm.abort)
            thread.join(240)
            assert not thread.is_alive(), "the map still waits\n" + procs.logs()
            assert "error" not in out, f"{out.get('error')!r}\n{procs.logs()}"
            assert out["results"] == [x * 10 for x in range(CALLS)]
            assert client.status == "running"
        counts = count(marks_dir)
        assert done_before and all(counts[x] == 1 for x in done_before), counts
        assert counts == dict.fromkeys(range(CALLS), 1), counts
        assert attempts(storage.glob("*/results/*.out"), "results") == [1] * CALLS
        worker = procs.workers[0]
        assert worker.poll() is None  # the scheduler kept its worker
        log = procs.worker_log(worker)
        # The call that ran as the connection broke went on (its task released by the
        # scheduler), and its task handed over again found its outcome.
        assert "already has its result, written by an earlier run of its task" in log
        assert "is not started: the scheduler released the task" in log
    finally:
        client.close()


@pytest.mark.timeout(300)
def test_scheduler_away_longer_than_the_clients_timeout(
    dask_processes: DaskProcesses, tmp_path: Path
) -> None:
    procs = dask_processes
    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()
    client = started_cluster(procs, timeout=3)  # it gives up reconnecting after 3 s
    try:
        [old_pid] = worker_pids(client)
        old_worker = procs.workers[0]
        storage = tmp_path / "store"
        backend = DaskBackend(client)
        with executor(backend, storage) as ex:
            thread, out = map_in_thread(ex, marks_dir, CALLS, CALL_SECONDS)
            done_before = mid_map(marks_dir, storage)
            procs.kill_scheduler()
            # The client tries to reconnect for its timeout, then closes itself.
            wait_until("the client closed itself", lambda: client.status == "closed")
            # While no scheduler answers, the backend cannot tell the jobs' states: the
            # executor is told so (transient), and keeps asking, reading the store.
            with pytest.raises(BackendError) as info:
                backend.status([])
            assert info.value.transient, info.value
            procs.start_scheduler()
            procs.start_worker()
            thread.join(240)
            assert not thread.is_alive(), "the map still waits\n" + procs.logs()
            assert "error" not in out, f"{out.get('error')!r}\n{procs.logs()}"
            assert out["results"] == [x * 10 for x in range(CALLS)]
            # The backend made a client of its own to the scheduler's address.
            assert backend.client is not client and backend.client.status == "running"
        made = backend.client
        backend.close()  # a backend passed in is closed by its owner
        assert made.status == "closed"  # with the client it made
        counts = count(marks_dir)
        assert done_before and all(counts[x] == 1 for x in done_before), counts
        assert counts == dict.fromkeys(range(CALLS), 1), counts
        assert attempts(storage.glob("*/results/*.out"), "results") == [1] * CALLS
        wait_gone(old_worker, old_pid)
    finally:
        client.close()
