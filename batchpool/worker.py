"""``python -m batchpool.worker``: the code every job runs.

One job runs one chunk: read ``chunks/<chunk>.in``, check its signature, run its
calls, write ``results/<chunk>.<attempt>.out`` (one object, whatever happened)
and the captured output to ``logs/<chunk>.<attempt>.log``.

Two ways to start it:

- one job: ``python -m batchpool.worker --chunk ID --attempt N``, with the store
  and the run secret in the environment (``BATCHPOOL_STORE``,
  ``BATCHPOOL_RUN_SECRET``). This is what cluster engines run.
- a warm pool worker: ``python -m batchpool.worker --serve JOB_FD EVENT_FD``. The
  local backend keeps such processes and sends them the same arguments and
  environment a one-job worker would get, one job at a time, as JSON lines.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import functools
import itertools
import json
import os
import resource
import select
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from batchpool import serialization
from batchpool.backends.base import THREAD_ENV
from batchpool.codeship import prepare_worker, share_globals
from batchpool.documents import Document, EndMarker, StartMarker, build
from batchpool.errors import (
    FATAL_EXIT_CODE,
    BackendError,
    EnvironmentMismatchError,
    InitializerError,
    IntegrityError,
    StorageError,
    is_fatal,
)
from batchpool.processes import boot_id, orphan_grace, own_token_digest, process_started
from batchpool.serialization import (
    ERROR,
    SECRET_ENV,
    SKIPPED,
    BlobRef,
    Entry,
    Group,
    Serializer,
    blob_digest,
    calls_in,
    decode_chunk,
    describe_callable,
    encode_outcome,
    error_entry,
    get_serializer,
    group_values_entry,
    per_call_entries,
    seal,
    unseal,
    value_entry,
)
from batchpool.store import STORE_ENV, Store

__all__ = ["SECRET_ENV", "STORE_ENV", "THREAD_ENV", "main", "run_chunk", "run_job", "serve"]

#: How many bytes (pickled size) of loaded blobs a worker process keeps for later calls.
BLOB_CACHE_ENV = "BATCHPOOL_BLOB_CACHE_BYTES"
DEFAULT_BLOB_CACHE_BYTES = 1 << 30

_stores: dict[str, Store] = {}


def _store_from_env(env: Any) -> tuple[Store, bytes]:
    try:
        spec = env[STORE_ENV]
        secret = bytes.fromhex(env[SECRET_ENV])
    except KeyError as exc:
        raise SystemExit(
            f"batchpool.worker: {exc.args[0]} is not set; a job gets it from the executor "
            "that submitted it"
        ) from None
    store = _stores.get(spec)
    if store is None:
        store = _stores[spec] = Store.from_spec(spec)
    return store, secret


class BlobCache:
    """Objects loaded from ``blobs/``, kept per process, least recently used first out.

    A chunk of 1,000 calls sharing one large argument loads it once; so does every
    later chunk this process runs. Each blob is checked against its content hash
    (which the signed chunk named) before it is unpickled.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
        self._bytes = 0
        self.loads = 0  # blobs read from storage by this process

    def get(self, store: Store, serializer: Serializer, ref: BlobRef) -> Any:
        hit = self._items.get(ref.digest)
        if hit is not None:
            self._items.move_to_end(ref.digest)
            return hit[0]
        key = store.blob_key(ref.digest)
        try:
            data = store.get(key)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{key} ({ref.type_name}) is missing from the run: it was deleted, or the job "
                "reads another run's storage"
            ) from None
        if blob_digest(data) != ref.digest:
            raise IntegrityError(
                f"{key} does not hold the content its name promises: it was changed in "
                "storage, and was not unpickled"
            )
        obj = serializer.loads(data)
        self.loads += 1
        self._items[ref.digest] = (obj, len(data))
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (_, size) = self._items.popitem(last=False)
            self._bytes -= size
        return obj


_blob_cache = BlobCache(int(os.environ.get(BLOB_CACHE_ENV, DEFAULT_BLOB_CACHE_BYTES)))


