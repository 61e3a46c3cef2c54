"""The embedded local backend, the backend registry and the watcher's two ways of learning
that a job ended, through real scripts and real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from calls import die_leaving_a_child, getpid, triple
from recorders import ChecksQueries

import batchpool
from batchpool import BatchPoolExecutor, LocalBackend, WorkerLostError
from batchpool.backends import Backend, JobSpec, JobState, available_backends, register_backend
from batchpool.backends.base import JobEvent, Notify

REPO = Path(__file__).resolve().parent.parent


def run_script(folder: Path, source: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = folder / "script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(folder / "cache"))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_functions_and_classes_from_main_and_from_the_users_own_module(tmp_path: Path) -> None:
    (tmp_path / "mymodule.py").write_text("def shout(s):\n    return s.upper() + '!'\n")
    result = run_script(
        tmp_path,
        """
        from batchpool import BatchPoolExecutor
        from mymodule import shout

        class Point:
            def __init__(self, x):
                self.x = x

        def norm(p):
            return abs(p.x)

        # No `if __name__ == "__main__":` guard: workers must not re-run this script.
        with BatchPoolExecutor(max_workers=2) as bpe:
            print(list(bpe.map(norm, [Point(-2), Point(3)])))
            print(bpe.submit(shout, "hello").result())
            print(bpe.submit(lambda: Point(5)).result().x)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[2, 3]", "HELLO!", "5"]


def test_calls_submitted_without_shutdown_finish_at_interpreter_exit(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        import os
        from batchpool import BatchPoolExecutor

        def write(i):
            open(f"done-{i}", "w").close()

        bpe = BatchPoolExecutor(max_workers=2)
        for i in range(20):
            bpe.submit(write, i)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("done-*")) == sorted(f"done-{i}" for i in range(20))


def test_worker_output_is_echoed_and_kept_in_the_run_log(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        from batchpool import BatchPoolExecutor

        def chatty(x):
            print(f"working on {x}")
            return x

        with BatchPoolExecutor(max_workers=1, cleanup_bucket=False) as bpe:
            bpe.submit(chatty, 7).result()
            print("run at", bpe.run_url)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "working on 7" in result.stdout
    run = Path(result.stdout.split("run at ")[1].strip())
    logs = list((run / "logs").iterdir())
    assert len(logs) == 1 and logs[0].read_text() == "working on 7\n"


# -- the watcher without job events -----------------------------------------------------------


class PollOnly(Backend):
    """A real LocalBackend whose job events are withheld: the watcher must poll states."""

    name = "poll-only"
    notifies = False

    def __init__(self, max_workers: int = 2) -> None:
        self.inner = LocalBackend(max_workers)
        self.status_calls = 0

    def max_parallel(self) -> int:
        return self.inner.max_parallel()

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        return self.inner.submit(jobs, None)

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        self.status_calls += 1
        return self.inner.status(job_ids)

    def cancel(self, job_ids: Sequence[str]) -> None:
        self.inner.cancel(job_ids)

    def close(self) -> None:
        self.inner.close()


class QueriesRecorded(ChecksQueries, PollOnly):
    """PollOnly, each of whose status queries is checked (see ``ChecksQueries``)."""


def test_a_backend_without_events_is_polled_with_one_query_for_all_jobs(tmp_path: Path) -> None:
    backend = QueriesRecorded()
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path)) as ex:
        assert list(ex.map(triple, range(200), chunksize=10)) == [3 * i for i in range(200)]
        assert ex.submit(triple, 5).result() == 15
    # One status query per poll for every job in flight, never one per job or per future:
    # each query asked about all of them (however many polls the jobs took to end).
    assert backend.checked > 0 and backend.missed == []
    assert max(len(asked) for asked in backend.queries) > 1  # the map's jobs, together
    backend.close()


def test_a_dead_worker_is_noticed_by_polling_too(tmp_path: Path) -> None:
    backend = PollOnly()
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path), max_attempts=2) as ex:
        future = ex.submit(os._exit, 3)
        with pytest.raises(WorkerLostError, match="2 attempts"):
            future.result(timeout=60)
        assert ex.submit(triple, 1).result() == 3
    backend.close()


# -- the registry and ownership ---------------------------------------------------------------


def test_backend_by_name_and_unknown_names(tmp_path: Path) -> None:
    assert "local" in available_backends()
    with BatchPoolExecutor(backend="local", storage=str(tmp_path)) as ex:
        assert isinstance(ex.backend, LocalBackend)
        assert ex.submit(triple, 2).result() == 6
    with pytest.raises(ValueError, match=r"known: .*local"):
        BatchPoolExecutor(backend="no-such-engine", storage=str(tmp_path))
    with pytest.raises(TypeError, match="backend="):
        BatchPoolExecutor(backend=42, storage=str(tmp_path))  # type: ignore[arg-type]


