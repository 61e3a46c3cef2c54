"""CPython's own ``Lib/test/test_concurrent_futures.py``, run against BatchPoolExecutor.

The stdlib's file is used as it is; this adapter changes only its set-up:

- ``BatchPoolMixin`` is to ``BatchPoolExecutor`` what the file's ``ProcessPoolSpawnMixin``
  is to ``ProcessPoolExecutor``: ``executor_type = BatchPoolExecutor``, a spawn context
  for ``get_context()`` (so ``mp_context=`` is passed, as to ``ProcessPoolExecutor``),
  and a storage folder of the test's own (``storage=`` in ``executor_kwargs``).
- Every class the file builds with ``ProcessPoolSpawnMixin`` (initializer, shutdown,
  wait, as_completed, executor, deadlock tests) is built again with ``BatchPoolMixin``,
  by the file's own ``create_executor_tests``: ``ProcessPoolSpawnWaitTest`` gives
  ``BatchPoolWaitTest`` and so on. Classes that need no executor (``FutureTests``) run
  as they are. Thread-pool, fork and forkserver classes are not run.
- Inside the run ``concurrent.futures.ProcessPoolExecutor`` is ``BatchPoolExecutor``,
  the drop-in it is meant to be: the few tests that name the stdlib's class instead of
  ``self.executor_type`` (``ProcessPoolShutdownTest``'s context-manager, ``del`` and
  ``shutdown(wait=False)`` tests) test BatchPoolExecutor rather than the stdlib. (So
  ``test_hang_gh83386``, which the file skips for ``ProcessPoolExecutor``, is skipped too.)
- The BatchPool classes live in a module of their own (``CLASSES_MODULE``), importable in
  the workers as well: a test that submits one of its own methods
  (``submit(self._test_traceback)``) pickles its class by reference.
- The interpreters that tests start (``assert_python_ok``) import ``test`` through
  ``PYTHONPATH``, so ``script_helper`` is told that this interpreter needs its
  environment (it would start them with ``-I``); a ``sitecustomize`` on that path lets
  their ``from concurrent.futures import BatchPoolExecutor`` (the file imports
  ``executor_type.__name__`` from there) find it. ``XDG_CACHE_HOME`` points into the run's
  folder, so executors built without ``storage=`` keep their runs there too.

How it runs: the ``test`` package (CPython's, fetched by ``services.cpython_testsuite``)
is imported only in child interpreters, never in pytest's: one child per CPython class,
``python -X faulthandler`` running the class's tests with ``unittest``, as CPython's
regrtest does. That keeps pytest's logging capture (the tests read log records from
stderr) and its thread-exception hooks out of the tests. The child writes a JSON line
per test; each pytest test here is one CPython test and reports its outcome, traceback
and output. A CPython test that runs longer than ``TEST_TIMEOUT`` has its stacks dumped,
its child ends, and the rest of its class goes on in a new child. Classes run
``BATCHPOOL_CPYTHON_JOBS`` (default 2) at a time, ahead of pytest's order: in the whole
suite they start with the session (conftest.py), beside the other tests, whose engines
keep them waiting more than computing; the tests here then read what they found.

Run it alone: ``python -m pytest tests/test_stdlib_futures.py`` (``-m "not cpython"``
leaves it out). When the suite cannot be fetched, the tests fail and say why.
"""

from __future__ import annotations

import concurrent.futures
import faulthandler
import functools
import importlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

from batchpool import BatchPoolExecutor

ADAPTER = Path(__file__).resolve()
MODULE = "test.test_concurrent_futures"
#: A CPython test may run this long in its child; then its stacks are dumped, the child
#: ends and the test fails. The suite's own bound on one wait is support.SHORT_TIMEOUT (30 s).
TEST_TIMEOUT = float(os.environ.get("BATCHPOOL_CPYTHON_TEST_TIMEOUT", "120"))
#: How many CPython classes run at once (each in its own child interpreter).
JOBS = max(1, int(os.environ.get("BATCHPOOL_CPYTHON_JOBS", "2")))
#: Lines of a test's output quoted when it fails.
OUTPUT_LINES = 80