def environment_mismatch(header: dict[str, Any]) -> str:
    """Why this worker cannot read what the client pickled, or "" when it can."""
    client_python = ".".join(header["python"].split(".")[:2])
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    hint = (
        "run the workers with the client's Python and serializer (the backend's image= or "
        "python=), or the client with the workers'"
    )
    if client_python != here:
        return (
            f"the client pickled these calls with Python {header['python']}, but this worker "
            f"runs Python {sys.version.split()[0]}: pickled functions do not carry across "
            f"Python versions; {hint}"
        )
    name = header["serializer"]
    try:
        serializer = get_serializer(name)
    except ImportError:
        return f"the client pickled with {name}, which this worker does not have; {hint}"
    if serializer.major != header["serializer_version"].split(".")[0]:
        return (
            f"the client pickled with {name} {header['serializer_version']}, but this worker "
            f"has {name} {serializer.version}; {hint}"
        )
    return ""


def _load_error(exc: BaseException, calls: str) -> BaseException:
    """The error for calls that could not be unpickled, with what to do about it."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        error = ModuleNotFoundError(
            f"the worker cannot import {exc.name!r}, needed to unpickle {calls}: install it in "
            f"the worker's environment (the backend's image=, python= or env_script=), or "
            f"make it importable there",
            name=exc.name,
        )
        error.__cause__ = exc
        return error
    return exc


# -- what a job used -------------------------------------------------------------------------

#: Environment variables through which engines name the job running this worker.
_ENGINE_JOB_ENV = (
    ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "_"),
    ("SLURM_JOB_ID", "", ""),
    ("JOB_ID", "SGE_TASK_ID", "."),
)


def engine_job_id(env: Any = os.environ) -> str:
    """The engine's id of the job this process runs in ("" when none is known)."""
    for job_var, task_var, sep in _ENGINE_JOB_ENV:
        job = env.get(job_var, "")
        task = env.get(task_var, "") if task_var else ""
        if job:
            return f"{job}{sep}{task}" if task and task != "undefined" else job
    return ""


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _reset_peak_memory() -> None:
    # Linux keeps the peak resident size (VmHWM) per process; writing 5 to
    # clear_refs resets it, so a warm pool worker measures each job on its own.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_bytes() -> int:
    # ru_maxrss is VmHWM on Linux (in KiB), so it follows the reset above, and costs a
    # system call where reading /proc/self/status costs 20 times more; on macOS it is
    # the process's lifetime peak, in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_chunk(
    store: Store, secret: bytes, chunk_id: str, attempt: int, skip: frozenset[int] = frozenset()
) -> dict[str, Any]:
    """Run one chunk and write its outcome; return its meta (times, usage, calls failed).

    ``skip``: indices of the chunk's calls (across its groups) not to run."""
    started = time.time()
    cpu_before = _cpu_seconds()
    _reset_peak_memory()
    key = store.chunk_key(chunk_id)
    try:
        frame = store.get(key)
    except FileNotFoundError:
        raise StorageError(
            f"{store.fs.unstrip_protocol(store.path(key))} is missing: the run was deleted "
            "from storage, or this job reads another run's storage"
        ) from None
    try:
        header, groups = decode_chunk(unseal(secret, key, frame))
    except Exception as exc:  # forged, truncated, or not written by this run's client
        # An outcome that says so, so the client fails the calls at once: running the
        # job again would read the same bytes.
        error = (
            exc
            if isinstance(exc, IntegrityError)
            else IntegrityError(
                f"{key} could not be read as a chunk of this run: {type(exc).__name__}: {exc}"
            )
        )
        _write_fatal_outcome(store, secret, chunk_id, attempt, started, error)
        raise error from None
    del frame
    if skip:
        groups = _skip_calls(groups, skip)
    mismatch = environment_mismatch(header)
    serializer = get_serializer("cloudpickle" if mismatch else header["serializer"])
    prepare_worker(serializer.name)
    entries: list[Entry] = []
    loads_before = _blob_cache.loads
    serialization.blob_resolver = lambda ref: _blob_cache.get(store, serializer, ref)
    initializer_failed = ""
    calls_started = time.perf_counter()
    try:
        if mismatch:
            failed = error_entry(EnvironmentMismatchError(mismatch), serializer)
            entries = [failed] * sum(n_calls for n_calls, _, _ in groups)
        else:
            init_error = _initialize(store, serializer, header.get("initializer"))
            if init_error is not None:
                initializer_failed = f"{type(init_error).__name__}: {init_error}"
                failed = error_entry(init_error, serializer)
                entries = [failed] * sum(n_calls for n_calls, _, _ in groups)
            else:
                # resume=True runs keep one entry per call: earlier results are
                # found by each call's content key (recovery.earlier_outcomes).
                _run_groups(groups, serializer, entries, compact=not any(header.get("keys") or ()))
    finally:
        serialization.blob_resolver = None
    calls_seconds = time.perf_counter() - calls_started
    ended = time.time()
    special = per_call_entries(entries)
    meta = {
        **_where(chunk_id, attempt, started, ended),
        "wall_seconds": round(ended - started, 6),
        # The calls' own time, without reading the input: what sizes later maps' chunks.
        "calls_seconds": round(calls_seconds, 6),
        "cpu_seconds": round(_cpu_seconds() - cpu_before, 6),
        "peak_memory_bytes": _peak_memory_bytes(),
        "calls": calls_in(entries) - sum(e[0] == SKIPPED for e in special),
        "failed": sum(e[0] == ERROR for e in special),
        # The first few, readable without the secret (``batchpool status``).
        "errors": [f"{e[2]}: {e[3]}"[:300] for e in special if e[0] == ERROR][:3],
        # Their remote tracebacks, as text (the web page shows them without unpickling).
        "tracebacks": [str(e[4])[-20_000:] for e in special if e[0] == ERROR][:3],
        "blobs_loaded": _blob_cache.loads - loads_before,
    }
    if mismatch:
        meta["error"] = f"EnvironmentMismatchError: {mismatch}"
    if initializer_failed:  # the client breaks the executor, as the stdlib's pool breaks
        meta["error"] = meta["initializer_failed"] = initializer_failed
    result_key = store.result_key(chunk_id, attempt)
    store.put(result_key, seal(secret, result_key, encode_outcome(meta, entries)))
    return meta


