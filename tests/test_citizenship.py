"""Good citizenship on a shared cluster: a canary first, a failure budget, the culprit of a
chunk isolated. Each through the public API, on the local pool and on Slurm."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_slurm import Recording, slurm  # noqa: F401  (the session fixture that starts Slurm)

from batchpool import BatchPoolExecutor, FailureBudgetExceeded, WorkerLostError
from batchpool.culprits import most_runs
from batchpool.runs import open_run, read_run
from batchpool.store import Store

# -- what the calls do -------------------------------------------------------------------------


def buggy(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x * 2


def dies_at(x: int, culprit: int, runs_dir: str) -> int:
    """Note each run of ``x``; the culprit kills its own worker, as a segfault does."""
    with open(Path(runs_dir, str(x)), "a") as f:
        f.write("ran\n")
    if x == culprit:
        os.kill(os.getpid(), signal.SIGSEGV)
    return x * 2


def odd_fails(x: int, seconds: float, runs_dir: str) -> int:
    Path(runs_dir, str(x)).touch()
    time.sleep(seconds)
    if x % 2:
        raise KeyError(f"odd {x}")
    return x


def map_past_the_culprit(bpe: BatchPoolExecutor, runs_dir: Path, tmp: Path) -> list[Any]:
    """The 20 values of a map of one chunk whose call 7 kills its worker, its error in
    its place. The map's iterator ends at the error, as the stdlib's does: the calls
    after it come from a second map, whose runs are noted apart (not in ``runs_dir``)."""
    values: list[Any] = []
    try:
        for value in bpe.map(
            dies_at, range(20), [7] * 20, [str(runs_dir)] * 20, chunksize=20, timeout=240
        ):
            values.append(value)
    except WorkerLostError as exc:
        values.append(exc)
    again = tmp / "again"
    again.mkdir()
    rest = range(len(values), 20)
    values += bpe.map(dies_at, rest, [7] * len(rest), [str(again)] * len(rest), timeout=240)
    return values


def chunks_written(bpe: BatchPoolExecutor) -> int:
    store: Store = bpe._store
    return len(store.list("chunks"))


def runs_per_call(runs_dir: Path) -> dict[int, int]:
    return {int(p.name): len(p.read_text().splitlines()) for p in runs_dir.iterdir()}


class Counted:
    """An input that counts the items taken from it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.taken = 0

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            self.taken += 1
            yield i


@pytest.fixture
def bpe(tmp_path: Path) -> Iterator[BatchPoolExecutor]:
    with BatchPoolExecutor(
        max_workers=2, storage=str(tmp_path / "runs"), cleanup_bucket=False
    ) as executor:
        yield executor


# -- a small batch first -----------------------------------------------------------------------


def test_a_failing_canary_raises_from_map_and_submits_nothing_else(bpe: BatchPoolExecutor) -> None:
    with pytest.raises(ValueError, match="bad item 3") as info:
        bpe.map(buggy, range(100_000), canary=10)
    assert "canary" in "".join(getattr(info.value, "__notes__", []))
    assert chunks_written(bpe) == 2  # the 10 canary calls, spread over the 2 workers
    assert sum(bpe.status().values()) == 10


def test_a_failing_canary_reads_no_more_of_a_lazy_input(bpe: BatchPoolExecutor) -> None:
    items = Counted(10_000)
    with pytest.raises(ValueError, match="bad item 3"):
        bpe.map(buggy, items, canary=5, buffersize=4)
    assert items.taken == 5


def test_a_canary_whose_job_dies_raises_worker_lost(tmp_path: Path) -> None:
    runs = tmp_path / "ran"
    runs.mkdir()
    with (
        BatchPoolExecutor(max_workers=2, storage=str(tmp_path), max_attempts=1) as bpe,
        pytest.raises(WorkerLostError, match="SIGSEGV"),
    ):
        bpe.map(dies_at, range(1000), [1] * 1000, [str(runs)] * 1000, canary=4)
    assert set(runs_per_call(runs)) == {0, 1, 2, 3}


def test_a_passing_canary_then_the_whole_map_runs(bpe: BatchPoolExecutor) -> None:
    items = range(4, 1004)
    assert list(bpe.map(buggy, items, canary=6, chunksize=100)) == [2 * x for x in items]
    # the canary's 2 chunks of 3, then the other 994 calls in chunks of 100
    assert chunks_written(bpe) == 2 + 10
    assert list(bpe.map(buggy, range(4, 10), canary=6, buffersize=1)) == [8, 10, 12, 14, 16, 18]