#: CPython tests that cannot pass against an executor whose workers are always fresh
#: interpreters and which pickles each call in ``submit``: xfail(strict=True), so one that
#: passes fails the run and comes off this list.
DEVIATIONS: dict[str, str] = {
    "BatchPoolExecutorDeadlockTest.test_error_at_task_pickle": (
        "submit() pickles the call, so ErrorAtPickle's PicklingError is raised by submit(), "
        "which the test calls outside its assertRaises; it expects it from result()"
    ),
    "BatchPoolProcessPoolShutdownTest.test_processes_terminate": (
        "submit(acquire_lock, sem) pickles a multiprocessing Semaphore, which pickles only "
        "while multiprocessing starts a process, so submit() raises; the stdlib's pool fails "
        "the same pickling later and puts the error in the future, which the test never looks at"
    ),
    "BatchPoolProcessPoolExecutorTest.test_saturation": (
        "submit(sem.acquire) pickles a method of a _multiprocessing.SemLock, which no "
        "pickler can pickle, so submit() raises; the stdlib's pool pickles later and puts the "
        "error in the future, which the test never looks at"
    ),
    "BatchPoolExecutorDeadlockTest.test_shutdown_deadlock_pickle": (
        "submit() pickles the call, so submit(id, ErrorAtPickle()) raises PicklingError "
        "itself, outside the test's assertRaises; it expects it from result()"
    ),
    # The deliberate ones: a dead worker or a call that cannot be read is that call's
    # error, not a broken pool (README, "Where it differs from ProcessPoolExecutor").
    "BatchPoolProcessPoolExecutorTest.test_killed_child": (
        "a worker killed from outside is replaced and its job run again (max_attempts): the "
        "call succeeds and the executor goes on, where the stdlib breaks the whole pool"
    ),
    "BatchPoolExecutorDeadlockTest.test_error_at_task_unpickle": (
        "a call whose arguments fail to unpickle in the worker fails with that error; the "
        "stdlib breaks the whole pool (BrokenProcessPool)"
    ),
    "BatchPoolExecutorDeadlockTest.test_exit_at_task_unpickle": (
        "SystemExit while a call's arguments unpickle in the worker fails that call with it; "
        "the stdlib breaks the whole pool (BrokenProcessPool)"
    ),
    "BatchPoolExecutorDeadlockTest.test_exit_during_result_pickle_on_worker": (
        "a result that cannot be pickled (here: pickling raises SystemExit) fails its call "
        "with batchpool.SerializationError naming its type, the SystemExit as its cause"
    ),
    "BatchPoolExecutorDeadlockTest.test_error_during_result_unpickle_in_result_handler": (
        "a result that cannot be unpickled in the client fails its call with "
        "batchpool.SerializationError; the stdlib breaks the whole pool"
    ),
    "BatchPoolExecutorDeadlockTest.test_exit_during_result_unpickle_in_result_handler": (
        "SystemExit while a result unpickles in the client fails its call with "
        "batchpool.SerializationError; the stdlib breaks the whole pool"
    ),
    "BatchPoolFailingInitializerTest.test_initializer": (
        "its initargs hold a multiprocessing.Queue, which can travel only to processes "
        "multiprocessing starts itself: the constructor raises SerializationError naming it. "
        "A Manager().Queue() works (tests/test_dropin.py)"
    ),
    "BatchPoolProcessPoolShutdownTest.test_del_shutdown": (
        "reads ProcessPoolExecutor's private _call_queue and _executor_manager_thread, "
        "which have no counterpart here (calls travel through the store)"
    ),
    "BatchPoolProcessPoolShutdownTest.test_shutdown_no_wait": (
        "reads ProcessPoolExecutor's private _call_queue and _executor_manager_thread, "
        "which have no counterpart here (calls travel through the store)"
    ),
}