#: The initializers this process ran (by the digest of their blob): each runs once per
#: worker process, before its first call, as ``ProcessPoolExecutor``'s do.
_initialized: set[str] = set()


def _initialize(
    store: Store, serializer: Serializer, initializer: dict[str, Any] | None
) -> InitializerError | None:
    """Run the executor's initializer if this process has not yet; the error its calls
    fail with when it raised (with its traceback, also printed to the job's log)."""
    if not initializer or initializer["digest"] in _initialized:
        return None
    ref = BlobRef(initializer["digest"], int(initializer["size"]), "initializer")
    name = "the initializer"
    try:
        fn, initargs = _blob_cache.get(store, serializer, ref)
        name = f"the initializer {describe_callable(fn)}"
        share_globals(fn)
        fn(*initargs)
    except BaseException as exc:
        traceback.print_exc()
        try:  # raised, so that its traceback text carries the initializer's as its cause
            raise InitializerError(
                f"{name} raised {type(exc).__name__}: {exc} in the worker (pid {os.getpid()} "
                f"on {socket.gethostname()}); the calls it would have served are not run, and "
                "the executor is broken, as ProcessPoolExecutor's is when its initializer fails"
            ) from exc
        except InitializerError as error:
            return error
    _initialized.add(ref.digest)
    return None


def _where(chunk_id: str, attempt: int, started: float, ended: float) -> dict[str, Any]:
    """What an outcome's meta says of where and when its attempt ran."""
    return {
        "chunk": chunk_id,
        "attempt": attempt,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,
        "ended": ended,
    }


