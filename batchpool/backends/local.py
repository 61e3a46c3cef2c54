"""The embedded default: a pool of warm worker processes on this machine.

Each worker is ``python -m batchpool.worker --serve`` and runs exactly the code a
cluster job runs, reading chunks from and writing outcomes to the same store. The
pool only decides which worker runs which job, and tells the executor at once
when a job ends, including when its worker dies.

Concurrency: ``submit``, ``status`` and ``cancel`` are called from the
executor's watcher thread (or the user's); one manager thread reads every
worker's event pipe with a selector. Both sides take ``_lock`` around the job
table, the queue, the worker list and each worker's ``job``.

A worker's death is noticed the moment its process ends, however it ends: the
selector also watches a pidfd of each worker (Linux), which becomes readable
at exit even when a process the user's call forked still holds the worker's
end of the event pipe; elsewhere, the event pipe's end-of-file tells.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import multiprocessing
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batchpool.backends.base import Backend, JobEvent, JobSpec, JobState, Notify, signal_name
from batchpool.errors import BackendError, check_positive_int
from batchpool.processes import WORKER_TOKEN_ENV, new_worker_token

log = logging.getLogger("batchpool")

#: Workers that exit by themselves before they are ready, this many times in a row for the
#: same reason (an import error, a bad interpreter), stop the pool from trying: the jobs
#: queued then fail with the last one's output. A later submit tries again.
MAX_START_FAILURES = 3
#: The longest pause before new workers start after workers died before they were ready
#: (killed from outside, by the out-of-memory killer or a chaos test): the pool keeps
#: trying, more slowly, and never gives up on such deaths.
MAX_RESPAWN_DELAY = 2.0
#: Seconds ``close`` lets idle workers take to exit before it kills them.
CLOSE_GRACE = 2.0
#: How many finished jobs the pool remembers the state of for ``status``.
FINISHED_MEMORY = 100_000
LOG_TAIL_LINES = 40  # a fatal error's stack dump, from its first line
LOG_TAIL_BYTES = 8192


# The folder batchpool is imported from. Workers of the same interpreter find an
# installed batchpool by themselves; a source checkout must be put on their path,
# but site-packages must never be put ahead of the standard library.
_HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SOURCE_CHECKOUT = _HERE not in {
    os.path.abspath(p)
    for p in (*site.getsitepackages(), site.getusersitepackages(), *sysconfig.get_paths().values())
}


@dataclass(eq=False)
class _Job:
    id: str
    spec: JobSpec
    notify: Notify | None
    cancelled: bool = False


@dataclass(eq=False)
class _Worker:
    number: int
    proc: subprocess.Popen[bytes]
    job_pipe: int  # we write job messages here
    event_pipe: int  # the worker writes ready/done messages here
    log_path: str
    pidfd: int = -1  # readable once the process has ended (Linux); -1 elsewhere
    buffer: bytes = b""
    ready: bool = False
    gone: bool = False
    job: _Job | None = None
    # The end markers of its ended jobs that it has not said it wrote ("written"): if
    # it dies first, the pool writes them (worker.write_end_markers). Its jobs' env
    # names the run's store and secret.
    unwritten_ends: list[tuple[dict[str, str], list[dict[str, Any]]]] = field(default_factory=list)


class WorkerProcess:
    """One local worker process, with the methods of a ``multiprocessing.Process`` that
    code written for ``ProcessPoolExecutor._processes`` uses."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.pid = proc.pid

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        _signal(self._proc, signal.SIGTERM)

    def kill(self) -> None:
        _signal(self._proc, signal.SIGKILL)

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll()

    def __repr__(self) -> str:
        return f"<batchpool local worker pid={self.pid}>"


def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
    try:
        proc.send_signal(signum)
    except OSError:
        pass


def describe_exit(returncode: int) -> tuple[int | None, int | None, str]:
    """``(exit_code, signal, words)`` for a process's return code."""
    if returncode < 0:
        signum = -returncode
        words = f"killed by {signal_name(signum)} ({signum})"
        if signum == signal.SIGKILL:
            words += "; the out-of-memory killer sends this, so does `kill -9`"
        return None, signum, words
    return returncode, None, f"exited with code {returncode}"


