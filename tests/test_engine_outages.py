"""An engine that cannot be asked: status queries that fail or hang, submissions refused.

The engine here is a real LocalBackend behind a wrapper that injects the faults of a
scheduler that is down (``ConnectionError`` from ``status`` and ``submit``) or slow (a
``status`` that blocks until the test lets it go); the jobs themselves run for real.
Every test waits on states and counts (runs per call from mark files, attempts, the
commands the wrapper refused), never on how long something took: the outage lasts
until the wrapper has refused a number of commands.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from outages import count, mark_and_sleep, wait_until

import batchpool.outage as outage
from batchpool import BatchPoolExecutor, WorkerLostError
from batchpool.backends import Backend, JobSpec, JobState, LocalBackend
from batchpool.backends.base import Notify
from batchpool.errors import BackendError
from batchpool.outage import EngineOutage, is_unreachable

#: The old rule gave up on every job in flight after this many failed queries in a row.
OLD_RULE_FAILURES = 10


def submit_held(ex: BatchPoolExecutor, marks: Path, x: int) -> cf.Future[int]:
    """A call that runs until ``marks/hold`` is removed; returned once it has started."""
    (marks / "hold").touch()
    future = ex.submit(mark_and_sleep, x, str(marks), 0)
    wait_until(f"call {x} started", lambda: x in count(marks))
    return future


class Flaky(Backend):
    """A real LocalBackend whose scheduler can be "down": while ``down`` is set, status
    queries and submissions raise what a client of an unreachable scheduler raises.
    ``hang`` makes status block until ``released`` is set; ``cancel_works`` and
    ``submit_works`` keep those commands answering while status fails. Job events are
    withheld, so the watcher learns of ends as it does from a cluster: by asking."""

    name = "flaky"
    notifies = False
    job_ids_outlive_client = True

    def __init__(
        self, max_workers: int = 2, *, cancel_works: bool = True, submit_works: bool = False
    ) -> None:
        self.inner = LocalBackend(max_workers)
        self.down = threading.Event()
        self.submit_down = threading.Event()  # submissions alone are refused
        self.hang = threading.Event()
        self.released = threading.Event()
        self.cancel_works = cancel_works
        self.submit_works = submit_works
        self._lock = threading.Lock()
        self.refused = {"status": 0, "submit": 0, "cancel": 0}
        self.answered = {"status": 0, "submit": 0, "cancel": 0}
        self.cancelled: list[str] = []
        self.changed = threading.Condition(self._lock)

    def __repr__(self) -> str:
        return "Flaky()"

    def _count(self, what: str, refused: bool) -> None:
        with self.changed:
            (self.refused if refused else self.answered)[what] += 1
            self.changed.notify_all()

    def wait_until(self, predicate: object, timeout: float = 120) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), (self.refused, self.answered)  # type: ignore[arg-type]

    def max_parallel(self) -> int:
        return self.inner.max_parallel()

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        if (self.down.is_set() and not self.submit_works) or self.submit_down.is_set():
            self._count("submit", True)
            raise BackendError("Unable to contact the scheduler", transient=True)
        self._count("submit", False)
        return self.inner.submit(jobs, None)

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        if self.hang.is_set():
            self._count("status", True)
            self.released.wait(300)
        if self.down.is_set():
            self._count("status", True)
            raise ConnectionError("Unable to contact the scheduler")
        self._count("status", False)
        return self.inner.status(job_ids)

    def cancel(self, job_ids: Sequence[str]) -> None:
        if self.down.is_set() and not self.cancel_works:
            self._count("cancel", True)
            raise ConnectionError("Unable to contact the scheduler")
        self._count("cancel", False)
        self.cancelled.extend(job_ids)
        self.inner.cancel(job_ids)

    def close(self) -> None:
        self.released.set()
        self.inner.close()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Retry an unreachable engine every 0.1 s: the tests count refused commands, and
    counting a dozen of them should not take minutes of backoff."""
    monkeypatch.setattr(outage, "RETRY_MAX", 0.1)
    yield