def _write_fatal_outcome(
    store: Store, secret: bytes, chunk_id: str, attempt: int, started: float, error: Exception
) -> None:
    """The outcome of a chunk whose calls could not even be read: no entries, and the
    error (``meta["fatal"]``) each of its calls fails with, so that the client fails
    them at once instead of running the job again to read the same bytes."""
    text = f"{type(error).__name__}: {error}"
    meta = {
        **_where(chunk_id, attempt, started, time.time()),
        "calls": 0,
        "failed": 0,
        "error": text,
        "fatal": text,
    }
    result_key = store.result_key(chunk_id, attempt)
    store.put(result_key, seal(secret, result_key, encode_outcome(meta, [])))


def _skip_calls(groups: list[Group], skip: frozenset[int]) -> list[Group]:
    """``groups`` with the calls at chunk-wide indices ``skip`` marked skipped too."""
    adjusted: list[Group] = []
    first = 0
    for n_calls, payload, skipped in groups:
        more = {i - first for i in skip if first <= i < first + n_calls}
        adjusted.append((n_calls, payload, tuple(sorted({*skipped, *more}))))
        first += n_calls
    return adjusted


_NO_KWARGS: dict[str, Any] = {}  # never changed: a call gets a copy of its kwargs

#: How many calls this process ran (a pool worker retires after ``max_tasks_per_child``).
_calls_run = 0


def _run_groups(
    groups: list[Group], serializer: Serializer, entries: list[Entry], compact: bool = False
) -> None:
    """Run each group's calls, appending their outcome entries to ``entries``: one per
    call, or with ``compact`` one per group whose values pickle together."""
    global _calls_run
    for n_calls, payload, skip in groups:
        try:
            loaded = serializer.loads(payload)
            fn, calls = loaded[0], loaded[1]
            positional = len(loaded) >= 3  # a map chunk: positional arguments only
            single = len(loaded) == 4  # of a map over one iterable: the arguments alone
        except BaseException as exc:
            error = _load_error(exc, f"{n_calls} call{'s' if n_calls != 1 else ''}")
            entries.extend([error_entry(error, serializer)] * n_calls)
            continue
        name = describe_callable(fn)
        share_globals(fn)
        if positional and not skip:
            _run_positional(fn, calls, single, serializer, name, entries, compact)
            continue
        if positional:
            arg_tuples = ((arg,) for arg in calls) if single else calls
            calls = zip(arg_tuples, itertools.repeat(_NO_KWARGS))
        skipped = frozenset(skip)
        values: list[Any] = []  # of the calls since the last entry
        special: dict[int, Entry] = {}  # the calls that raised or were skipped, by index there
        held = 0  # the values' size at a glance (sys.getsizeof)
        for index, (args, kwargs) in enumerate(calls):
            if index in skipped:
                special[len(values)] = (SKIPPED,)
                values.append(None)
            else:
                _calls_run += 1
                try:
                    value = fn(*args, **kwargs)
                except BaseException as exc:  # SystemExit, KeyboardInterrupt: this call only
                    special[len(values)] = error_entry(exc, serializer)
                    value = None
                values.append(value)
                held += sys.getsizeof(value)
                del value
            if held > COMPACT_BYTES:  # large results: pickled now, not all held at once
                _add_entries(entries, values, special, serializer, name, compact)
                values, special, held = [], {}, 0
        del calls
        _add_entries(entries, values, special, serializer, name, compact)
        del values  # the results must not outlive their pickled entries


def _run_positional(
    fn: Any,
    arguments: list[Any],
    single: bool,
    serializer: Serializer,
    name: str,
    entries: list[Entry],
    compact: bool,
) -> None:
    """Run a map chunk's calls (``fn(*args)`` for each tuple of ``arguments``, or
    ``fn(arg)`` for each of them when ``single``), as ``_run_groups`` does, at the cost
    of a list comprehension: ``list.extend`` keeps the values given before one of its
    calls raised, so the loop only restarts after a failure."""
    global _calls_run
    values: list[Any] = []
    special: dict[int, Entry] = {}
    held = 0
    remaining = iter(arguments)
    while True:
        before = len(values)
        batch = itertools.islice(remaining, POSITIONAL_BATCH)
        try:
            values.extend(map(fn, batch) if single else (fn(*args) for args in batch))
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: this call only
            special[len(values)] = error_entry(exc, serializer)
            values.append(None)
            continue
        finally:
            _calls_run += len(values) - before
        if len(values) == before:
            break
        held += sum(map(sys.getsizeof, values[before:]))
        if held > COMPACT_BYTES:  # large results: pickled now, not all held at once
            _add_entries(entries, values, special, serializer, name, compact)
            values, special, held = [], {}, 0
    del arguments, remaining
    _add_entries(entries, values, special, serializer, name, compact)


