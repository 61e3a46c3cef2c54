"""concurrent.futures conformance, written from the stdlib's documented behaviour.

Each test states a promise of ``concurrent.futures.Executor``/``Future`` and checks
BatchPoolExecutor keeps it with real worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import os
import threading
import time
import weakref
from pathlib import Path

import pytest
from calls import (
    Holder,
    add,
    capture,
    divide,
    env,
    make_dummy,
    mul,
    pid_once,
    touch,
    touch_after,
    triple,
    wait_for,
)
from conftest import Gate

from batchpool import BatchPoolExecutor, BatchPoolFuture


def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


# -- types ------------------------------------------------------------------------------------


def test_is_a_real_executor_with_real_futures(executor: BatchPoolExecutor) -> None:
    assert isinstance(executor, cf.Executor)
    future = executor.submit(add, 1, 2)
    assert isinstance(future, cf.Future)
    assert isinstance(future, BatchPoolFuture)
    assert future.result(timeout=30) == 3


# -- submit -----------------------------------------------------------------------------------


def test_submit_passes_args_and_kwargs(executor: BatchPoolExecutor) -> None:
    assert executor.submit(capture, 1, 2, a=3).result() == ((1, 2), {"a": 3})


def test_submit_keyword_names_fn_and_self_go_to_the_function(executor: BatchPoolExecutor) -> None:
    assert executor.submit(capture, 1, self=2, fn=3).result() == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=capture)  # type: ignore[call-arg]


def test_submit_lambda_and_closure(executor: BatchPoolExecutor) -> None:
    offset = 10
    assert executor.submit(lambda x: x + offset, 5).result() == 15


def test_submit_rejects_non_callable(executor: BatchPoolExecutor) -> None:
    with pytest.raises(TypeError, match="callable"):
        executor.submit(42)  # type: ignore[arg-type]


def test_exception_is_raised_as_its_own_type(executor: BatchPoolExecutor) -> None:
    future = executor.submit(divide, 0)
    with pytest.raises(ZeroDivisionError):
        future.result()
    exc = future.exception()
    assert isinstance(exc, ZeroDivisionError)
    assert "divide" in str(exc.__cause__)  # the remote traceback


def test_many_threads_submitting_at_once(executor: BatchPoolExecutor) -> None:
    results: dict[int, int] = {}

    def client(base: int) -> None:
        futures = [executor.submit(mul, base, i) for i in range(50)]
        results[base] = sum(f.result() for f in futures)

    threads = [threading.Thread(target=client, args=(b,)) for b in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {b: b * sum(range(50)) for b in range(8)}


# -- map --------------------------------------------------------------------------------------


def test_map_several_iterables_stop_at_the_shortest(executor: BatchPoolExecutor) -> None:
    assert list(executor.map(add, range(10), range(5))) == [2 * i for i in range(5)]


@pytest.mark.parametrize("chunksize", [1, 3, 7, 100])
def test_map_chunksize_keeps_order(executor: BatchPoolExecutor, chunksize: int) -> None:
    assert list(executor.map(triple, range(50), chunksize=chunksize)) == [3 * i for i in range(50)]


def test_map_default_chunking_of_a_generator(executor: BatchPoolExecutor) -> None:
    assert list(executor.map(triple, (i for i in range(300)))) == [3 * i for i in range(300)]


def test_map_empty(executor: BatchPoolExecutor) -> None:
    assert list(executor.map(triple, [])) == []


def test_map_exception_surfaces_when_its_item_is_reached(executor: BatchPoolExecutor) -> None:
    results = executor.map(divide, [1, 2, 0, 4], chunksize=1)
    assert next(results) == 1.0
    assert next(results) == 0.5
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_is_submitted_eagerly(executor: BatchPoolExecutor, gate: Gate) -> None:
    executor.map(touch, [gate.path(f"m{i}") for i in range(4)])  # never iterated
    wait_until(lambda: all(os.path.exists(gate.path(f"m{i}")) for i in range(4)))


def test_map_timeout_is_a_deadline_from_the_call(executor: BatchPoolExecutor, gate: Gate) -> None:
    results = executor.map(wait_for, [gate.path("never")], timeout=0.2)
    with pytest.raises(TimeoutError):
        next(results)
    gate.open("never")  # let the worker go, so the fixture's shutdown returns


def test_map_timeout_error_is_the_builtin(executor: BatchPoolExecutor, gate: Gate) -> None:
    results = executor.map(wait_for, [gate.path("g")], timeout=0)
    with pytest.raises(TimeoutError) as info:
        list(results)
    assert isinstance(info.value, cf.TimeoutError)
    gate.open("g")


def test_map_validates_arguments(executor: BatchPoolExecutor) -> None:
    with pytest.raises(ValueError):
        executor.map(triple, [1], chunksize=0)
    with pytest.raises(ValueError):
        executor.map(triple, [1], buffersize=0)
    with pytest.raises(TypeError):
        executor.map(triple, [1], buffersize=1.5)  # type: ignore[arg-type]


def test_map_buffersize_reads_the_input_lazily(executor: BatchPoolExecutor) -> None:
    consumed = itertools.count()

    def source():  # type: ignore[no-untyped-def]
        for i in itertools.count():  # endless
            next(consumed)
            yield i

    results = executor.map(triple, source(), chunksize=5, buffersize=2)
    assert next(consumed) <= 10  # two chunks of five read ahead, no more
    first = list(itertools.islice(results, 23))
    assert first == [3 * i for i in range(23)]
    assert next(consumed) <= 23 + 10 + 2
    results.close()


def test_map_close_cancels_what_was_not_started(tmp_path: Path, gate: Gate) -> None:
    gate.open("first")
    gates = [gate.path("first")] + [gate.path("rest")] * 19
    paths = [gate.path(f"t{i}") for i in range(20)]
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as ex:
        for _ in ex.map(touch_after, gates, paths, chunksize=1):
            break  # leaving the loop closes the iterator and cancels what has not started
        gate.open("rest")
    # The first call ran, and at most the two chunks in flight with the one worker.
    assert os.path.exists(paths[0])
    assert sum(os.path.exists(p) for p in paths[1:]) <= 2


def test_map_does_not_keep_results_alive(executor: BatchPoolExecutor) -> None:
    for obj in executor.map(make_dummy, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_no_stale_reference_to_a_submitted_bound_method(executor: BatchPoolExecutor) -> None:
    holder = Holder()
    collected = threading.Event()
    ref = weakref.ref(holder, lambda _: collected.set())
    future = executor.submit(holder.method)
    del holder
    gc.collect()
    assert collected.wait(timeout=60), "the executor kept the bound method's object alive"
    assert ref() is None
    assert future.result() == 42


# -- wait, as_completed, callbacks -------------------------------------------------------------


def test_wait_first_completed(executor: BatchPoolExecutor, gate: Gate) -> None:
    slow = executor.submit(wait_for, gate.path("slow"), "slow")
    fast = executor.submit(add, 1, 1)
    done, not_done = cf.wait([slow, fast], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert done == {fast}
    assert not_done == {slow}
    gate.open("slow")
    assert slow.result() == "slow"


def test_wait_first_exception(executor: BatchPoolExecutor, gate: Gate) -> None:
    slow = executor.submit(wait_for, gate.path("slow"))
    failing = executor.submit(divide, 0)
    done, not_done = cf.wait([slow, failing], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert done == {failing}
    assert not_done == {slow}
    gate.open("slow")


def test_wait_all_completed(executor: BatchPoolExecutor) -> None:
    futures = [executor.submit(triple, i) for i in range(20)]
    done, not_done = cf.wait(futures, timeout=30, return_when=cf.ALL_COMPLETED)
    assert done == set(futures)
    assert not not_done


def test_wait_timeout(executor: BatchPoolExecutor, gate: Gate) -> None:
    slow = executor.submit(wait_for, gate.path("slow"))
    done, not_done = cf.wait([slow], timeout=0.1)
    assert not done and not_done == {slow}
    gate.open("slow")


def test_as_completed_yields_in_completion_order(executor: BatchPoolExecutor, gate: Gate) -> None:
    slow = executor.submit(wait_for, gate.path("slow"), "slow")
    fast = executor.submit(add, "f", "ast")
    iterator = cf.as_completed([slow, fast], timeout=30)
    assert next(iterator) is fast
    gate.open("slow")
    assert next(iterator) is slow


def test_as_completed_timeout(executor: BatchPoolExecutor, gate: Gate) -> None:
    slow = executor.submit(wait_for, gate.path("slow"))
    with pytest.raises(TimeoutError):
        list(cf.as_completed([slow], timeout=0.1))
    gate.open("slow")


def test_done_callback_is_called_once_with_the_future(executor: BatchPoolExecutor) -> None:
    seen: list[cf.Future[int]] = []
    called = threading.Event()

    def callback(f: cf.Future[int]) -> None:
        seen.append(f)
        called.set()

    future = executor.submit(triple, 3)
    future.add_done_callback(callback)
    assert called.wait(30)
    assert seen == [future] and future.result() == 9
    late: list[cf.Future[int]] = []
    future.add_done_callback(late.append)  # added after done: called at once
    assert late == [future]


# -- cancel and running -----------------------------------------------------------------------


def test_cancel_of_a_pending_call_means_it_never_runs(tmp_path: Path, gate: Gate) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as ex:
        running = ex.submit(wait_for, gate.path("go"), started=gate.path("started"))
        wait_until(lambda: os.path.exists(gate.path("started")))
        queued = ex.submit(triple, 1)  # in flight: handed to the backend, waits for the worker
        wait_until(queued.running)
        pending = ex.submit(touch, gate.path("ran"))  # beyond the in-flight limit: pending
        assert not pending.running()
        assert running.running()
        assert not running.cancel()
        assert pending.cancel()
        assert pending.cancelled() and pending.done()
        # Waiters learn of a cancellation at once, not when the calls before it end (the
        # gate is still closed): the timeout only guards against a hang.
        done, _ = cf.wait([pending], timeout=60)
        assert done == {pending}
        with pytest.raises(cf.CancelledError):
            pending.result()
        gate.open("go")
        assert running.result() is None and queued.result() == 3
    assert not os.path.exists(gate.path("ran"))


def test_running_is_true_while_the_job_runs(executor: BatchPoolExecutor, gate: Gate) -> None:
    future = executor.submit(wait_for, gate.path("go"), started=gate.path("started"))
    wait_until(lambda: os.path.exists(gate.path("started")))
    assert future.running() and not future.done()
    gate.open("go")
    future.result()
    assert not future.running() and future.done()


# -- shutdown ---------------------------------------------------------------------------------


def test_submit_after_shutdown_raises(tmp_path: Path) -> None:
    ex = BatchPoolExecutor(max_workers=1, storage=str(tmp_path))
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(triple, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(triple, [1])


def test_shutdown_waits_for_calls(tmp_path: Path) -> None:
    ex = BatchPoolExecutor(max_workers=2, storage=str(tmp_path))
    futures = [ex.submit(triple, i) for i in range(10)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [3 * i for i in range(10)]


def test_shutdown_without_wait_still_finishes_the_calls(tmp_path: Path) -> None:
    ex = BatchPoolExecutor(max_workers=2, storage=str(tmp_path))
    futures = [ex.submit(triple, i) for i in range(10)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=30) for f in futures] == [3 * i for i in range(10)]


def test_shutdown_cancel_futures(tmp_path: Path, gate: Gate) -> None:
    ex = BatchPoolExecutor(max_workers=1, storage=str(tmp_path))
    running = ex.submit(wait_for, gate.path("go"), started=gate.path("started"))
    wait_until(lambda: os.path.exists(gate.path("started")))
    queued = ex.submit(triple, 2)
    wait_until(queued.running)
    pending = [ex.submit(touch, gate.path(f"p{i}")) for i in range(5)]
    # The running call may end only once shutdown has begun: were it to end first, its
    # free slot could start a pending call before shutdown cancels it (so could the
    # stdlib's), which a loaded machine makes likely enough to flake.
    opener = threading.Timer(0.5, gate.open, ["go"])
    opener.start()
    ex.shutdown(wait=True, cancel_futures=True)
    opener.join()
    assert running.result() is None and queued.result() == 6
    assert all(f.cancelled() for f in pending), [f._state for f in pending]
    assert not any(os.path.exists(gate.path(f"p{i}")) for i in range(5))


def test_context_manager_waits(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path)) as ex:
        futures = [ex.submit(triple, i) for i in range(5)]
    assert all(f.done() for f in futures)


def test_context_manager_without_wait_on_exit(tmp_path: Path, gate: Gate) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path), wait_on_exit=False) as ex:
        future = ex.submit(wait_for, gate.path("go"), "late")
    assert not future.done()  # leaving the block did not wait
    gate.open("go")
    assert future.result(timeout=30) == "late"


def test_shutdown_twice_is_harmless(tmp_path: Path) -> None:
    ex = BatchPoolExecutor(max_workers=1, storage=str(tmp_path))
    assert ex.submit(triple, 1).result() == 3
    ex.shutdown()
    ex.shutdown()


# -- constructor ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(tmp_path: Path, bad: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        BatchPoolExecutor(max_workers=bad, storage=str(tmp_path))


def test_max_workers_must_be_an_int(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="max_workers"):
        BatchPoolExecutor(max_workers="2", storage=str(tmp_path))  # type: ignore[arg-type]


def test_max_workers_bounds_the_jobs_running_at_once(tmp_path: Path, gate: Gate) -> None:
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path)) as ex:
        futures = [
            ex.submit(pid_once, gate.path("go"), started=gate.path(f"s{i}")) for i in range(5)
        ]

        def started() -> int:
            return sum(os.path.exists(gate.path(f"s{i}")) for i in range(5))

        wait_until(lambda: started() >= 2)
        assert started() == 2
        gate.open("go")
        pids = [f.result() for f in futures]
    # A worker process runs one call at a time: two processes ran all five, so no more
    # than two calls ever ran at once, whenever a third could have started.
    assert len(set(pids)) == 2


@pytest.mark.parametrize("cpus, expected", [(None, "1"), (2, "2"), ("3", "3")])
def test_cpus_per_job_caps_library_threads(tmp_path: Path, cpus: object, expected: str) -> None:
    names = [
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ]
    with BatchPoolExecutor(max_workers=1, cpus_per_job=cpus, storage=str(tmp_path)) as ex:
        assert list(ex.map(env, names)) == [expected] * len(names)


@pytest.mark.parametrize("bad", [0, -2, "many"])
def test_cpus_per_job_is_checked(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="cpus_per_job"):
        BatchPoolExecutor(cpus_per_job=bad, storage=str(tmp_path))  # type: ignore[arg-type]


def test_unknown_serializer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cloudpickle, dill"):
        BatchPoolExecutor(serializer="json", storage=str(tmp_path))


def test_dill_serializer_end_to_end(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=2, serializer="dill", storage=str(tmp_path)) as ex:
        assert ex.submit(lambda s: s.upper(), "dill").result() == "DILL"
        assert list(ex.map(triple, range(10))) == [3 * i for i in range(10)]
        with pytest.raises(ZeroDivisionError):
            ex.submit(divide, 0).result()


def test_image_is_ignored_by_the_local_backend_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="image='python:3.11' is ignored"):
        ex = BatchPoolExecutor(image="python:3.11", storage=str(tmp_path))
    ex.shutdown()


def test_workers_share_the_clients_working_directory(executor: BatchPoolExecutor) -> None:
    assert executor.submit(os.getcwd).result() == os.getcwd()


def test_default_storage_is_under_the_user_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with BatchPoolExecutor(max_workers=1, cleanup_bucket=False, name="my run") as ex:
        assert ex.run_url.startswith(str(tmp_path / "cache" / "batchpool"))
        assert "my-run-" in ex.run_url
        assert ex.submit(triple, 2).result() == 6