def test_register_backend(tmp_path: Path) -> None:
    register_backend("poll-only", PollOnly)
    with BatchPoolExecutor(backend="poll-only", storage=str(tmp_path)) as ex:
        assert isinstance(ex.backend, PollOnly)
        assert ex.submit(triple, 3).result() == 9
    with pytest.raises(TypeError):
        register_backend("bad", int)  # type: ignore[arg-type]


def test_a_backend_passed_in_is_never_closed(tmp_path: Path) -> None:
    backend = LocalBackend(max_workers=2)
    try:
        with BatchPoolExecutor(backend=backend, storage=str(tmp_path)) as first:
            pids = set(first.map(getpid, range(20), chunksize=1))
        with BatchPoolExecutor(backend=backend, storage=str(tmp_path)) as second:
            assert second.submit(triple, 4).result() == 12
            pids |= set(second.map(getpid, range(20), chunksize=1))
        assert len(pids) <= 2  # both executors were served by the same two warm processes
    finally:
        backend.close()
    with pytest.raises(batchpool.BackendError, match="closed"):
        backend.submit([JobSpec("x", ())])


def test_the_executor_closes_the_backend_it_made(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as ex:
        backend = ex.backend
        ex.submit(triple, 1).result()
    with pytest.raises(batchpool.BackendError, match="closed"):
        backend.submit([JobSpec("x", ())])


def test_workers_that_cannot_start_fail_the_calls_clearly(tmp_path: Path) -> None:
    backend = LocalBackend(max_workers=1, python=sys.executable + "-does-not-exist")
    with pytest.raises(batchpool.BackendError, match="cannot start a local worker"):
        backend.submit([JobSpec("x", ())])
    backend.close()

    broken = LocalBackend(max_workers=1, python="/bin/false")
    with BatchPoolExecutor(backend=broken, storage=str(tmp_path)) as ex:
        with pytest.raises(WorkerLostError, match="exit before they are ready"):
            ex.submit(triple, 1).result(timeout=60)
        with pytest.raises(WorkerLostError, match="exit before they are ready"):
            ex.submit(triple, 2).result(timeout=60)
    broken.close()


def test_local_backend_status_and_cancel_of_a_queued_job(tmp_path: Path) -> None:
    backend = LocalBackend(max_workers=1)
    try:
        events = []
        jobs = [JobSpec("never-valid", ("--chunk", "nope", "--attempt", "1"))] * 3
        ids = backend.submit(jobs, events.append)
        backend.cancel([ids[2]])
        assert backend.status([ids[2]]) == {ids[2]: JobState.CANCELLED}
        assert backend.status(["local-unknown"]) == {"local-unknown": JobState.LOST}
    finally:
        backend.close()
    states = {e.job_id: e.state for e in events}
    assert states[ids[2]] is JobState.CANCELLED
    assert all(states[i] in (JobState.FAILED, JobState.CANCELLED) for i in ids)


# -- storage costs ----------------------------------------------------------------------------


def test_one_input_and_one_outcome_object_per_chunk(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), cleanup_bucket=False) as ex:
        assert list(ex.map(triple, range(1000), chunksize=20)) == [3 * i for i in range(1000)]
        run = Path(ex.run_url)
    assert len(list((run / "chunks").iterdir())) == 50
    assert len(list((run / "results").iterdir())) == 50
    assert list((run / "logs").iterdir()) == []  # silent calls leave no log objects
    assert not list(run.rglob("*.tmp-*"))


# -- regressions: jobs and workers that must never be lost ------------------------------------


def test_a_job_done_before_its_sender_resumes_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import struct
    import termios

    import batchpool.backends.local as local

    real_send, real_on_done = local._send, local.LocalBackend._on_done
    answers = [0]  # "done" messages the pool's manager thread has read

    def on_done(self, worker, *args, **kwargs):  # type: ignore[no-untyped-def]
        answers[0] += 1
        return real_on_done(self, worker, *args, **kwargs)

    def answered(worker, before: int) -> bool:  # type: ignore[no-untyped-def]
        """The worker wrote its answer: the manager read it, or it waits in the pipe."""
        if answers[0] > before:
            return True
        try:
            unread = fcntl.ioctl(worker.event_pipe, termios.FIONREAD, b"\0" * 4)
        except OSError:  # the pipe is closed: the worker is gone
            return True
        return struct.unpack("i", unread)[0] > 0

    def slow_send(worker, message):  # type: ignore[no-untyped-def]
        before = answers[0]
        ok = real_send(worker, message)
        # The worker answers "done" before this thread carries on: wait for the answer.
        deadline = time.monotonic() + 30
        while ok and "job" in message and not answered(worker, before):
            if time.monotonic() > deadline:
                break  # carry on: the results below still show whether a job was lost
            time.sleep(0.001)
        return ok

    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as ex:
        assert ex.submit(triple, 0).result() == 0  # the worker is ready
        monkeypatch.setattr(local.LocalBackend, "_on_done", on_done)
        monkeypatch.setattr(local, "_send", slow_send)
        assert [ex.submit(triple, i).result(timeout=30) for i in range(5)] == [0, 3, 6, 9, 12]