#: ``_run_positional`` runs this many calls between looks at the size of their results.
POSITIONAL_BATCH = 256

#: A worker holds at most about this many bytes (``sys.getsizeof``) of a group's results
#: before it pickles them: many small results are pickled together, large ones soon.
COMPACT_BYTES = 16 << 20


def _add_entries(
    entries: list[Entry],
    values: list[Any],
    special: dict[int, Entry],
    serializer: Serializer,
    name: str,
    compact: bool,
) -> None:
    """The entries of consecutive calls: one (``VALUES``) when their values pickle
    together, else one per call."""
    if not values:
        return
    group_entry = group_values_entry(values, special, serializer) if compact else None
    if group_entry is not None:
        entries.append(group_entry)
        return
    for index, value in enumerate(values):
        entries.append(special.get(index) or value_entry(value, serializer, name))


#: Seconds between the saves of a running job's output to ``logs/`` (the web page's
#: "follow"); a job shorter than this saves its output once, at its end.
LIVE_LOG_SECONDS = float(os.environ.get("BATCHPOOL_LIVE_LOG_SECONDS", "10"))


class _LiveLog:
    """Saves what a running job printed so far to its log key, every ``LIVE_LOG_SECONDS``
    while it grew: a thread of the job's process, stopped before the final save."""

    def __init__(self, capture: _Capture, store: Store, key: str) -> None:
        self._capture, self._store, self._key = capture, store, key
        self._stop = threading.Event()
        self._saved = 0
        self._thread = threading.Thread(target=self._run, name="batchpool-live-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(LIVE_LOG_SECONDS):
            try:
                text = self._capture.so_far()
                if text is None:
                    return
                if len(text) > self._saved:
                    self._store.put(self._key, text)
                    self._saved = len(text)
            except Exception:  # best effort: the final save at the job's end still comes
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Capture:
    """The output of one job, captured from file descriptors 1 and 2 into a log file.

    - A pool worker: the log file is the one the parent gave as stdout, which it
      reads when the worker dies; each job empties it first.
    - A one-job worker whose stdout is a regular file (an engine's job output
      file): the calls write straight into it, so what they printed survives a
      SIGKILL there, and the job's log is the part written since ``begin``.
    - Otherwise (a terminal, a pipe): a temporary file, replayed to the original
      stdout afterwards.

    Every job starts by pointing 1 and 2 at the log again, whatever a previous
    call did to them.
    """

    def __init__(self, own_file: bool) -> None:
        self._saved: tuple[int, int] | None = None
        self._start = 0
        self.printed = False  # whether the last job wrote any output
        self._in_place = False
        self._reader = -1
        if not own_file:
            self._log = os.dup(1)
            return
        self._saved = (os.dup(1), os.dup(2))
        if stat.S_ISREG(os.fstat(1).st_mode):
            try:
                self._reader = os.open(f"/proc/self/fd/{self._saved[0]}", os.O_RDONLY)
            except OSError:
                self._reader = -1
        if self._reader >= 0:
            self._in_place = True
            self._log = os.dup(1)
            return
        import tempfile

        fd, path = tempfile.mkstemp(prefix="batchpool-", suffix=".log")
        os.close(fd)
        self._log = os.open(path, os.O_RDWR | os.O_APPEND)  # appends after a truncate
        os.unlink(path)
        self._reader = self._log

    @property
    def replay(self) -> bool:
        """Whether the captured output must be written to the original stdout after."""
        return self._saved is not None and not self._in_place

    def begin(self) -> None:
        _flush()
        os.dup2(self._log, 1)
        os.dup2(self._log, 2)
        if self._in_place:
            self._start = os.fstat(self._log).st_size
        else:
            os.ftruncate(self._log, 0)

    def end(self) -> bytes:
        _flush()
        reader = self._reader if self._reader >= 0 else self._log
        size = os.fstat(reader).st_size - self._start
        self.printed = size > 0
        return os.pread(reader, size, self._start) if size > 0 else b""

    def so_far(self) -> bytes | None:
        """What the job printed since ``begin``, read from another thread while it runs;
        None when this capture cannot be read back (its output goes to a pipe)."""
        reader = self._reader if self._reader >= 0 else self._log
        if reader < 0 or not stat.S_ISREG(os.fstat(reader).st_mode):
            return None
        _flush()
        size = os.fstat(reader).st_size - self._start
        return os.pread(reader, size, self._start) if size > 0 else b""

    def restore(self) -> bytes:
        """Put back the original descriptors; return what was captured."""
        text = self.end()
        if self._saved is not None:
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = None
        return text

    def close(self) -> None:
        """Close the log's descriptors (after ``restore``): for a capture made per job in
        a process that lives on."""
        for fd in {self._log, self._reader} - {-1}:
            try:
                os.close(fd)
            except OSError:
                pass
        self._log = self._reader = -1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def run_job(
    args: Sequence[str],
    env: Any,
    capture: _Capture,
    deferred: list[EndMarker] | None = None,
) -> None:
    """Run the job that ``args`` names (``--chunk ID --attempt N``), capturing its output.

    With ``deferred``, the end marker is not written but added there, for a pool worker
    to write once it has told the pool the job is done: the client reads the outcome,
    not the marker, so the marker need not delay it."""
    parsed = _parse_job_args(args)
    store, secret = _store_from_env(env)
    chunk, attempt = parsed.chunk, parsed.attempt
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    if restarts and store.exists(store.result_key(chunk, attempt)):
        # Slurm requeued (--requeue) a job that had written its outcome: its calls
        # ran already, and must not run twice.
        sys.stderr.write(
            f"batchpool: attempt {attempt} of chunk {chunk} already has its result "
            f"(written before Slurm requeued the job); its calls are not run again\n"
        )
        return
    pid = os.getpid()
    start = StartMarker(
        chunk=chunk,
        attempt=attempt,
        host=socket.gethostname(),
        pid=pid,
        pid_started=_own_start(pid),
        boot_id=boot_id(),
        worker=own_token_digest(),
        started=time.time(),
        engine_job=engine_job_id(env),
        restarts=restarts,  # Slurm requeued the job this many times
    )
    _put_marker(store, store.start_key(chunk, attempt), start, secret)
    end = EndMarker(chunk=chunk, attempt=attempt)
    capture.begin()
    live = _LiveLog(capture, store, store.log_key(chunk, attempt))
    try:
        skip = frozenset(int(i) for i in parsed.skip.split(",") if i)
        meta = run_chunk(store, secret, chunk, attempt, skip)
        end = EndMarker(**{k: v for k, v in meta.items() if k in END_FIELDS and v is not None})
    except BaseException as exc:
        end.error = f"{type(exc).__name__}: {exc}"[:10_000]
        end.ended = time.time()
        raise
    finally:
        live.stop()  # before the final save, so that no older text overwrites it
        log = capture.end()
        if log:  # best effort, as the markers: its failure must not hide the job's own
            try:
                store.put(store.log_key(chunk, attempt), log)
            except Exception as exc:
                sys.stderr.write(f"batchpool: could not save the job's output: {exc}\n")
        if deferred is None:
            _put_marker(store, store.end_key(chunk, attempt), end, secret)
        else:
            deferred.append(end)


def run_job_here(args: Sequence[str], env: Any, working_dir: str | None = None) -> None:
    """Run one job in this process, which lives on after it (a Dask or Ray worker), as
    ``python -m batchpool.worker *args`` with ``env`` would: the calls' output is captured
    for the run's ``logs/``, in ``working_dir`` when given; afterwards the descriptors and
    the working folder are as before. The caller runs one job at a time per process
    (descriptors 1 and 2 and the working folder are the process's)."""
    capture = _Capture(own_file=True)
    saved_cwd = os.getcwd() if working_dir else None
    try:
        if working_dir:
            os.chdir(working_dir)
        run_job(list(args), env, capture)
    except SystemExit as exc:  # run_job's own "variable not set" messages
        raise BackendError(str(exc.code)) from None
    finally:
        capture.restore()
        capture.close()
        if saved_cwd is not None:
            os.chdir(saved_cwd)


#: What an end marker keeps of a chunk's outcome meta.
END_FIELDS = frozenset(EndMarker.__struct_fields__)


def _put_marker(store: Store, key: str, marker: Document, secret: bytes) -> None:
    """Write a start or end marker, signed. They tell people and the CLI how the job
    went; a job whose storage refuses them still runs, and says so in its log."""
    try:
        store.put_document(key, marker, secret)
    except Exception as exc:
        sys.stderr.write(f"batchpool: could not write the marker {key}: {exc}\n")


@functools.cache  # a warm worker runs many jobs in one process
def _own_start(pid: int) -> float | None:
    return process_started(pid)


def _parse_job_args(args: Sequence[str]) -> argparse.Namespace:
    """A job's ``--chunk ID --attempt N [--skip I,J]``: the form the executor writes is
    read directly (a warm worker reads one per job); anything else goes to argparse,
    which explains what is wrong."""
    attempt = args[3] if len(args) in (4, 6) else ""
    if attempt.isascii() and attempt.isdigit() and args[0] == "--chunk" and args[2] == "--attempt":
        if len(args) == 4:
            return argparse.Namespace(chunk=args[1], attempt=int(attempt), skip="")
        if args[4] == "--skip":
            return argparse.Namespace(chunk=args[1], attempt=int(attempt), skip=args[5])
    return _job_parser().parse_args(list(args))


@functools.cache  # made once per process
def _job_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m batchpool.worker")
    parser.add_argument("--chunk", required=True, help="the chunk id to run")
    parser.add_argument("--attempt", type=int, required=True, help="this job's attempt number")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated indices of calls cancelled after the chunk was written",
    )
    return parser