def test_a_scheduler_down_longer_than_the_old_rule_costs_no_run_and_no_result(
    tmp_path: Path, quick_retries: None
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "hold").touch()  # the calls run until it is removed
    backend = Flaky(max_workers=2)
    items = list(range(8))
    try:
        with BatchPoolExecutor(
            backend=backend, storage=str(tmp_path / "store"), max_workers=2, max_attempts=3
        ) as ex:
            futures = [ex.submit(mark_and_sleep, x, str(marks), 0) for x in items]
            # Two jobs run (max_workers=2); two more wait in the pool's queue (a backend
            # with a queue gets twice its slots), two wait to be handed over.
            wait_until("two calls run", lambda: len(count(marks)) >= 2)
            backend.down.set()
            # Down for longer than the old rule allowed: more failed queries than it took.
            backend.wait_until(lambda: backend.refused["status"] > OLD_RULE_FAILURES)
            (marks / "hold").unlink()  # the running calls finish while it is down...
            for future in futures[:2]:  # ...and their results come from the store
                assert future.result(timeout=120) in (0, 10)
            # Their slots are free: the next jobs are tried, and refused.
            backend.wait_until(lambda: backend.refused["submit"] >= 1)
            backend.down.clear()
            assert [f.result(timeout=120) for f in futures] == [10 * x for x in items]
            assert all(f.job is not None and f.job.attempt == 1 for f in futures)
    finally:
        backend.close()
    assert count(marks) == dict.fromkeys(items, 1)  # every call ran once
    assert backend.cancelled == []  # no job was given up on