# Environment of the child interpreters.
SUITE_ENV = "BATCHPOOL_CPYTHON_SUITE"  # the folder that holds CPython's `test` package
STORAGE_ENV = "BATCHPOOL_CPYTHON_STORAGE"  # where BatchPoolMixin makes each test's storage
TIMEOUT_ENV = "BATCHPOOL_CPYTHON_CHILD_TIMEOUT"

# The child: python -X faulthandler -c BOOT <this file> --list | --run <report> <ids...>.
# run_path, not `python <this file>`: the tests folder must not come onto sys.path (the
# workers inherit it), and with -c the child's sys.path[0] is its own empty cwd.
BOOT = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)

# Written into each run's folder, first on the children's PYTHONPATH after the suite.
SITECUSTOMIZE = '''\
"""Written by tests/test_stdlib_futures.py for CPython's test_concurrent_futures.

The scripts that its tests run in new interpreters import the executor under test from
concurrent.futures by name; this makes that name BatchPoolExecutor, then runs the
interpreter's own sitecustomize, if it has one.
"""
import concurrent.futures as _futures
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

_stdlib_getattr = _futures.__getattr__


def _getattr(name):
    if name == "BatchPoolExecutor":
        from batchpool import BatchPoolExecutor

        return BatchPoolExecutor
    return _stdlib_getattr(name)


_futures.__getattr__ = _getattr

_here = _os.path.dirname(_os.path.abspath(__file__))
_spec = _machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in _sys.path if _os.path.abspath(p or ".") != _here]
)
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(_util.module_from_spec(_spec))
'''

# Written next to it: the module that holds the BatchPool classes. It is importable in
# every process of the run, the workers too (they get the child's sys.path), so that a
# class pickled by reference (``submit(self._test_traceback)``) is found there, as
# ``ProcessPoolSpawn*`` classes are found in test.test_concurrent_futures.
CLASSES_MODULE = "cpython_futures_batchpool"
CLASSES_SOURCE = '''\
"""Written by tests/test_stdlib_futures.py: CPython's test_concurrent_futures classes
built for BatchPoolExecutor (see that file)."""
import importlib.util as _util
import sys as _sys

_spec = _util.spec_from_file_location("_cpython_futures_adapter", {adapter!r})
_adapter = _util.module_from_spec(_spec)
_sys.modules[_spec.name] = _adapter
_spec.loader.exec_module(_adapter)
_adapter.install(globals())
'''

pytestmark = [pytest.mark.cpython, pytest.mark.slow]


# -- the parent: pytest's side ----------------------------------------------------------------


