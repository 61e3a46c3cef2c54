"""Calls that kill their worker, exit, or fail to travel back: each fails only itself.

Everything here runs on real local worker processes with the run in ``tmp_path``.
The functions below are module-level so workers import them by reference (the
local backend gives its workers the caller's ``sys.path``).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import threading
from pathlib import Path

import pytest

import batchpool
from batchpool import BatchPoolExecutor, RemoteError, RemoteTraceback, WorkerLostError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ex(tmp_path: Path):
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path)) as executor:
        yield executor


@pytest.fixture
def ex_one_attempt(tmp_path: Path):
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), max_attempts=1) as executor:
        yield executor


# -- functions the workers run -------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def _count_attempt(attempts: str) -> None:
    with open(attempts, "a") as f:
        f.write("attempt\n")


def die_by_sigkill(attempts: str) -> None:
    _count_attempt(attempts)
    print("last words before SIGKILL")
    os.kill(os.getpid(), signal.SIGKILL)


def die_by_exit(attempts: str) -> None:
    _count_attempt(attempts)
    print("last words before os._exit")
    os._exit(7)


def die_by_segfault(attempts: str) -> None:
    _count_attempt(attempts)
    print("last words before the segfault")
    ctypes.string_at(0)


# (function, words the error must use for how the worker ended, last words it printed)
DEATHS = {
    "sigkill": (die_by_sigkill, "SIGKILL", "last words before SIGKILL"),
    "exit7": (die_by_exit, "code 7", "last words before os._exit"),
    "segfault": (die_by_segfault, "SIGSEGV", "last words before the segfault"),
}


def die_once(marker: str, value: int) -> int:
    """Kill the worker on the first attempt only; return ``value`` on the next."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("died once\n")
        os._exit(9)
    return value


def square_or_die(x: int, killer: int, done_dir: str) -> int:
    if x == killer:
        os.kill(os.getpid(), signal.SIGKILL)
    Path(done_dir, str(x)).touch()
    return x * x


def exit_at(x: int, which: int, done_dir: str) -> int:
    if x == which:
        raise SystemExit(3)
    Path(done_dir, str(x)).touch()
    return x * x


def interrupt_at(x: int, which: int, done_dir: str) -> int:
    if x == which:
        raise KeyboardInterrupt
    Path(done_dir, str(x)).touch()
    return x * x


def return_a_lock() -> threading.Lock:
    return threading.Lock()


class TwoArgError(Exception):
    """Pickles, but cannot be unpickled: its ``__init__`` needs two arguments."""

    def __init__(self, first: int, second: int) -> None:
        super().__init__(f"{first} and {second}")
        self.first = first
        self.second = second


def raise_two_arg_error() -> None:
    raise TwoArgError(1, 2)


class ModuleError(Exception):
    """An exception class of this test module: workers import it by reference."""


def raise_module_error(text: str) -> None:
    raise ModuleError(text)


def redirect_output_to_devnull() -> str:
    """Point fds 1 and 2 at /dev/null and leave them there, as careless C-output silencers do."""
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return "redirected"


def assert_still_works(ex: BatchPoolExecutor) -> None:
    assert ex.submit(square, 7).result(timeout=30) == 49
    assert list(ex.map(square, range(10), chunksize=3, timeout=30)) == [x * x for x in range(10)]


# -- a dying worker ------------------------------------------------------------------------


@pytest.mark.parametrize("death", list(DEATHS))
def test_dying_worker_fails_the_call_after_three_attempts(ex, tmp_path, death):
    fn, how, last_words = DEATHS[death]
    attempts = tmp_path / "attempts"
    error = ex.submit(fn, str(attempts)).exception(timeout=30)
    assert isinstance(error, WorkerLostError)
    text = str(error)
    assert how in text
    assert "3 attempts" in text
    assert attempts.read_text().count("attempt\n") == 3  # run once per attempt, no more
    if death == "segfault":
        assert "Segmentation fault" in text  # faulthandler's report is in the log tail
    else:
        assert last_words in text
    assert_still_works(ex)


@pytest.mark.parametrize("death", list(DEATHS))
def test_dying_worker_with_max_attempts_1_fails_after_one_attempt(ex_one_attempt, tmp_path, death):
    fn, how, _ = DEATHS[death]
    attempts = tmp_path / "attempts"
    error = ex_one_attempt.submit(fn, str(attempts)).exception(timeout=30)
    assert isinstance(error, WorkerLostError)
    text = str(error)
    assert how in text
    assert "after 1 attempt:" in text
    assert "attempt 2" not in text
    assert attempts.read_text().count("attempt\n") == 1
    assert_still_works(ex_one_attempt)


def test_printed_output_before_dying_is_in_the_error(ex_one_attempt, tmp_path):
    error = ex_one_attempt.submit(die_by_exit, str(tmp_path / "attempts")).exception(timeout=30)
    assert isinstance(error, WorkerLostError)
    text = str(error)
    # The log tail comes after the reasons, and it is the call's own output.
    assert text.index("code 7") < text.index("last words before os._exit")


def test_call_whose_worker_dies_once_is_retried(ex, tmp_path):
    marker = tmp_path / "died-once"
    assert ex.submit(die_once, str(marker), 42).result(timeout=30) == 42
    assert marker.exists()  # the first attempt did die
    assert_still_works(ex)