# -- the warm pool worker -----------------------------------------------------------------


_busy = threading.Lock()  # held while a pool worker runs a job, or writes its markers

#: End markers a pool worker has put off (``serve``): they tell people how a job went,
#: the client reads the outcome, so they are written when no job waits, at most
#: ``END_MARKER_DELAY`` seconds late, and before the worker exits. Under ``_busy``.
#: Each also went to the pool with its job's "done", and a "written" message tells the
#: pool they are in the store: a worker killed before (a later call's segfault) leaves
#: them to the pool (``write_end_markers``), so no ended job loses its times and usage.
_unwritten: list[tuple[dict[str, str], EndMarker]] = []
END_MARKER_DELAY = 1.0


def _put_end_marker(env: dict[str, str], end: EndMarker) -> None:
    store, secret = _store_from_env(env)
    _put_marker(store, store.end_key(end.chunk, end.attempt), end, secret)


def _write_end_markers() -> None:
    while _unwritten:
        _put_end_marker(*_unwritten.pop(0))


def write_end_markers(env: dict[str, str], ends: Sequence[dict[str, Any]]) -> None:
    """Write the end markers a pool worker sent with its "done" messages but died before
    writing (the local pool calls this from the client, which holds the run's secret).
    Writing one the worker did write after all puts the same document again."""
    for fields in ends:
        _put_end_marker(env, build(EndMarker, fields))