def _child_env(suite: Path, run_dir: Path) -> dict[str, str]:
    """The environment of a child: ours, with CPython's ``test`` first on its path and
    then the run's folder of generated modules (nothing else is shadowed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    shim = run_dir / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (shim / f"{CLASSES_MODULE}.py").write_text(CLASSES_SOURCE.format(adapter=str(ADAPTER)))
    (run_dir / "storage").mkdir(exist_ok=True)
    env[STORAGE_ENV] = str(run_dir / "storage")
    env["XDG_CACHE_HOME"] = str(run_dir / "cache")
    paths = [str(suite), str(shim)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[SUITE_ENV] = str(suite)
    env[TIMEOUT_ENV] = str(TEST_TIMEOUT)
    return env


def _child_command(*args: str) -> list[str]:
    return [sys.executable, "-X", "faulthandler", "-c", BOOT, str(ADAPTER), *args]


@functools.cache
def _listing() -> tuple[Path | None, tuple[str, ...], str | None]:
    """``(suite folder, CPython test ids, problem)``: the ids are ``Class.test_method``."""
    try:
        from services.cpython_testsuite import testsuite_path

        suite = testsuite_path()
    except Exception as exc:  # any reason at all: it must fail the run, not skip
        return None, (), f"CPython's test suite is unavailable: {type(exc).__name__}: {exc}"
    with tempfile.TemporaryDirectory(prefix="cpython-futures-list-") as cwd:
        try:
            result = subprocess.run(
                _child_command("--list"),
                cwd=cwd,
                env=_child_env(suite, Path(cwd)),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            return suite, (), "listing CPython's tests took more than 120 s"
    try:
        ids = tuple(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        ids = ()
    if result.returncode != 0 or not ids:
        return (
            suite,
            (),
            f"listing CPython's tests in {suite} failed (exit {result.returncode}):\n"
            f"{result.stdout[-4000:]}{result.stderr[-4000:]}",
        )
    return suite, ids, None


def _class_of(test_id: str) -> str:
    return test_id.split(".", 1)[0]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cpython_test" not in metafunc.fixturenames:
        return
    _, ids, problem = _listing()
    if problem is not None:
        metafunc.parametrize("cpython_test", [pytest.param("", id="testsuite-unavailable")])
        return
    sizes: dict[str, int] = {}
    for test_id in ids:
        sizes[_class_of(test_id)] = sizes.get(_class_of(test_id), 0) + 1
    params = []
    for test_id in ids:
        # The first test of a class waits for the whole class (its child runs them all).
        marks = [pytest.mark.timeout(sizes[_class_of(test_id)] * (TEST_TIMEOUT + 5) + 120)]
        if test_id in DEVIATIONS:
            marks.append(pytest.mark.xfail(strict=True, reason=DEVIATIONS[test_id]))
        params.append(pytest.param(test_id, id=test_id, marks=marks))
    metafunc.parametrize("cpython_test", params)


class _Runs:
    """The children that run the selected CPython classes, ``JOBS`` at a time."""

    def __init__(self, suite: Path, root: Path, classes: dict[str, list[str]]) -> None:
        self.suite = suite
        self.root = root
        self.fixture_errors: list[str] = []
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen[bytes]] = set()
        self._closing = False
        self._pool = concurrent.futures.ThreadPoolExecutor(JOBS, "cpython-futures")
        self._classes = {
            name: self._pool.submit(self._run_class, name, ids) for name, ids in classes.items()
        }

    def result(self, test_id: str) -> dict[str, Any]:
        results = self._classes[_class_of(test_id)].result()
        return results[test_id]

    def wait_all(self) -> None:
        for future in self._classes.values():
            future.result()

    def close(self) -> None:
        self._closing = True
        for future in self._classes.values():
            future.cancel()
        with self._lock:
            for child in self._children:
                _kill(child)
        self._pool.shutdown(wait=True)

    def _run_class(self, name: str, ids: list[str]) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        remaining = list(ids)
        attempt = 0
        while remaining:
            attempt += 1
            run_dir = self.root / f"{name}-{attempt}"
            run_dir.mkdir(parents=True)
            report = run_dir / "results.jsonl"
            log_path = run_dir / "output.log"
            deadline = len(remaining) * (TEST_TIMEOUT + 5) + 60
            how = "?"
            with open(log_path, "wb") as log:
                child = subprocess.Popen(
                    _child_command("--run", str(report), *remaining),
                    cwd=run_dir,
                    env=_child_env(self.suite, run_dir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its whole group is killed if it overruns
                )
                with self._lock:
                    if self._closing:
                        _kill(child)
                    self._children.add(child)
                try:
                    how = f"exit status {child.wait(timeout=deadline)}"
                except subprocess.TimeoutExpired:
                    _kill(child)
                    how = f"killed after {deadline:.0f} s"
                finally:
                    with self._lock:
                        self._children.discard(child)
            output = log_path.read_bytes().decode(errors="replace")
            records = _read_records(report)
            started: dict[str, dict[str, Any]] = {}
            for record in records:
                if record["event"] == "start":
                    started[record["id"]] = record
                elif record["event"] == "stop":
                    record["output"] = output[record["start_offset"] : record["offset"]]
                    results[record["id"]] = record
                elif record["event"] == "fixture":
                    self.fixture_errors.append(f"{name} ({run_dir}): {record['detail']}")
            for test_id, record in started.items():
                if test_id not in results:  # it hung or crashed its child
                    tail = output[record["offset"] :]
                    why = (
                        f"it ran longer than BATCHPOOL_CPYTHON_TEST_TIMEOUT={TEST_TIMEOUT:g} s: "
                        f"faulthandler dumped every thread's stack (in the output) and ended it"
                        if "Timeout (" in tail
                        else "it crashed its child, or the child was killed (see the output)"
                    )
                    results[test_id] = {
                        "outcome": "error",
                        "seconds": None,
                        "env_changed": False,
                        "detail": f"the test did not finish ({how}): {why}",
                        "output": tail,
                    }
            if not any(test_id in results for test_id in remaining):
                for test_id in remaining:
                    results[test_id] = {
                        "outcome": "error",
                        "seconds": None,
                        "env_changed": False,
                        "detail": f"not run: its child ended ({how}) before running it",
                        "output": output,
                    }
            remaining = [test_id for test_id in remaining if test_id not in results]
            if self._closing:
                break
        return results


def _kill(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child's process group (its faulthandler had its chance) and reap it."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
        pass


def _read_records(report: Path) -> list[dict[str, Any]]:
    try:
        lines = report.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # the last line of a child killed while writing it
            pass
    return records


#: The runs, when they were started with the session (``start_with_the_session``).
_started: _Runs | None = None


def start_with_the_session(
    session: pytest.Session, tmp_path_factory: pytest.TempPathFactory
) -> _Runs | None:
    """Start the runs of the CPython classes this session selected, if any (called by
    conftest.py as the session begins): their children mostly wait, so they run beside
    the rest of the suite instead of adding minutes at its end. The caller closes them."""
    global _started
    classes = _selected_classes(session, sys.modules[__name__])
    suite, _, problem = _listing()
    if not classes or suite is None or problem is not None:
        return None
    _started = _Runs(suite, tmp_path_factory.mktemp("cpython-futures"), classes)
    return _started


def _selected_classes(session: pytest.Session, module: Any) -> dict[str, list[str]]:
    classes: dict[str, list[str]] = {}
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        in_module = getattr(item, "module", None) is module
        if in_module and callspec is not None and "cpython_test" in callspec.params:
            test_id = callspec.params["cpython_test"]
            if test_id:
                classes.setdefault(_class_of(test_id), []).append(test_id)
    return classes


@pytest.fixture(scope="module")
def cpython_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_Runs]:
    """The runs of the CPython classes that this session selected: those started with
    the session, or started now."""
    if _started is not None:
        yield _started
        return
    suite, _, _ = _listing()
    assert suite is not None
    classes = _selected_classes(request.session, request.module)
    runs = _Runs(suite, tmp_path_factory.mktemp("cpython-futures"), classes)
    try:
        yield runs
    finally:
        runs.close()


def _quote_output(text: str) -> str:
    lines = text.rstrip().splitlines()
    if not lines:
        return "(no output)"
    if len(lines) > OUTPUT_LINES:
        lines = [f"[... {len(lines) - OUTPUT_LINES} lines before]", *lines[-OUTPUT_LINES:]]
    return "\n".join(lines)


def test_cpython(cpython_test: str, request: pytest.FixtureRequest) -> None:
    """One test of CPython's test_concurrent_futures, against BatchPoolExecutor."""
    suite, _, problem = _listing()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    runs: _Runs = request.getfixturevalue("cpython_runs")
    result = runs.result(cpython_test)
    outcome = result["outcome"]
    seconds = "?" if result["seconds"] is None else f"{result['seconds']:.1f} s"
    if result["env_changed"]:
        warnings.warn(
            f"{cpython_test} changed the environment (regrtest's ENV CHANGED: threads, "
            f"processes or files left behind); its output:\n{_quote_output(result['output'])}",
            stacklevel=1,
        )
    if outcome == "passed":
        return
    if outcome == "skipped":
        pytest.skip(f"CPython skips it: {result['detail']}")
    if outcome == "xfailed":  # the CPython file's own @expectedFailure
        pytest.xfail(f"CPython expects it to fail: {result['detail']}")
    word = {"failed": "FAIL", "error": "ERROR", "xpassed": "UNEXPECTED SUCCESS"}.get(
        outcome, outcome
    )
    pytest.fail(
        f"{MODULE}.{cpython_test}: {word} ({seconds}; suite in {suite})\n\n"
        f"{result['detail'].rstrip()}\n\n"
        f"---- output of the test ----\n{_quote_output(result['output'])}",
        pytrace=False,
    )


