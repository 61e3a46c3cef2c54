"""A script written for ProcessPoolExecutor runs unchanged: its constructor, errors,
futures, manager proxies, and maps of a million calls (counted, never timed)."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import gc
import io
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from pathlib import Path

import pytest
from calls import (
    big_bytes,
    capture,
    divide,
    failing_init,
    getpid,
    hold_kept_lock,
    inc,
    initialized,
    keep_lock,
    mark_and_fail_every,
    put_on,
    remember_init,
    try_kept_lock,
    try_kept_lock_while_held,
    wait_for,
)
from conftest import Gate

from batchpool import (
    BatchPoolExecutor,
    InitializerError,
    RemoteTraceback,
    SerializationError,
    WorkerLostError,
)
from batchpool.future import MapBatch

# -- the constructor --------------------------------------------------------------------------


def test_the_stdlib_positional_arguments(tmp_path: Path) -> None:
    folder = tmp_path / "inits"
    folder.mkdir()
    context = multiprocessing.get_context("spawn")
    with BatchPoolExecutor(2, context, remember_init, (str(folder),), storage=str(tmp_path)) as ex:
        assert ex._max_workers == 2
        seen = list(ex.map(initialized, range(40), chunksize=1))
    # Every call ran in a process whose initializer ran once, before its first call.
    assert all(given == [str(folder)] for _, given in seen)
    pids = {pid for pid, _ in seen}
    runs = [p.name.split("-")[1] for p in folder.iterdir()]
    assert sorted(runs) == sorted(str(pid) for pid in pids)  # once per process, no more


def test_bad_constructor_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="initializer must be a callable"):
        BatchPoolExecutor(initializer=42, storage=str(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks_per_child must be greater than 0"):
        BatchPoolExecutor(max_tasks_per_child=0, storage=str(tmp_path))
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        BatchPoolExecutor(0, storage=str(tmp_path))


def test_an_initializer_that_raises_breaks_the_executor_and_is_not_retried(tmp_path: Path) -> None:
    folder = tmp_path / "inits"
    folder.mkdir()
    with BatchPoolExecutor(
        1, initializer=failing_init, initargs=(str(folder),), storage=str(tmp_path)
    ) as ex:
        future = ex.submit(inc, 1)
        with pytest.raises(BrokenProcessPool, match="error in initializer") as raised:
            future.result(timeout=60)
        assert isinstance(raised.value, InitializerError)
        assert isinstance(raised.value.__cause__, _RemoteTraceback)
        assert "failing_init" in str(raised.value.__cause__)
        assert ex._broken
        with pytest.raises(BrokenProcessPool):
            ex.submit(inc, 2)
        assert future.job is not None and future.job.attempt == 1  # no retry
    assert len(list(folder.iterdir())) == 1  # it ran once, in the one worker


def test_max_tasks_per_child_replaces_workers(tmp_path: Path) -> None:
    with BatchPoolExecutor(2, max_tasks_per_child=3, storage=str(tmp_path)) as ex:
        pids = list(ex.map(getpid, range(30), chunksize=1))
    counts = {pid: pids.count(pid) for pid in set(pids)}
    assert max(counts.values()) <= 3
    assert len(counts) >= 10
    assert pids  # and no job was lost on a worker that was leaving: every call returned


def test_a_manager_queue_reaches_the_workers(tmp_path: Path) -> None:
    with multiprocessing.Manager() as manager:
        queue = manager.Queue()
        with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
            assert list(ex.map(put_on, [queue] * 5, range(5))) == list(range(5))
        assert sorted(queue.get(timeout=10) for _ in range(5)) == [0, 2, 4, 6, 8]


# -- initargs travel as a forked child inherits them ------------------------------------------


def test_tqdms_process_helper_runs_unchanged(tmp_path: Path) -> None:
    # tqdm passes initializer=tqdm.set_lock, initargs=(its lock: a multiprocessing RLock
    # of the fork context and a threading RLock), and replaces submit to count calls.
    from tqdm.contrib.concurrent import _executor_map

    bar = io.StringIO()
    executor = functools.partial(BatchPoolExecutor, storage=str(tmp_path))
    assert _executor_map(executor, inc, range(30), max_workers=2, file=bar) == list(range(1, 31))
    assert "30/30" in bar.getvalue()


def test_a_lock_of_the_spawn_context_is_shared_with_the_client(tmp_path: Path) -> None:
    lock = multiprocessing.get_context("spawn").Lock()
    with BatchPoolExecutor(1, initializer=keep_lock, initargs=(lock,), storage=str(tmp_path)) as ex:
        with lock:  # held here: the worker's is the same semaphore
            assert ex.submit(try_kept_lock, 0.3).result(timeout=60) is False
        assert ex.submit(try_kept_lock, 10).result(timeout=60) is True


@pytest.mark.parametrize("kind", ["Lock", "RLock", "Semaphore", "BoundedSemaphore"])
def test_a_fork_context_lock_excludes_the_workers_from_each_other(
    tmp_path: Path, kind: str
) -> None:
    lock = getattr(multiprocessing.get_context("fork"), kind)()  # no name: a twin stands in
    held, release = str(tmp_path / "held"), str(tmp_path / "release")
    with BatchPoolExecutor(2, initializer=keep_lock, initargs=(lock,), storage=str(tmp_path)) as ex:
        holder = ex.submit(hold_kept_lock, held, release)
        other = ex.submit(try_kept_lock_while_held, held, release)
        assert other.result(timeout=60) is False  # the other worker holds it
        assert holder.result(timeout=60) is True
        assert ex.submit(try_kept_lock, 10).result(timeout=60) is True  # and let it go


@pytest.mark.parametrize("serializer", ["cloudpickle", "dill"])
def test_a_threading_lock_in_initargs_is_each_workers_own(tmp_path: Path, serializer: str) -> None:
    lock = threading.Lock()
    with (
        lock,
        BatchPoolExecutor(
            1, initializer=keep_lock, initargs=(lock,), serializer=serializer, storage=str(tmp_path)
        ) as ex,
    ):  # held by a thread of the client, which is not in the worker
        assert ex.submit(try_kept_lock, 10).result(timeout=60) is True


def test_locks_in_call_arguments_still_fail_at_submit(tmp_path: Path) -> None:
    # Only initargs are inherited; a call's arguments are pickled, as the stdlib's are.
    lock = multiprocessing.get_context("spawn").Lock()
    with (
        BatchPoolExecutor(1, storage=str(tmp_path)) as ex,
        pytest.raises(SerializationError, match="Lock"),
    ):
        ex.submit(try_kept_lock, lock)


# -- errors -----------------------------------------------------------------------------------


def test_a_dead_worker_is_a_broken_process_pool(tmp_path: Path) -> None:
    with BatchPoolExecutor(1, storage=str(tmp_path), max_attempts=1) as ex:
        try:
            ex.submit(os._exit, 3).result(timeout=60)
        except BrokenProcessPool as exc:
            assert isinstance(exc, WorkerLostError)
        else:
            pytest.fail("no BrokenProcessPool")
        assert ex.submit(inc, 1).result(timeout=60) == 2  # the executor is not broken


def test_the_cause_is_a_stdlib_remote_traceback(tmp_path: Path) -> None:
    with BatchPoolExecutor(1, storage=str(tmp_path)) as ex, pytest.raises(ZeroDivisionError) as e:
        ex.submit(divide, 0).result(timeout=60)
    raised = e
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback) and isinstance(cause, _RemoteTraceback)
    assert "return 1 / x" in str(cause)


SCRIPT = """
import sys
from batchpool import BatchPoolExecutor