def test_the_executor_wide_canary_and_async_map(tmp_path: Path) -> None:
    async def run(bpe: BatchPoolExecutor) -> list[int]:
        with pytest.raises(ValueError, match="bad item 3"):
            await bpe.async_map(buggy, [range(100)])
        return [r async for r in await bpe.async_map(buggy, [range(4, 40)], canary=0)]

    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), canary=5) as bpe:
        assert asyncio.run(run(bpe)) == [2 * x for x in range(4, 40)]
        assert bpe.status() == {"Success": 4 + 36, "Failed": 1}


def test_a_canary_through_a_replaced_submit(bpe: BatchPoolExecutor) -> None:
    seen = []

    def watching(fn: Any, *args: Any) -> cf.Future[Any]:
        seen.append(args)
        return BatchPoolExecutor.submit(bpe, fn, *args)

    bpe.submit = watching  # type: ignore[method-assign]  # as tqdm.contrib.concurrent does
    with pytest.raises(ValueError, match="bad item 3"):
        bpe.map(buggy, range(1000), canary=4)
    assert len(seen) == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"canary": -1}, "canary=-1 must be a number of calls >= 0"),
        ({"max_failures": -2}, "max_failures=-2 must be >= 0"),
        ({"max_failures": 1.5}, "must be between 0 and 1"),
        ({"max_failures": "3"}, "max_failures must be a count"),
    ],
)
def test_bad_canary_and_budget_are_named(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        BatchPoolExecutor(storage=str(tmp_path), **options)
    with (
        BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as bpe,
        pytest.raises((TypeError, ValueError), match=message),
    ):
        bpe.map(buggy, [1], **options)


# -- stop on a failure budget ------------------------------------------------------------------


def test_the_executor_stops_once_its_failure_budget_is_spent(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    ran.mkdir()
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), max_failures=2) as bpe:
        futures = [bpe.submit(odd_fails, x, 0.2, str(ran)) for x in range(40)]
        cf.wait(futures, timeout=60)
        assert all(f.done() for f in futures)
        errors = collections.Counter(type(f.exception()).__name__ for f in futures)
        stopped = [f.exception() for f in futures if errors and f.exception() is not None]
        budget = [e for e in stopped if isinstance(e, FailureBudgetExceeded)]
        assert budget, errors
        text = str(budget[0])
        assert "max_failures=2 of the executor was exceeded: 3 of the" in text
        assert "The first failures: KeyError: 'odd 1'" in text
        assert errors["KeyError"] >= 3
        assert len(list(ran.iterdir())) < 40  # what was stopped never ran
        assert bpe.status()["Cancelled"] == len(budget)
        with pytest.raises(FailureBudgetExceeded, match="max_failures=2"):
            bpe.submit(odd_fails, 0, 0, str(ran))


def test_a_map_budget_stops_that_map_only(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    ran.mkdir()
    n = 30
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path)) as bpe:
        it = bpe.map(odd_fails, range(n), [0.2] * n, [str(ran)] * n, chunksize=1, max_failures=0.25)
        # Not iterated: the budget (judged once 1 / 0.25 = 4 calls ended) stops the map.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = bpe.status()
            if not {"Pending", "Ready", "Running"} & counts.keys():
                break
            time.sleep(0.1)
        assert counts["Cancelled"] > 0 and counts["Failed"] >= 2, counts
        assert len(list(ran.iterdir())) < n
        assert bpe.submit(odd_fails, 2, 0, str(ran)).result(timeout=30) == 2  # it goes on
        assert next(it) == 0
        with pytest.raises(KeyError, match="odd 1"):  # in order: the first call that raised
            next(it)


# -- the culprit of a shared chunk -------------------------------------------------------------