class LocalBackend(Backend):
    """Run jobs in a pool of ``max_workers`` warm processes on this machine.

    ``python`` is the interpreter of the workers (default: this one).
    ``echo_output`` writes each job's captured output to this process's
    ``sys.stdout`` when the job ends, as ``ProcessPoolExecutor`` users expect
    to see their workers' prints; the output is in the run's ``logs/`` either way.
    """

    name = "local"
    notifies = True
    bounded = True
    shares_client_code = True

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        python: str | None = None,
        echo_output: bool = True,
        max_tasks_per_child: int | None = None,
    ) -> None:
        for name, value in (
            ("max_workers", max_workers),
            ("max_tasks_per_child", max_tasks_per_child),
        ):
            if value is not None:
                check_positive_int(name, value)
        # A worker that has run this many calls exits after its job and is replaced.
        self._max_tasks_per_child = max_tasks_per_child
        self._max_workers = max_workers or os.cpu_count() or 1
        self._python = python or sys.executable
        self._echo = echo_output
        self._lock = threading.Lock()
        self._queue: collections.deque[_Job] = collections.deque()
        self._jobs: dict[str, _Job] = {}  # queued and running
        self._finished: collections.OrderedDict[str, JobState] = collections.OrderedDict()
        self._workers: list[_Worker] = []
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._scratch = tempfile.mkdtemp(prefix="batchpool-local-")
        self._thread: threading.Thread | None = None
        self._closing = False
        self._close_deadline = 0.0
        # Why workers cannot start, once MAX_START_FAILURES of them exited by themselves
        # for the same reason before they were ready; cleared by the next submit.
        self._broken = ""
        # Workers that ended before they were ready since one last was: by cause.
        self._start_failures: collections.Counter[str] = collections.Counter()
        self._respawn_at: float | None = None  # when to start the missing workers
        self._dead = ""  # why the manager thread ended unexpectedly

    def max_parallel(self) -> int:
        return self._max_workers

    @property
    def max_workers(self) -> int:
        return self._max_workers

    # -- the contract ---------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        refused: list[_Job] = []
        ids: list[str] = []
        with self._lock:
            if self._closing:
                raise BackendError("this LocalBackend is closed; create a new one to run jobs")
            if self._dead:
                raise BackendError(f"this LocalBackend cannot run jobs: {self._dead}")
            if self._thread is None:
                self._start_locked()
            elif self._broken:  # try once more: the environment may have been mended
                self._broken = ""
                self._start_failures.clear()
            for spec in jobs:
                job = _Job(f"local-{next(self._ids)}", spec, notify)
                ids.append(job.id)
                if self._broken:
                    refused.append(job)
                    continue
                self._jobs[job.id] = job
                self._queue.append(job)
            self._assign_locked()
            if self._respawn_at is None:  # else workers start after their pause
                refused += self._fill_locked()
        for job in refused:
            self._finish(job, JobState.LOST, reason=self._broken)
        return ids

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        with self._lock:
            running = {w.job.id for w in self._workers if w.job is not None}
            for job_id in job_ids:
                if job_id in self._jobs:
                    states[job_id] = JobState.RUNNING if job_id in running else JobState.PENDING
                else:
                    states[job_id] = self._finished.get(job_id, JobState.LOST)
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        wanted = set(job_ids)
        dequeued: list[_Job] = []
        with self._lock:
            for job in list(self._queue):
                if job.id in wanted:
                    self._queue.remove(job)
                    del self._jobs[job.id]
                    dequeued.append(job)
            for worker in self._workers:
                if worker.job is not None and worker.job.id in wanted:
                    worker.job.cancelled = True
                    _kill(worker.proc)  # reported as CANCELLED when its pipe closes
        for job in dequeued:
            self._finish(job, JobState.CANCELLED, reason="cancelled before it started")

    def close(self) -> None:
        """Stop the workers (killing any that still run a job) and the manager thread."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            for job in queued:
                del self._jobs[job.id]
            for worker in self._workers:
                # Ask in words: a process forked from ours since may hold the pipe open.
                _send(worker, {"stop": True})
                _close_fd(worker.job_pipe)
                worker.job_pipe = -1
                if worker.job is not None:
                    worker.job.cancelled = True
                    _kill(worker.proc)
            self._close_deadline = time.monotonic() + CLOSE_GRACE
            thread = self._thread
        for job in queued:
            self._finish(job, JobState.CANCELLED, reason="the local backend was closed")
        if thread is not None:
            os.write(self._wake_w, b"x")
            thread.join()
        if thread is None or self._dead:  # no manager thread released what the pool holds
            self._release()

    # -- workers --------------------------------------------------------------------------

    def _start_locked(self) -> None:
        # One worker now (an interpreter that cannot start fails this submit); the
        # others as jobs wait for them, as ProcessPoolExecutor starts processes only
        # when no idle one can take the call. Once started, a worker stays, warm.
        self._spawn_locked()
        self._thread = threading.Thread(target=self._manage, name="batchpool-local", daemon=True)
        self._thread.start()

    def _fill_locked(self) -> list[_Job]:
        """Start the workers that queued jobs wait for, up to ``max_workers``; the queued
        jobs to fail if the pool cannot start workers at all (``_broken``)."""
        self._respawn_at = None
        while len(self._workers) < self._wanted_locked() and not self._broken:
            try:
                self._spawn_locked()
            except BackendError as exc:
                # No such interpreter: no retry mends that. Out of processes, memory or
                # descriptors: it may pass, so a few more tries, each after a longer pause.
                cause = f"{type(exc.__cause__).__name__}: {exc.__cause__}"
                self._start_failures[cause] += 1
                missing = (FileNotFoundError, PermissionError, NotADirectoryError)
                if (
                    isinstance(exc.__cause__, missing)
                    or self._start_failures[cause] >= MAX_START_FAILURES
                ):
                    self._broken = str(exc)
                else:
                    self._schedule_fill_locked()
                    return []
        if not self._broken:
            return []
        broken = list(self._queue)
        self._queue.clear()
        for queued in broken:
            del self._jobs[queued.id]
        return broken

    def _wanted_locked(self) -> int:
        """How many workers the pool needs now: one per running or queued job."""
        running = sum(w.job is not None for w in self._workers)
        return min(self._max_workers, running + len(self._queue))

    def processes(self) -> dict[int, WorkerProcess]:
        """The worker processes, by pid (what ``ProcessPoolExecutor._processes`` holds)."""
        with self._lock:
            return {w.proc.pid: WorkerProcess(w.proc) for w in self._workers if not w.gone}

    def _schedule_fill_locked(self) -> None:
        """Start the missing workers after a pause that grows with the workers that
        ended before they were ready, one after another."""
        early = sum(self._start_failures.values())
        delay = 0.0 if not early else min(MAX_RESPAWN_DELAY, 0.05 * 2 ** (early - 1))
        at = time.monotonic() + delay
        if self._respawn_at is None or at < self._respawn_at:
            self._respawn_at = at
        if self._thread is not None and threading.current_thread() is not self._thread:
            os.write(self._wake_w, b"x")

    def _spawn_locked(self) -> None:
        number = next(self._numbers)
        job_r, job_w = os.pipe()
        event_r, event_w = os.pipe()
        log_path = os.path.join(self._scratch, f"worker-{number}.log")
        # The token tells this worker from any other process (see processes.py).
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{WORKER_TOKEN_ENV: new_worker_token()})
        if _SOURCE_CHECKOUT:  # the worker must import batchpool before it learns our sys.path
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_HERE, env.get("PYTHONPATH")]))
        try:
            with open(log_path, "a+b") as log:
                proc = subprocess.Popen(
                    [self._python, "-m", "batchpool.worker", "--serve", str(job_r), str(event_w)],
                    pass_fds=(job_r, event_w),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=os.getcwd(),
                    start_new_session=True,  # a Ctrl-C in the terminal is the client's to handle
                )
        except OSError as exc:
            for fd in (job_r, job_w, event_r, event_w):
                os.close(fd)
            raise BackendError(
                f"cannot start a local worker with python={self._python!r}: {exc}"
            ) from exc
        os.close(job_r)
        os.close(event_w)
        os.set_blocking(event_r, False)
        worker = _Worker(number, proc, job_w, event_r, log_path, pidfd=_pidfd(proc.pid))
        self._workers.append(worker)
        self._selector.register(event_r, selectors.EVENT_READ, (worker, False))
        if worker.pidfd >= 0:
            self._selector.register(worker.pidfd, selectors.EVENT_READ, (worker, True))
        hello = {
            "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
            # multiprocessing's key, so that Manager proxies passed to calls connect back;
            # through the pipe, not the environment, which other programs may read.
            "authkey": bytes(multiprocessing.current_process().authkey).hex(),
            "max_calls": self._max_tasks_per_child,
        }
        _send(worker, hello)

    def _assign_locked(self) -> None:
        for worker in self._workers:
            if not self._queue:
                return
            if worker.ready and worker.job is None and worker.job_pipe >= 0:
                job = self._queue.popleft()
                # Assign before sending: its "done" may be read the moment it is sent.
                worker.job = job
                env = job.spec.environment()
                message = {"job": job.id, "args": list(job.spec.args), "env": env}
                if not _send(worker, message):  # it died; _on_exit will clean it up
                    worker.job = None
                    worker.ready = False
                    self._queue.appendleft(job)
                elif job.notify is not None:  # it left the queue: the job runs
                    job.notify(JobEvent(job.id, JobState.RUNNING))

    def _manage(self) -> None:
        try:
            self._manage_workers()
        except BaseException as exc:  # never leave a job waiting on a dead thread
            log.exception("batchpool: the local pool's manager thread failed")
            self._fail_everything(f"the local pool's manager thread failed: {exc!r}")
            raise

    def _fail_everything(self, reason: str) -> None:
        """The manager thread died: no job will be started or reported again."""
        with self._lock:
            self._dead = reason
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._queue.clear()
            for worker in self._workers:
                _kill(worker.proc)
        for job in jobs:
            self._finish(job, JobState.LOST, reason=reason)

    def _manage_workers(self) -> None:
        while True:
            timeout = None
            if self._closing:
                timeout = max(0.0, self._close_deadline - time.monotonic())
            elif self._respawn_at is not None:
                timeout = max(0.0, self._respawn_at - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    os.read(self._wake_r, 512)
                    continue
                worker, exited = key.data
                if worker.gone:
                    continue
                if exited:  # the process ended: read what it said last, then bury it
                    self._on_readable(worker)
                    self._on_exit(worker)
                elif not self._on_readable(worker):
                    self._on_exit(worker)
            refused: list[_Job] = []
            with self._lock:
                if self._closing and not self._workers:
                    break
                if self._closing and time.monotonic() >= self._close_deadline:
                    for worker in self._workers:
                        _kill(worker.proc)
                due = self._respawn_at is not None and time.monotonic() >= self._respawn_at
                if due and not self._closing:
                    refused = self._fill_locked()
            for job in refused:
                self._finish(job, JobState.LOST, reason=self._broken)
        self._release()

    def _on_readable(self, worker: _Worker) -> bool:
        """Handle what the worker wrote; False at end-of-file."""
        try:
            data = os.read(worker.event_pipe, 65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "ready" in message:
                with self._lock:
                    worker.ready = True
                    self._start_failures.clear()
                    self._assign_locked()
            elif "written" in message:
                worker.unwritten_ends.clear()
            elif "done" in message:
                job = worker.job
                if message.get("ends") and job is not None:
                    worker.unwritten_ends.append((job.spec.env, message["ends"]))
                if message.get("retire"):  # it exits now (max_tasks_per_child): no new job
                    with self._lock:
                        _close_fd(worker.job_pipe)
                        worker.job_pipe = -1
                self._on_done(
                    worker,
                    message.get("error", ""),
                    bool(message.get("fatal")),
                    printed=message.get("printed", True),
                )
        return True

    def _on_done(
        self, worker: _Worker, error: str, fatal: bool = False, *, printed: bool = True
    ) -> None:
        # The log first: the next job sent to this worker starts by emptying it.
        log = _read(worker.log_path) if (error or (self._echo and printed)) else b""
        with self._lock:
            job, worker.job = worker.job, None
            if job is not None:
                del self._jobs[job.id]
            self._assign_locked()  # the next job first: the worker waits for it
        if job is None:
            return
        if self._echo and log:
            _echo(log)
        if fatal:  # the worker says a retry would fail the same way
            self._finish(job, JobState.FAILED, reason=error, log=log, fatal=True)
        elif error:
            self._finish(job, JobState.FAILED, reason=f"the worker failed: {error}", log=log)
        else:
            self._finish(job, JobState.SUCCEEDED)

    def _on_exit(self, worker: _Worker) -> None:
        worker.gone = True
        # Under the lock: a worker that exits at once can be seen here while the
        # thread that spawned it (holding the lock) has not yet registered its pidfd.
        with self._lock:
            for fd in (worker.event_pipe, worker.pidfd):
                if fd >= 0:
                    self._selector.unregister(fd)
                    _close_fd(fd)
        returncode = worker.proc.wait()
        log = _read(worker.log_path)
        try:
            os.unlink(worker.log_path)
        except OSError:
            pass
        exit_code, signum, words = describe_exit(returncode)
        if worker.unwritten_ends and not self._closing:
            # Killed by a later job (a segfault, the OOM killer) before it wrote the end
            # markers of jobs it had ended: written here, before that job is reported
            # lost. Not once closing: the run's storage may be deleted by then.
            _write_end_markers(worker.unwritten_ends)
        broken: list[_Job] = []
        with self._lock:
            _close_fd(worker.job_pipe)
            worker.job_pipe = -1
            self._workers.remove(worker)
            job = worker.job
            if job is not None:
                del self._jobs[job.id]
            if not worker.ready and not self._closing:
                # Ended before it was ready. Killed by a signal (the out-of-memory killer,
                # `kill`): the next may start, so the pool keeps trying, with a pause. Exited
                # by itself (an import error): the same cause again and again means workers
                # cannot start here, and the queued jobs fail with its output.
                self._start_failures[words] += 1
                if signum is None and self._start_failures[words] >= MAX_START_FAILURES:
                    self._broken = (
                        f"local worker processes ({self._python} -m batchpool.worker) exit "
                        f"before they are ready: the last {MAX_START_FAILURES} {words}. Its "
                        f"output:\n{_tail(log)}\nCheck that batchpool imports with that "
                        "interpreter"
                    )
                    broken = list(self._queue)
                    self._queue.clear()
                    for queued in broken:
                        del self._jobs[queued.id]
            if not self._closing and not self._broken:
                self._schedule_fill_locked()
        if job is not None:
            state = JobState.CANCELLED if job.cancelled else JobState.LOST
            self._finish(job, state, exit_code, signum, f"its worker process {words}", log)
        for queued in broken:
            self._finish(queued, JobState.LOST, reason=self._broken)

    def _finish(
        self,
        job: _Job,
        state: JobState,
        exit_code: int | None = None,
        signum: int | None = None,
        reason: str = "",
        log: bytes = b"",
        fatal: bool = False,
    ) -> None:
        with self._lock:
            self._finished[job.id] = state
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
        if job.notify is not None:
            job.notify(JobEvent(job.id, state, exit_code, signum, reason, _tail(log), fatal))

    def _release(self) -> None:
        for worker in list(self._workers):
            _kill(worker.proc)
            worker.proc.wait()
        self._selector.close()
        _close_fd(self._wake_r)
        _close_fd(self._wake_w)
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __repr__(self) -> str:
        return f"LocalBackend(max_workers={self._max_workers})"


def _write_end_markers(unwritten: list[tuple[dict[str, str], list[dict[str, Any]]]]) -> None:
    from batchpool.worker import write_end_markers  # the worker's module: not at import

    for env, ends in unwritten:
        try:
            write_end_markers(env, ends)
        except Exception as exc:  # they tell people how jobs went: never fail the pool
            log.warning("batchpool: could not write the end markers a worker left: %s", exc)


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: the event pipe's end-of-file tells
        return -1


def _send(worker: _Worker, message: dict[str, Any]) -> bool:
    try:
        os.write(worker.job_pipe, json.dumps(message).encode() + b"\n")
    except OSError:
        return False
    return True


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.kill()
    except OSError:
        pass


def _close_fd(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _tail(log: bytes) -> str:
    text = log[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")
    return "\n".join(text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:])


def _echo(log: bytes) -> None:
    try:
        sys.stdout.write(log.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):
        pass  # no usable stdout (closed at exit, or none): the log is in the store anyway