def test_cpython_module_fixtures(request: pytest.FixtureRequest) -> None:
    """setUpModule/tearDownModule (and class fixtures) of the runs raised nothing."""
    _, _, problem = _listing()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    runs: _Runs = request.getfixturevalue("cpython_runs")
    runs.wait_all()
    assert not runs.fixture_errors, "\n\n".join(runs.fixture_errors)


# -- the child: one interpreter that runs CPython's tests ------------------------------------


class _Recorder(unittest.TextTestResult):
    """unittest's verbose result that also writes one JSON line per test to ``report``."""

    def __init__(self, stream: Any, report: TextIO, support: Any, timeout: float) -> None:
        super().__init__(stream, descriptions=True, verbosity=2)
        self._report = report
        self._support = support
        self._timeout = timeout
        self._current: dict[str, Any] | None = None

    def _offset(self) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        self.stream.flush()
        try:
            return os.lseek(2, 0, os.SEEK_CUR)  # stdout and stderr share the log file
        except OSError:
            return 0

    def _write(self, record: dict[str, Any]) -> None:
        self._report.write(json.dumps(record) + "\n")
        self._report.flush()

    @staticmethod
    def _test_id(test: unittest.TestCase) -> str:
        return f"{type(test).__name__}.{test._testMethodName}"

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self._support.environment_altered = False
        offset = self._offset()
        self._current = {
            "id": self._test_id(test),
            "start": time.monotonic(),
            "start_offset": offset,
            "outcomes": [],
        }
        self._write({"event": "start", "id": self._test_id(test), "offset": offset})
        faulthandler.dump_traceback_later(self._timeout, exit=True)

    def stopTest(self, test: unittest.TestCase) -> None:
        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)
        current, self._current = self._current, None
        if current is None:  # pragma: no cover - unittest pairs them
            return
        kinds = [kind for kind, _ in current["outcomes"]]
        for kind in ("error", "failed", "xpassed", "skipped", "xfailed"):
            if kind in kinds:
                outcome = kind
                break
        else:
            outcome = "passed"
        self._write(
            {
                "event": "stop",
                "id": current["id"],
                "outcome": outcome,
                "detail": "\n".join(text for _, text in current["outcomes"]),
                "seconds": time.monotonic() - current["start"],
                "env_changed": bool(self._support.environment_altered),
                "start_offset": current["start_offset"],
                "offset": self._offset(),
            }
        )

    def _text(self, err: Any, test: Any) -> str:
        """The traceback as unittest prints it (its own frames left out)."""
        text: str = self._exc_info_to_string(err, test)  # type: ignore[attr-defined]
        return text

    def _add(self, test: Any, kind: str, text: str) -> None:
        if self._current is not None and isinstance(test, unittest.TestCase):
            self._current["outcomes"].append((kind, text))
        else:  # setUpModule, tearDownClass, a module cleanup: no test is running
            self._write({"event": "fixture", "detail": f"{test}: {kind}\n{text}"})

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._add(test, "error", self._text(err, test))

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._add(test, "failed", self._text(err, test))

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "failed" if issubclass(err[0], test.failureException) else "error"
            self._add(test, kind, f"{subtest}:\n{self._text(err, test)}")

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._add(test, "skipped", reason)

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._add(test, "xfailed", self._text(err, test))

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._add(test, "xpassed", "marked @expectedFailure in CPython, but it passed")