class _JobLines:
    """The lines of the job pipe, read straight from its descriptor, so the worker can
    tell whether a job waits before it blocks for the next one."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""

    def next(self, when_idle: Callable[[], None] | None = None) -> bytes | None:
        """The next line (None at the end of the pipe); ``when_idle`` runs first if no
        job waits."""
        while b"\n" not in self._buffer:
            if when_idle is not None and not select.select([self._fd], [], [], 0)[0]:
                when_idle()
                when_idle = None
            data = os.read(self._fd, 65536)
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def _exit_when_orphaned(parent: int) -> None:
    # The pool's parent may be SIGKILLed: a worker must not outlive it by much. An
    # idle worker exits at once; a busy one first finishes its job, so that the
    # result is in the store for a client that attaches to the run later, but a
    # job that never ends must not keep the worker forever.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            if _busy.acquire(timeout=orphan_grace()):
                _write_end_markers()
            os._exit(0)


def serve(job_fd: int, event_fd: int) -> None:
    """Run jobs sent by the local backend until it closes the job pipe."""
    threading.Thread(
        target=_exit_when_orphaned, args=(os.getppid(),), daemon=True, name="orphan-check"
    ).start()
    jobs = _JobLines(job_fd)
    events = os.fdopen(event_fd, "wb", buffering=0)

    def send(message: dict[str, Any]) -> None:
        try:
            events.write(json.dumps(message).encode() + b"\n")
        except BrokenPipeError:  # the pool's parent died: nobody is listening
            pass

    hello = json.loads(jobs.next() or b"{}")
    parent_path = hello["sys_path"]
    sys.path[:] = parent_path + [p for p in sys.path if p not in parent_path]
    if hello.get("authkey"):  # Manager proxies passed to calls authenticate with it
        import multiprocessing

        multiprocessing.current_process().authkey = bytes.fromhex(hello["authkey"])
    max_calls = hello.get("max_calls") or 0
    capture = _Capture(own_file=False)
    send({"ready": os.getpid()})
    put_off_since = 0.0

    def write_put_off_markers() -> None:  # under _busy
        _write_end_markers()
        send({"written": True})  # the pool need not write them if this worker dies

    def write_markers() -> None:
        with _busy:
            write_put_off_markers()

    while (line := jobs.next(write_markers if _unwritten else None)) is not None:
        message = json.loads(line)
        if message.get("stop"):
            break
        os.environ.update(message["env"])
        error, fatal = "", False
        deferred: list[EndMarker] = []
        with _busy:
            try:
                run_job(message["args"], message["env"], capture, deferred)
            except BaseException as exc:
                error, fatal = f"{type(exc).__name__}: {exc}", is_fatal(exc)
                traceback.print_exc()
                _flush()
            retire = bool(max_calls) and _calls_run >= max_calls
            # "printed": the pool reads the job's log only when it has text
            send(
                {
                    "done": message["job"],
                    "error": error,
                    "fatal": fatal,
                    "retire": retire,
                    "printed": capture.printed,
                    # Plain data (the message is JSON): the pool checks it with build().
                    "ends": [msgspec.to_builtins(end) for end in deferred],
                }
            )
            if not _unwritten:
                put_off_since = time.monotonic()
            # The end marker, after the pool heard of the end.
            _unwritten.extend((message["env"], end) for end in deferred)
            if time.monotonic() - put_off_since >= END_MARKER_DELAY:
                write_put_off_markers()
        if retire:  # max_tasks_per_child: the pool starts a fresh process in its place
            break
    write_markers()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    faulthandler.enable()
    if argv[:1] == ["--serve"]:
        serve(int(argv[1]), int(argv[2]))
        return 0
    capture = _Capture(own_file=True)
    error, status = "", 0
    try:
        run_job(argv, os.environ, capture)
    except SystemExit as exc:  # bad arguments (argparse said why) or a missing variable
        if isinstance(exc.code, int):
            status = exc.code
        else:
            error = str(exc.code)
    except BaseException as exc:
        error = traceback.format_exc()
        if is_fatal(exc):  # the engine's exit status tells the executor not to retry
            error += f"batchpool: {type(exc).__name__}: {exc}\n"
            status = FATAL_EXIT_CODE
    finally:
        replay = capture.replay
        log = capture.restore()
    if log and replay:  # the engine's own log of the job gets the calls' output too
        os.write(1, log)
    if error:  # the worker's own failure, after the calls' output, on stderr
        sys.stderr.write(error.rstrip("\n") + "\n")
        return status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