cache = {}


def setup(value):
    cache["model"] = value


def predict(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return cache["model"] + x


if __name__ == "__main__":
    with BatchPoolExecutor(2, initializer=setup, initargs=(100,), storage=sys.argv[1],
                           ship_code=sys.argv[2] == "ship") as ex:
        print(list(ex.map(predict, range(3))))
        try:
            ex.submit(predict, 3).result()
        except ValueError:
            import traceback
            traceback.print_exc()
"""


@pytest.mark.parametrize("ship", ["ship", "default"])
def test_functions_of_the_script_see_its_initializer_and_show_their_source(
    tmp_path: Path, ship: str
) -> None:
    script = tmp_path / "job_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "runs"), ship],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "[100, 101, 102]"
    # The remote traceback names the script's file and line and shows the source.
    line = SCRIPT.splitlines().index('        raise ValueError(f"bad item {x}")') + 1
    assert f'File "{script}", line {line}, in predict' in done.stderr
    assert 'raise ValueError(f"bad item {x}")' in done.stderr
    assert "<dynamic-code>" not in done.stderr


# -- futures -----------------------------------------------------------------------------------


def test_cancel_leaves_cancelled_and_wait_returns(tmp_path: Path, gate: Gate) -> None:
    with BatchPoolExecutor(1, storage=str(tmp_path)) as ex:
        busy = [ex.submit(wait_for, gate.path("go")) for _ in range(3)]
        last = ex.submit(inc, 1)
        assert last.cancel()
        assert last._state == "CANCELLED"
        done, not_done = cf.wait([last], timeout=30)
        assert done == {last} and not not_done
        assert last._state == "CANCELLED_AND_NOTIFIED"
        assert last.set_running_or_notify_cancel() is False
        gate.open("go")
        assert [f.result(timeout=60) for f in busy] == [None] * 3


def test_cancel_futures_cancels_only_what_a_stdlib_pool_would_not_have_started(
    tmp_path: Path,
) -> None:
    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        lone = ex.submit(time.sleep, 0.01)
        ex.shutdown(cancel_futures=True)
    assert not lone.cancelled() and lone.result() is None  # an idle pool started it

    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
        ex.shutdown(cancel_futures=True)
    ran = [f for f in futures if not f.cancelled()]
    # The stdlib starts max_workers + 1 = 3; a slot freed meanwhile may take one more.
    assert 1 <= len(ran) <= 4
    assert all(f.done() and f.exception() is None for f in ran)
    assert ran == futures[: len(ran)]  # the first ones, in order


# -- a million calls -------------------------------------------------------------------------


def _live_futures() -> int:
    # type(), not isinstance(): other tests leave objects whose __class__ raises
    return sum(issubclass(type(o), cf.Future) for o in gc.get_objects())


def test_a_million_call_map_makes_a_future_per_chunk(tmp_path: Path) -> None:
    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        before = _live_futures()
        results = ex.map(inc, range(1_000_000))
        total, peak = 0, 0
        for i, value in enumerate(results):
            total += value
            if i % 250_000 == 0:
                peak = max(peak, _live_futures() - before)
        assert total == sum(range(1, 1_000_001))
        assert 0 < peak <= 300  # 245 chunks of 4096 calls, not a million futures
        assert ex.status() == {"Success": 1_000_000}
        assert ex.usage().jobs <= 300


def test_a_generator_map_with_buffersize_keeps_few_futures(tmp_path: Path) -> None:
    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        before = _live_futures()
        results = ex.map(inc, (i for i in range(200_000)), chunksize=1000, buffersize=8)
        peak = 0
        for i, value in enumerate(results):
            assert value == i + 1
            if i % 10_000 == 0:
                peak = max(peak, _live_futures() - before)
        assert 0 < peak <= 9
        assert sum(type(o) is MapBatch for o in gc.get_objects()) <= 9


def test_a_map_error_surfaces_at_its_item_and_breaking_out_cancels_the_rest(
    tmp_path: Path,
) -> None:
    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        seen = []
        with pytest.raises(ZeroDivisionError):
            for value in ex.map(divide, [1, 2, 0, 4], chunksize=4):
                seen.append(value)
        assert seen == [1.0, 0.5]
    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        results = ex.map(inc, iter(range(100_000)), chunksize=100, buffersize=4)
        assert next(results) == 1
        results.close()  # breaking out: the chunks submitted ahead are cancelled
    # The rest of the input was never read, let alone run.
    assert sum(ex.status().values()) <= 5 * 100


def test_later_maps_of_a_quick_function_make_fewer_longer_chunks(tmp_path: Path) -> None:
    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        assert list(ex.map(inc, range(10_000))) == list(range(1, 10_001))
        first = ex.usage().jobs  # nothing known yet: about four chunks per worker
        assert list(ex.map(inc, range(10_000))) == list(range(1, 10_001))
        second = ex.usage().jobs - first  # its calls are quick: chunks that last longer
    assert first == 8
    assert 2 <= second < first  # and never fewer than one per worker


def test_after_a_map_error_the_iterator_ends_and_the_rest_is_cancelled(tmp_path: Path) -> None:
    # As the stdlib's map iterator: the exception ends it; the calls not run are cancelled.
    items = [1, 0, *range(1, 200)]
    for executor in (cf.ProcessPoolExecutor(2), BatchPoolExecutor(2, storage=str(tmp_path))):
        with executor as ex:
            results = ex.map(divide, items, chunksize=1)
            assert next(results) == 1.0
            with pytest.raises(ZeroDivisionError):
                next(results)
            with pytest.raises(StopIteration):
                next(results)
        if isinstance(ex, BatchPoolExecutor):
            assert ex.status().get("Cancelled", 0) > 0


def test_map_over_one_or_many_iterables_keeps_order_and_items(tmp_path: Path) -> None:
    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        assert list(ex.map(inc, range(10_000))) == list(range(1, 10_001))
        assert list(ex.map(divide, (x for x in [1, 2, 4]))) == [1.0, 0.5, 0.25]
        pairs = list(ex.map(pow, range(1000), [2] * 999))  # the shortest iterable ends it
        assert pairs == [x**2 for x in range(999)]
        assert list(ex.map(capture, [(1,), None])) == [(((1,),), {}), ((None,), {})]


def test_large_results_of_one_chunk_are_pickled_in_parts(tmp_path: Path) -> None:
    with BatchPoolExecutor(1, storage=str(tmp_path), cleanup_bucket=False) as ex:
        results = list(ex.map(big_bytes, range(20), chunksize=20))
        run = Path(ex.run_url)
    assert [r[:1] for r in results] == [bytes([i]) for i in range(20)]
    assert all(len(r) == 3_000_000 for r in results)
    (outcome,) = (run / "results").iterdir()
    assert outcome.stat().st_size > 20 * 3_000_000  # every result is there, once


def test_calls_that_raise_inside_a_chunk_leave_the_others_run_once(tmp_path: Path) -> None:
    folder = tmp_path / "marks"
    folder.mkdir()
    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        items = ([str(folder)] * 999, range(1, 1000), [100] * 999)
        results = ex.map(mark_and_fail_every, *items, chunksize=999)  # one job
        seen = []
        with pytest.raises(ValueError, match="item 100"):
            for value in results:
                seen.append(value)
        assert seen == list(range(1, 100))
    runs = sorted(int(p.name.split("-")[0]) for p in folder.iterdir())
    assert runs == list(range(1, 1000))  # every call ran, once, the failing ones too


def test_dask_runs_its_graph_on_the_executor(tmp_path: Path) -> None:
    import dask

    with BatchPoolExecutor(2, storage=str(tmp_path)) as ex:
        values = [dask.delayed(inc)(i) for i in range(10)]
        total = dask.delayed(sum)(values)
        assert dask.compute(total, scheduler=ex) == (sum(range(1, 11)),)