def install(namespace: dict[str, Any]) -> None:
    """Build CPython's test classes for BatchPoolExecutor into ``namespace``, the module
    CLASSES_MODULE (written by ``_child_env``): its ``CLASSES`` lists them in file order."""
    tcf = importlib.import_module(MODULE)

    executor_mixin: Any = tcf.ExecutorMixin

    class BatchPoolMixin(executor_mixin):
        """What ProcessPoolSpawnMixin is to ProcessPoolExecutor, for BatchPoolExecutor."""

        executor_type = BatchPoolExecutor
        ctx = "spawn"
        executor_kwargs: dict[str, Any]

        def get_context(self) -> Any:
            return multiprocessing.get_context(self.ctx)

        def setUp(self) -> None:
            # After the test mixin's setUp has set its executor_kwargs (initializer=...).
            storage = tempfile.mkdtemp(
                prefix=f"{self._testMethodName}-", dir=os.environ.get(STORAGE_ENV)
            )
            self.executor_kwargs = {**self.executor_kwargs, "storage": storage}
            super().setUp()

    BatchPoolMixin.__module__ = namespace["__name__"]
    namespace["BatchPoolMixin"] = BatchPoolMixin
    names = []
    for name, cls in list(vars(tcf).items()):
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
            continue
        if cls.__module__ != tcf.__name__ or not unittest.TestLoader().getTestCaseNames(cls):
            continue
        if not issubclass(cls, tcf.ExecutorMixin):
            namespace[name] = cls  # FutureTests: no executor, run as it is
            names.append(name)
        elif tcf.ProcessPoolSpawnMixin in cls.__bases__:
            # create_executor_tests(mixin, bases, executor_mixins=(ProcessPoolSpawnMixin, ...))
            # made cls = type(name, (mixin, ProcessPoolSpawnMixin, *bases), {}).
            mixin, spawn, *bases = cls.__bases__
            if spawn is not tcf.ProcessPoolSpawnMixin:
                raise RuntimeError(f"{name} is not built as create_executor_tests builds")
            tcf.create_executor_tests(mixin, bases=tuple(bases), executor_mixins=(BatchPoolMixin,))
            built_name = "BatchPool" + name.removeprefix("ProcessPoolSpawn")
            built = vars(tcf).get(built_name)
            if not isinstance(built, type):
                raise RuntimeError(f"create_executor_tests did not build {built_name}")
            built.__module__ = namespace["__name__"]
            namespace[built_name] = built
            names.append(built_name)
    # The module fixtures of the file (multiprocessing's and threading's cleanup checks).
    for fixture in ("setUpModule", "tearDownModule"):
        if hasattr(tcf, fixture):
            namespace[fixture] = getattr(tcf, fixture)
    namespace["CLASSES"] = names