def test_shutdown_returns_while_a_later_forked_process_holds_the_pipes(tmp_path: Path) -> None:
    import concurrent.futures as cf
    import multiprocessing
    import threading

    ex = BatchPoolExecutor(max_workers=1, storage=str(tmp_path))
    assert ex.submit(triple, 1).result() == 3
    forked = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    try:
        assert forked.submit(triple, 1).result() == 3  # its worker inherited our fds
        closer = threading.Thread(target=ex.shutdown)
        closer.start()
        closer.join(timeout=30)
        assert not closer.is_alive(), "shutdown waited on a process it does not own"
    finally:
        forked.shutdown()


def test_a_worker_death_is_seen_even_if_its_child_keeps_the_pipe_open(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path), max_attempts=1) as ex:
        future = ex.submit(die_leaving_a_child, str(pidfile))
        try:
            with pytest.raises(WorkerLostError, match="code 5"):
                # The child lives until it is killed below: the pipe is no witness.
                future.result(timeout=60)
        finally:
            if pidfile.exists():
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert ex.submit(triple, 2).result() == 6


def test_max_workers_holds_with_a_larger_backend_passed_in(tmp_path: Path) -> None:
    from calls import wait_for
    from conftest import Gate

    gate = Gate(tmp_path / "gates")
    backend = JobsHeld(max_workers=3)
    try:
        with BatchPoolExecutor(backend=backend, max_workers=1, storage=str(tmp_path)) as ex:
            futures = [
                ex.submit(wait_for, gate.path("go"), i, started=gate.path(f"s{i}"))
                for i in range(4)
            ]
            deadline = time.monotonic() + 30
            while not Path(gate.path("s0")).exists():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert sum(Path(gate.path(f"s{i}")).exists() for i in range(4)) == 1
            gate.open("go")
            assert [f.result() for f in futures] == [0, 1, 2, 3]
        # Counted as jobs were handed over, not sampled: never two at once, at any moment.
        assert backend.peak == 1 and backend.handed >= 2
    finally:
        backend.close()


class JobsHeld(LocalBackend):
    """A LocalBackend that counts the jobs it holds (handed over, not yet ended) at once."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers)
        self._count_lock = threading.Lock()
        self.held = self.peak = self.handed = 0

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        def counted(event: JobEvent) -> None:
            if event.state.is_final:
                with self._count_lock:
                    self.held -= 1
            if notify is not None:
                notify(event)

        with self._count_lock:  # before the jobs may end
            self.held += len(jobs)
            self.handed += len(jobs)
            self.peak = max(self.peak, self.held)
        return super().submit(jobs, counted)


def test_the_poll_ceiling_is_settable(tmp_path: Path) -> None:
    backend = PollOnly()
    try:
        with BatchPoolExecutor(
            backend=backend, storage=str(tmp_path), max_poll_interval=0.05
        ) as ex:
            assert ex._watcher._poll_ceiling == 0.05
            assert list(ex.map(triple, range(30), chunksize=3)) == [3 * i for i in range(30)]
    finally:
        backend.close()
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="max_poll_interval"):
            BatchPoolExecutor(storage=str(tmp_path), max_poll_interval=bad)


def print_and_return(x: int) -> int:
    print(f"working on {x}")
    return x


def die_once_then_print(marker: str) -> str:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    print("second attempt")
    return "ok"


def test_future_logs_and_job(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path / "runs")) as ex:
        future = ex.submit(print_and_return, 7)
        assert future.result() == 7
        assert future.logs() == "working on 7\n"
        assert future.job is not None and future.job.attempt == 1
        assert len(future.job.job_ids) == 1
        retried = ex.submit(die_once_then_print, str(tmp_path / "marker"))
        assert retried.result() == "ok"
        assert retried.job is not None and retried.job.attempt == 2
        assert len(retried.job.job_ids) == 2
        # The attempt that died saved no output of its own: the client kept why it died.
        assert retried.logs() == (
            "--- attempt 1 ---\n"
            "batchpool: the job ended without a result: its worker process exited with code 3\n"
            "--- attempt 2 ---\nsecond attempt\n"
        )
        silent = ex.submit(triple, 1)
        assert silent.result() == 3 and silent.logs() == ""
    assert future.logs() == ""  # cleanup_bucket deleted the run, logs and all