def test_map_chunk_with_a_killer_fails_only_the_killer(ex, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    results = []
    # Chunks: [0..3] [4..7] [8..11]; only call 5 kills its worker. Its chunk runs again
    # split ([4, 5] and [6, 7], then [4] and [5]): only call 5 fails.
    it = ex.map(square_or_die, range(12), [5] * 12, [str(done)] * 12, chunksize=4, timeout=30)
    with pytest.raises(WorkerLostError) as info:
        for value in it:
            results.append(value)
    assert results == [0, 1, 4, 9, 16]  # the error surfaces at item 5
    text = str(info.value)
    assert "1 call to square_or_die()" in text
    assert "SIGKILL" in text
    ex.shutdown(wait=True)
    ran = {int(p.name) for p in done.iterdir()}
    assert {4, 6, 7, *range(8, 12)} <= ran
    assert 5 not in ran


def test_map_chunk_with_a_killer_fails_whole_without_isolation(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    results = []
    with BatchPoolExecutor(
        max_workers=2, storage=str(tmp_path), isolate_culprits=False, max_attempts=2
    ) as ex:
        it = ex.map(square_or_die, range(8), [5] * 8, [str(done)] * 8, chunksize=4, timeout=30)
        with pytest.raises(WorkerLostError, match="4 calls to square_or_die") as info:
            for value in it:
                results.append(value)
    assert results == [0, 1, 4, 9]  # call 4 shares the chunk of call 5
    assert "after 2 attempts" in str(info.value)
    assert 6 not in {int(p.name) for p in done.iterdir()}  # the chunk never got past 5


def test_map_chunk_with_a_killer_at_the_end(ex_one_attempt, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    results = []
    it = ex_one_attempt.map(
        square_or_die, range(12), [9] * 12, [str(done)] * 12, chunksize=4, timeout=30
    )
    # max_attempts=1: the culprit still runs alone once (three runs in all).
    with pytest.raises(WorkerLostError, match=r"1 call to square_or_die.* each of the 3 times"):
        for value in it:
            results.append(value)
    assert results == [x * x for x in range(9)]
    assert_still_works(ex_one_attempt)


# -- exits and interrupts raised by a call -------------------------------------------------


def test_system_exit_fails_only_that_call(ex, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    futures = [ex.submit(exit_at, x, 1, str(done)) for x in range(4)]
    error = futures[1].exception(timeout=30)
    assert isinstance(error, SystemExit)
    assert error.code == 3
    assert [f.result(timeout=30) for i, f in enumerate(futures) if i != 1] == [0, 4, 9]
    assert_still_works(ex)


def test_system_exit_in_a_map_chunk_lets_the_rest_of_the_chunk_run(ex, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    it = ex.map(exit_at, range(4), [1] * 4, [str(done)] * 4, chunksize=4, timeout=30)
    assert next(it) == 0
    with pytest.raises(SystemExit) as info:
        next(it)
    assert info.value.code == 3
    # One outcome per chunk: item 1's outcome arrived, so calls 2 and 3 ran after it.
    assert {p.name for p in done.iterdir()} == {"0", "2", "3"}
    assert_still_works(ex)


def test_keyboard_interrupt_fails_only_that_call(ex, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    futures = [ex.submit(interrupt_at, x, 2, str(done)) for x in range(4)]
    assert isinstance(futures[2].exception(timeout=30), KeyboardInterrupt)
    assert [f.result(timeout=30) for i, f in enumerate(futures) if i != 2] == [0, 1, 9]
    assert_still_works(ex)


# -- outcomes that cannot travel back ------------------------------------------------------


def test_unpicklable_result_is_a_serialization_error(ex):
    error = ex.submit(return_a_lock).exception(timeout=30)
    assert isinstance(error, batchpool.SerializationError)
    assert isinstance(error, pickle.PicklingError)
    assert "_thread.lock" in str(error)
    assert "return_a_lock()" in str(error)
    assert_still_works(ex)


def test_unpicklable_exception_is_a_remote_error(ex):
    error = ex.submit(raise_two_arg_error).exception(timeout=30)
    assert isinstance(error, RemoteError)
    assert error.type_name.endswith("TwoArgError")
    assert error.message == "1 and 2"
    assert "raise_two_arg_error" in error.traceback_text
    assert "TwoArgError" in error.traceback_text
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "raise_two_arg_error" in str(error.__cause__)
    # A RemoteError itself travels: it pickles and unpickles to an equal carrier.
    again = pickle.loads(pickle.dumps(error))
    assert (again.type_name, again.message, again.traceback_text) == (
        error.type_name,
        error.message,
        error.traceback_text,
    )
    assert_still_works(ex)


def test_exception_of_the_test_module_is_reraised_as_itself(ex):
    future = ex.submit(raise_module_error, "boom from the worker")
    with pytest.raises(ModuleError, match="boom from the worker") as info:
        future.result(timeout=30)
    assert type(info.value) is ModuleError
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_module_error" in str(cause)
    assert "raise_module_error" in cause.tb
    assert_still_works(ex)


# -- a call that leaves its worker broken --------------------------------------------------


def test_call_redirecting_its_output_does_not_break_later_calls(tmp_path):
    # One worker, so the follow-up call surely lands on the worker the first call changed.
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as ex:
        assert ex.submit(redirect_output_to_devnull).result(timeout=30) == "redirected"
        assert ex.submit(square, 3).result(timeout=30) == 9