def test_a_hung_status_query_stalls_neither_results_nor_dispatch(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    backend = Flaky(max_workers=2)
    backend.hang.set()  # every status query blocks until the test ends
    items = list(range(6))
    try:
        with BatchPoolExecutor(
            backend=backend, storage=str(tmp_path / "store"), max_workers=2
        ) as ex:
            futures = [ex.submit(mark_and_sleep, x, str(marks), 0) for x in items]
            # Six jobs through two slots, each found ended in the store: no query answered.
            assert [f.result(timeout=120) for f in futures] == [10 * x for x in items]
            assert backend.answered["status"] == 0
            assert backend.refused["status"] == 1  # one query, still hung: no pile-up
            backend.released.set()
    finally:
        backend.close()
    assert count(marks) == dict.fromkeys(items, 1)


def test_jobs_of_an_engine_unreachable_past_its_grace_are_cancelled_then_run_again(
    tmp_path: Path, quick_retries: None
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    backend = Flaky(max_workers=1, submit_works=True)  # only its status queries fail
    try:
        with BatchPoolExecutor(
            backend=backend,
            storage=str(tmp_path / "store"),
            max_attempts=2,
            engine_outage_grace=0.5,
        ) as ex:
            stuck = submit_held(ex, marks, 1)
            backend.down.set()  # and the job never ends
            with pytest.raises(WorkerLostError) as info:
                stuck.result(timeout=120)
    finally:
        backend.close()
    text = str(info.value)
    assert "got no result after 2 attempts" in text
    assert text.count("the engine could not be asked for") == 2
    assert "engine_outage_grace=0.5" in text
    assert text.count("cancelled through the engine before a new attempt") == 2
    assert len(backend.cancelled) == 2  # each attempt was cancelled before the next
    assert count(marks) == {1: 2}


def test_a_job_that_cannot_be_cancelled_is_not_run_again(
    tmp_path: Path, quick_retries: None
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    backend = Flaky(max_workers=1, cancel_works=False)
    try:
        with BatchPoolExecutor(
            backend=backend,
            storage=str(tmp_path / "store"),
            max_attempts=3,
            engine_outage_grace=0.5,
        ) as ex:
            stuck = submit_held(ex, marks, 1)
            backend.down.set()
            with pytest.raises(WorkerLostError) as info:
                stuck.result(timeout=120)
            assert stuck.job is not None and stuck.job.attempt == 1
    finally:
        (marks / "hold").unlink()
        backend.close()
    text = str(info.value)
    assert "could not be cancelled (ConnectionError: Unable to contact the scheduler)" in text
    assert "not run again, so that two attempts never run at once" in text
    assert backend.refused["cancel"] == 1
    assert count(marks) == {1: 1}


def test_a_submission_refused_past_the_grace_fails_its_calls_naming_the_outage(
    tmp_path: Path, quick_retries: None
) -> None:
    backend = Flaky(max_workers=1)
    backend.down.set()
    try:
        with BatchPoolExecutor(
            backend=backend, storage=str(tmp_path / "store"), engine_outage_grace=0.3
        ) as ex:
            future = ex.submit(pow, 2, 3)
            with pytest.raises(Exception, match="could not start the job") as info:
                future.result(timeout=120)
    finally:
        backend.close()
    assert "the engine could not be asked for" in str(info.value)
    assert backend.refused["submit"] >= 2  # tried again within the grace


def test_submissions_refused_while_status_answers_still_end_after_the_grace(
    tmp_path: Path, quick_retries: None
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    backend = Flaky(max_workers=2)
    try:
        with BatchPoolExecutor(
            backend=backend,
            storage=str(tmp_path / "store"),
            engine_outage_grace=0.5,
            max_poll_interval=0.05,  # status answers often while the submission is refused
        ) as ex:
            running = submit_held(ex, marks, 1)
            backend.wait_until(lambda: backend.answered["status"] >= 1)
            backend.submit_down.set()
            refused = ex.submit(pow, 2, 3)
            # Status queries answer all along (the job runs): that must not restart the
            # submission's grace, or the call would wait forever.
            with pytest.raises(Exception, match="could not start the job"):
                refused.result(timeout=120)
            (marks / "hold").unlink()
            assert running.result(timeout=120) == 10
    finally:
        backend.close()
    assert backend.refused["submit"] >= 2


def test_a_submission_the_engine_refuses_fails_at_once(tmp_path: Path) -> None:
    class Refuses(Flaky):
        def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
            self._count("submit", True)
            raise BackendError("sbatch: error: invalid partition specified: nope")

    backend = Refuses()
    try:
        with (
            BatchPoolExecutor(backend=backend, storage=str(tmp_path / "store")) as ex,
            pytest.raises(Exception, match="invalid partition"),
        ):
            ex.submit(pow, 2, 3).result(timeout=120)
    finally:
        backend.close()
    assert backend.refused["submit"] == 1  # not retried: it would be refused again


def test_what_counts_as_an_unreachable_engine() -> None:
    import subprocess

    assert is_unreachable(ConnectionRefusedError())
    assert is_unreachable(TimeoutError())
    assert is_unreachable(subprocess.TimeoutExpired(["squeue"], 1))
    assert is_unreachable(BackendError("down", transient=True))
    assert not is_unreachable(BackendError("invalid partition"))
    assert not is_unreachable(ValueError("bad"))


def test_the_outage_clock() -> None:
    clock = EngineOutage(grace=1000)
    assert not clock.active and not clock.expired() and not clock.held()
    clock.failed("status", ConnectionError("refused"), since=time.monotonic() - 2000)
    assert clock.active and clock.expired() and clock.held()
    assert "status: ConnectionError: refused" in clock.describe()
    clock.answered()
    assert not clock.active and clock.failures == 0


@pytest.mark.parametrize("bad", [0, -1, "600", True, float("nan")])
def test_engine_outage_grace_is_checked(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="engine_outage_grace"):
        BatchPoolExecutor(storage=str(tmp_path), engine_outage_grace=bad)  # type: ignore[arg-type]


def test_an_aws_batch_endpoint_that_does_not_answer_is_an_unreachable_engine() -> None:
    """botocore, for real, against a port nothing listens on."""
    import socket
    import uuid

    pytest.importorskip("boto3")
    from botocore.config import Config

    from batchpool.backends.aws_batch import AWSBatchBackend

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quick = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2)
    backend = AWSBatchBackend(
        "queue", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", client_config=quick
    )
    with pytest.raises(BackendError) as info:
        backend.status([str(uuid.uuid4())])
    assert info.value.transient, info.value
    assert "Could not connect" in str(info.value)
    backend.close()