def _child_main(argv: list[str]) -> int:
    suite = Path(os.environ[SUITE_ENV]).resolve()
    test_package = importlib.import_module("test")
    found = Path(test_package.__path__[0]).resolve()
    if found != suite / "test":
        print(f"`test` is imported from {found}, not from {suite}", file=sys.stderr)
        return 2
    script_helper = importlib.import_module("test.support.script_helper")
    # The interpreters the tests start find `test` (and the sitecustomize above) only
    # through PYTHONPATH: this interpreter needs its environment, which script_helper
    # otherwise tests by starting `python -E`, that starts without trouble.
    vars(script_helper)["__cached_interp_requires_environment"] = True
    support = importlib.import_module("test.support")
    classes = importlib.import_module(CLASSES_MODULE)
    loader = unittest.TestLoader()
    if argv[0] == "--list":
        ids = [
            f"{name}.{method}"
            for name in classes.CLASSES
            for method in loader.getTestCaseNames(getattr(classes, name))
        ]
        print(json.dumps(ids))
        return 0
    report_path, ids = argv[1], argv[2:]
    # BatchPoolExecutor as the drop-in for ProcessPoolExecutor (see the module docstring).
    concurrent.futures.ProcessPoolExecutor = BatchPoolExecutor  # type: ignore[assignment,misc]
    tests = unittest.TestSuite(loader.loadTestsFromName(test_id, classes) for test_id in ids)
    stream = unittest.runner._WritelnDecorator(sys.stderr)
    with open(report_path, "a") as report:
        result = _Recorder(stream, report, support, float(os.environ[TIMEOUT_ENV]))
        tests.run(result)
        result.printErrors()
    stream.writeln(f"Ran {result.testsRun} tests")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