def test_one_segfault_among_20_fails_only_that_call(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    ran.mkdir()
    storage = str(tmp_path / "runs")
    with BatchPoolExecutor(max_workers=2, storage=storage, cleanup_bucket=False) as bpe:
        futures = [bpe.submit(dies_at, 100, 0, str(ran))]  # not in the map's chunk
        values = map_past_the_culprit(bpe, ran, tmp_path)
        run_url = bpe.run_url
    lost = [v for v in values if isinstance(v, WorkerLostError)]
    assert [v for v in values if not isinstance(v, WorkerLostError)] == [
        2 * x for x in range(20) if x != 7
    ]
    assert len(lost) == 1 and values[7] is lost[0]
    assert "1 call to dies_at() killed its worker" in str(lost[0])
    assert "SIGSEGV" in str(lost[0])
    assert futures[0].result() == 200
    runs = runs_per_call(ran)
    assert set(runs) == {*range(20), 100}  # each call of the chunk ran in its pieces
    assert max(runs.values()) <= most_runs(3, 20) == 6
    assert runs[7] == 5  # in 20, 10, 5 and 3 calls, then alone (max_attempts=3 reached)
    view = read_run(open_run(run_url))
    assert view.call_counts() == {"Success": 1 + 19 + 12, "Error": 1}
    assert sum(1 for job in view.jobs if job.split_into) == 4
    again = BatchPoolExecutor.attach(storage, run_url.rsplit("/", 1)[-1], max_workers=1)
    with again:
        outcomes = [f.exception() or f.result() for f in again.futures]
    assert len(outcomes) == 1 + 20 + 12
    assert [type(o).__name__ for o in outcomes].count("WorkerLostError") == 1


# -- on Slurm ----------------------------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_canary_budget_and_culprit(slurm: str, tmp_path: Path) -> None:  # noqa: F811
    backend = Recording(log_dir=tmp_path / "slurm-logs")
    cancelled: list[str] = []
    real_cancel = backend.cancel

    def cancel(job_ids: Any) -> None:
        cancelled.extend(job_ids)
        real_cancel(job_ids)

    backend.cancel = cancel  # type: ignore[method-assign]
    ran = tmp_path / "ran"
    ran.mkdir()
    storage = str(tmp_path / "runs")
    with BatchPoolExecutor(backend=backend, storage=storage, cleanup_bucket=False) as bpe:
        # A canary that fails: its jobs only.
        with pytest.raises(ValueError, match="bad item 3"):
            bpe.map(buggy, range(10_000), canary=4)
        # spread over the cluster: 4 one-call jobs, in one array
        assert len(backend.ids) == 4 and chunks_written(bpe) == 4
        assert len({job.split("_")[0] for job in backend.ids}) == 1
        # A canary that passes: the whole map runs.
        assert list(bpe.map(buggy, range(4, 104), canary=4, chunksize=25)) == [
            2 * x for x in range(4, 104)
        ]
        # One segfault among 20 calls of a chunk.
        values = map_past_the_culprit(bpe, ran, tmp_path)
        assert [type(v).__name__ for v in values].count("WorkerLostError") == 1
        assert isinstance(values[7], WorkerLostError)
        assert max(runs_per_call(ran).values()) <= most_runs(3, 20)
    # The failure budget: 8 CPUs a job on the 16 of the node, so 2 run and the rest queue.
    with BatchPoolExecutor(backend=backend, storage=storage, cpus_per_job=8, max_failures=1) as bpe:
        futures = [bpe.submit(odd_fails, x, 1.0, str(ran)) for x in range(1, 13, 2)]
        cf.wait(futures, timeout=120)
        errors = [f.exception() for f in futures]
    assert all(e is not None for e in errors)
    budget = [e for e in errors if isinstance(e, FailureBudgetExceeded)]
    assert budget and "max_failures=1 of the executor was exceeded" in str(budget[0])
    assert "queued were cancelled" in str(budget[0])
    assert cancelled  # through scancel
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # as soon as slurmctld has dropped them
        states = {state.name for state in backend.status(cancelled).values()}
        if states != {"PENDING"}:
            break
        time.sleep(0.5)
    assert states == {"CANCELLED"}


def test_attach_keeps_the_canary_the_budget_and_culprit_isolation(tmp_path: Path) -> None:
    storage = str(tmp_path / "runs")
    with BatchPoolExecutor(
        max_workers=1,
        storage=storage,
        cleanup_bucket=False,
        canary=3,
        max_failures=2,
        isolate_culprits=False,
    ) as bpe:
        assert list(bpe.map(buggy, range(4, 8))) == [8, 10, 12, 14]
        run = bpe.run_url.rsplit("/", 1)[-1]
    with BatchPoolExecutor.attach(storage, run) as again:
        assert again._canary == 3
        assert again._budget is not None and again._budget.limit == 2
        assert isinstance(again._budget.limit, int)  # a count, not a fraction
        assert again._watcher._isolate_culprits is False
    with BatchPoolExecutor.attach(storage, run, max_failures=0.5, canary=0) as again:
        assert again._canary == 0 and again._budget is not None
        assert again._budget.limit == 0.5
