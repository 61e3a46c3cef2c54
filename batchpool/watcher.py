"""The one thread of an executor: it dispatches chunks, and decides what happens when
their jobs end (retry, give up, break). ``completion.py`` completes the futures from the
outcomes, ``journal.py`` records the jobs in storage.

State machine of a call::

    queued (CallGroup in _pending) --dispatch--> in flight (Chunk in _inflight, job running)
        --job ends with an outcome--> future done
        --job ends without one--> retried (new attempt) or future fails with WorkerLostError

Only this thread touches ``_inflight`` and ``_retry``; callers touch ``_pending``
and ``_parked`` under ``_lock`` (``enqueue``, ``cancel_pending``). Everything else reaches the
thread through ``_events``: job events pushed by the backend, and wake-ups.

A call's future is marked running when its chunk is handed to the backend, as
the stdlib marks a call running when it enters the process pool's call queue, or
at once when it is enqueued while a slot is free (``enqueue``: the stdlib's call
queue holds max_workers + 1); until then ``cancel()`` succeeds and the call never
runs. A chunk member is one call's future, or a ``MapBatch`` standing for all the
calls of a map chunk (``Chunk.spans``). At most ``in_flight``
chunks are handed to the backend at once: ``capacity`` (jobs that may run), or
twice that for a backend that queues jobs itself, so no worker idles between jobs.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from batchpool.backends.base import THREAD_ENV, Backend, JobEvent, JobSpec, JobState, Resources
from batchpool.budget import FailureBudget
from batchpool.chunking import coalesce_target
from batchpool.chunks import Adopted, CallGroup, Chunk
from batchpool.completion import Completion, storage_error
from batchpool.culprits import (
    DEATHS,
    PIECE_OF,
    SPLIT_FROM,
    halves,
    input_skips,
    piece_groups,
    piece_members,
    wanted_calls,
)
from batchpool.errors import (
    BatchPoolError,
    InitializerError,
    StorageError,
    WorkerLostError,
    fatal_error,
)
from batchpool.future import JOB_STATES, BatchPoolFuture, JobRecord, width
from batchpool.journal import RunJournal
from batchpool.outage import (
    DEFAULT_GRACE,
    QUERY_HANG,
    EngineOutage,
    StatusAnswer,
    StatusQuery,
    is_unreachable,
)
from batchpool.processes import is_our_worker
from batchpool.runs import Usage
from batchpool.serialization import (
    Group,
    Serializer,
    decode_chunk,
    encode_chunk,
    seal,
    unseal,
)
from batchpool.store import Store

log = logging.getLogger("batchpool")

_WAKE = object()
_CANCEL_QUEUED = object()
#: Seconds between status queries when the backend pushes job events anyway.
SAFETY_POLL = 5.0
#: Status polling for backends without events: fast while jobs end, backing off when idle.
POLL_MIN, POLL_MAX = 0.05, 2.0
#: How often, at most, a client with jobs in flight looks for ``cancel.json`` (seconds).
CANCEL_CHECK = 10.0
#: How often the chunks of an attached run that old workers still run are checked.
ORPHAN_POLL = 0.5
#: Longest pause between two looks in the store for the outcomes of jobs whose states
#: are unknown, and the time per job in flight that the pause grows by (seconds).
STORE_LOOK_MAX, STORE_LOOK_PER_JOB = 2.0, 0.02


class Watcher:
    def __init__(
        self,
        *,
        store: Store,
        backend: Backend,
        owns_backend: bool,
        serializer: Serializer,
        secret: bytes,
        header: dict[str, Any],
        job_env: dict[str, str],
        resources: Resources,
        run_name: str,
        capacity: int,
        in_flight: int,
        max_attempts: int,
        cleanup: bool,
        max_poll_interval: float | None = None,
        engine_outage_grace: float = DEFAULT_GRACE,
        cost_per_core_hour: float | None = None,
        memory_per_core: float | None = None,
        next_chunk: int = 0,
        next_journal: int = 0,
        adopted: Sequence[Adopted] = (),
        on_cleanup: Callable[[], None] | None = None,
        isolate_culprits: bool = True,
    ) -> None:
        self.store = store
        self.backend = backend
        self._owns_backend = owns_backend
        self._serializer = serializer
        self._secret = secret
        self._header = header
        self._job_env = job_env
        self._resources = resources
        self._run_name = run_name
        self.capacity = capacity
        self._limit = in_flight
        self._max_attempts = max_attempts
        self._isolate_culprits = isolate_culprits
        self._cleanup = cleanup
        self._lock = threading.Lock()
        self._pending: collections.deque[CallGroup] = collections.deque()
        # Groups marked started by enqueue and not yet in flight; of them, in _pending.
        self._claimed = 0
        self._claimed_pending = 0
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight: dict[str, Chunk] = {}  # job id -> chunk
        self._retry: collections.deque[Chunk] = collections.deque()
        # Chunks written ahead, waiting for a free slot: a backlog lives in the store,
        # not only in this process, so a client that dies loses no call (see attach).
        self._parked: collections.deque[Chunk] = collections.deque()
        # cancel_pending() counts up; a backlog taken before it and parked after it
        # (its input is written in between) is cancelled as it is parked.
        self._cancel_epoch = 0
        self._stopping = False
        self._poll_ceiling = POLL_MAX if max_poll_interval is None else max_poll_interval
        self._poll_interval = SAFETY_POLL if backend.notifies else POLL_MIN
        self._next_poll = time.monotonic() + self._poll_interval
        # The engine's states come from a thread of their own; when it cannot be asked,
        # the clock of the outage runs and the store tells what finished (outage.py).
        # Submissions have a clock of their own: a status query that answers says
        # nothing of an sbatch that keeps timing out.
        self._outage = EngineOutage(grace=engine_outage_grace)
        self._submit_outage = EngineOutage(
            grace=engine_outage_grace,
            consequence="the jobs wait in the store to be handed over again, and fail",
        )
        self._status_query = StatusQuery(backend, self._events.put)
        self._next_store_look = 0.0
        self._next_chunk = next_chunk  # chunk ids start with this run-wide sequence number
        self._journal = RunJournal(store, secret, next_journal, memory_per_core)
        self._orphans: dict[str, Chunk] = {}  # adopted chunks whose jobs died with a client
        self._adopted = list(adopted)
        self._on_cleanup = on_cleanup
        #: ``max_failures`` budgets exceeded, not yet acted on (``_stop_for_budget``).
        self._tripped: list[FailureBudget] = []
        self._completion = Completion(
            store=store,
            secret=secret,
            serializer=serializer,
            journal=self._journal,
            on_initializer_failed=self._break,
            on_budget_exceeded=self._tripped.append,
            cost_per_core_hour=cost_per_core_hour,
            memory_per_core=memory_per_core,
        )
        self._resumed = 0  # calls that returned in an earlier session (callers' threads)
        self._cancelled_pending = 0  # calls cancel_pending cancelled (callers' threads)
        self._cancel_requested = False  # cancel.json seen: stop retrying and dispatching
        #: Why the executor is broken (its initializer failed), as the stdlib's pool breaks.
        self.broken: BaseException | None = None
        self._next_cancel_check = time.monotonic() + CANCEL_CHECK
        self._thread = threading.Thread(target=self._run, name="batchpool-watcher", daemon=True)
        self._thread.start()

    # -- called from other threads --------------------------------------------------------

    def enqueue(self, group: CallGroup) -> None:
        with self._lock:
            if self.broken is not None:
                raise self.broken_error()
            if self._stopping:
                raise RuntimeError("cannot schedule new futures after shutdown")
            for budget in group.budgets:
                if budget.tripped:
                    raise budget.error()
            # A call handed to an idle pool counts as started at once, as the stdlib's
            # call queue marks it (max_workers + 1 calls): shutdown(cancel_futures=True)
            # right after then cancels only what a stdlib pool would not have started.
            # In order only: not while an earlier group waits unstarted.
            slots = min(self._limit, self.capacity + 1) - len(self._inflight) - self._claimed
            if slots > 0 and self._claimed_pending == len(self._pending) and not self._parked:
                for future in group.futures:
                    future._start()
                group.started = True
                self._claimed += 1
                self._claimed_pending += 1
            was_empty = not self._pending
            self._pending.append(group)
        if was_empty:  # otherwise a wake-up is on its way, or a job's end will come
            self._events.put(_WAKE)

    def cancel_pending(self) -> None:
        """Cancel every call not yet handed to the backend."""
        with self._lock:
            self._cancel_epoch += 1
            groups = [group for group in self._pending if not group.started]  # not claimed
            started = [group for group in self._pending if group.started]
            self._pending.clear()
            self._pending.extend(started)  # running already: they run
        cancelled = 0
        for group in groups:
            for future in group.futures:
                cancelled += width(future) if future.cancel() else 0
        with self._lock:  # parked chunks: their calls are skipped when handed over
            parked = [f for chunk in self._parked for f in chunk.futures if f is not None]
        for future in parked:
            future.cancel()  # counted when the chunk is handed over
        with self._lock:
            self._cancelled_pending += cancelled
        self._events.put(_WAKE)

    def cancel_queued(self) -> None:
        """Cancel the jobs the engine still queues, with their calls (shutdown's cancel)."""
        self._events.put(_CANCEL_QUEUED)

    def _cancel_one(self, record: JobRecord, future: BatchPoolFuture) -> bool:
        """``future.cancel()`` of a call handed to an engine: True if its job was dropped
        before it started. A job runs its whole chunk, so only a call alone in its
        chunk can be cancelled this way. Runs in the caller's thread."""
        # One dict lookup (atomic) of the job the watcher thread has in flight.
        chunk = self._inflight.get(record.job_ids[-1]) if record.job_ids else None
        if chunk is None or [f for f in chunk.futures if f is not None] != [future]:
            return False
        if self._outage.active or self._status_query.busy_for() > self._poll_ceiling:
            return False  # the engine cannot tell now whether the job started
        try:
            if self.backend.status([chunk.job_id]).get(chunk.job_id) is not JobState.PENDING:
                return False
            self.backend.cancel([chunk.job_id])
        except Exception:
            return False
        return future._cancel_queued()

    def _cancel_queued_jobs(self) -> None:
        if self.backend.bounded:
            return
        for job_id in self._queued_jobs(list(self._inflight)):
            for future in self._inflight[job_id].futures:
                if future is not None:
                    future._cancel_queued()

    def status(self, timeout: float = 30.0) -> dict[str, int]:
        """Calls by job state (``JOB_STATES``), as the watcher thread sees them now."""
        # In the watcher thread itself (a future's done-callback) it answers at once;
        # once it ended, every call has ended too.
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return self._count_calls()
        request = _Request("status")
        self._events.put(request)
        return dict(request.wait(timeout))

    def counts_in_own_thread(self) -> dict[str, int] | None:
        """``status()`` without a round trip, when called from the watcher thread
        (from a future's done-callback); None from any other thread."""
        if threading.current_thread() is not self._thread:
            return None
        return self._count_calls()

    def note_rerun(self, chunk_ids: list[str]) -> None:
        """Journal that calls which failed in these earlier jobs are submitted again."""
        self._journal.add(rerun=chunk_ids)

    def count_resumed(self) -> None:
        """A call of a resumed run returned its earlier result without running."""
        with self._lock:  # not _ended, which only the watcher thread changes
            self._resumed += 1

    def seconds_per_call(self, label: str) -> float | None:
        """What a call of the function ``label`` took in its last job, if one ended."""
        return self._completion.seconds_per_call.get(label)

    def usage(self) -> Usage:
        """What the jobs that ended so far used (a copy)."""
        return self._completion.usage_copy()

    def stop(self) -> None:
        """No more calls will come: finish what is in flight, clean up, and end."""
        with self._lock:
            self._stopping = True
        self._events.put(_WAKE)

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def notify_cancelled(self, future: BatchPoolFuture) -> None:
        """A call's future was cancelled: the watcher marks it notified, as the stdlib's
        executor does, so that a ``wait`` begun after the cancel returns."""
        self._events.put(_Notified(future))

    def notify(self, event: JobEvent) -> None:
        """The backend's callback: a job's state changed."""
        self._events.put(event)

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._adopt()
            while True:
                self._dispatch()
                if (self._inflight or self._orphans) and time.monotonic() >= self._next_poll:
                    self._poll()
                    continue  # jobs it found ended freed slots: dispatch before waiting
                with self._lock:
                    idle = not (self._pending or self._parked or self._inflight or self._retry)
                    if self._stopping and idle and not self._orphans:
                        break
                self._wait_for_events()
        except BaseException as exc:  # never leave a future waiting on a dead thread
            log.exception("batchpool watcher failed; failing every unfinished call")
            self._fail_everything(exc)
        finally:
            self._close()

    def _wait_for_events(self) -> None:
        timeout: float | None = None
        if self._inflight or self._orphans:
            timeout = max(0.0, self._next_poll - time.monotonic())
        if self._submit_outage.held() and (self._retry or self._pending or self._parked):
            retry_in = max(0.0, self._submit_outage.retry_at - time.monotonic())  # held
            timeout = retry_in if timeout is None else min(timeout, retry_in)
        flush_in = self._journal.flush_due_in()  # never now: a job's end would wait
        if flush_in == 0.0:
            self._journal.flush()
        elif flush_in is not None:
            timeout = flush_in if timeout is None else min(timeout, flush_in)
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if isinstance(item, JobEvent):
                self._on_event(item)
            elif isinstance(item, StatusAnswer):
                self._on_states(item)
            elif item is _CANCEL_QUEUED:
                self._cancel_queued_jobs()
            elif isinstance(item, _Request):
                item.answer(self._count_calls())
            elif isinstance(item, _Notified):
                item.future.set_running_or_notify_cancel()
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self) -> None:
        while self._tripped:
            self._stop_for_budget(self._tripped.pop(0))
        if self._cancel_requested:
            return
        if self._submit_outage.held():  # the engine cannot be reached: try at retry_at
            self._park_backlog()
            return
        ready: list[Chunk] = []
        while self._retry and len(self._inflight) + len(ready) < self._limit:
            ready.append(self._retry.popleft())
        while len(self._inflight) + len(ready) < self._limit:
            with self._lock:  # one step with cancel_pending's look at _parked
                parked = self._parked.popleft() if self._parked else None
                live = parked is not None and self._start_parked(parked)
            if parked is None:
                break
            if live:
                ready.append(parked)
            else:
                reason = "every call was cancelled before the job was handed over"
                self._journal.given_up(parked, "Cancelled", reason)
        while len(self._inflight) + len(ready) < self._limit:
            groups = self._take_groups(len(ready))
            if not groups:
                break
            chunk = self._make_chunk(groups)
            if chunk is not None:
                ready.append(chunk)
                if self.backend.bounded and len(self._inflight) < self.capacity:
                    # A worker of the pool is idle: it starts on this chunk while the
                    # next ones are written (an engine gets them together: one array job).
                    self._submit(ready)
                    ready = []
        if ready:
            self._submit(ready)
        self._park_backlog()

    def _park_backlog(self) -> None:
        """Write the calls that wait for a free slot into chunks now."""
        while True:
            with self._lock:
                epoch = self._cancel_epoch
            groups = self._take_groups(0, start=False)
            if not groups:
                return
            chunk = self._make_chunk(groups)
            if chunk is None:
                continue
            with self._lock:
                cancelled = epoch != self._cancel_epoch
                if not cancelled:
                    self._parked.append(chunk)
            if cancelled:  # cancel_pending ran while the chunk was being written
                for i, (future, _, n) in enumerate(chunk.spans()):
                    if future is not None and future.cancel():
                        chunk.futures[i] = None
                        self._completion.ended["Cancelled"] += n
                chunk.set_state("Cancelled")
                self._journal.given_up(chunk, "Cancelled", "cancelled before it was handed over")

    def _start_parked(self, chunk: Chunk) -> bool:
        """Mark a parked chunk's calls running as it is handed over; False when every
        call was cancelled while it waited (the chunk is dropped). Under ``_lock``."""
        for i, (future, first, n) in enumerate(chunk.spans()):
            if future is not None and not future._start() and future.cancelled():
                chunk.futures[i] = None
                chunk.late_skip.extend(range(first, first + n))
                self._completion.ended["Cancelled"] += n
        if any(f is not None for f in chunk.futures):
            return True
        chunk.set_state("Cancelled")
        return False

    def _take_groups(self, readied: int, start: bool = True) -> list[tuple[CallGroup, list[int]]]:
        """The next chunk's groups, with the indices of calls cancelled meanwhile.

        ``start`` marks the calls running (they are handed to the backend now);
        otherwise they are parked and stay cancellable."""
        taken: list[tuple[CallGroup, list[int]]] = []
        with self._lock:
            if not self._pending:
                return taken
            free = max(0, self._limit - len(self._inflight) - readied) if start else 0
            target = coalesce_target(len(self._pending), free, self._limit)
            n_calls = 0
            while self._pending and n_calls < target:
                group = self._pending[0]
                if taken and (
                    group.fixed
                    or taken[0][0].fixed
                    or group.resources != taken[0][0].resources
                    or group.budgets != taken[0][0].budgets
                    # Claimed calls run now; joining them would start the others early.
                    or group.started != taken[0][0].started
                ):
                    break
                self._pending.popleft()
                if group.started:
                    self._claimed_pending -= 1
                # Members cancelled meanwhile (a claimed group's are running: never).
                if start:
                    skip = [
                        i for i, f in enumerate(group.futures) if not f._start() and f.cancelled()
                    ]
                else:
                    skip = [i for i, f in enumerate(group.futures) if f.cancelled()]
                self._completion.ended["Cancelled"] += sum(width(group.futures[i]) for i in skip)
                if len(skip) < len(group.futures):
                    taken.append((group, skip))
                    n_calls += group.n_calls
        return taken

    def _make_chunk(self, taken: list[tuple[CallGroup, list[int]]]) -> Chunk | None:
        if not taken:
            return None
        chunk = self._new_chunk([], [], taken[0][0].resources or self._resources)
        chunk.claimed = sum(group.started for group, _ in taken)
        chunk.budgets = taken[0][0].budgets
        groups: list[Group] = []
        keys: list[str] = []
        for group, skip in taken:
            n_calls = group.n_calls
            keys.extend(group.keys or [""] * n_calls)
            skipped = set(skip)
            chunk.futures.extend(None if i in skipped else f for i, f in enumerate(group.futures))
            chunk.widths.extend(width(f) for f in group.futures)
            skipped_calls: list[int] = []
            first = 0
            for i, future in enumerate(group.futures):
                if i in skipped:
                    skipped_calls.extend(range(first, first + width(future)))
                else:
                    future._job = chunk.record
                first += width(future)
            chunk.labels.append(group.label)
            groups.append((n_calls, group.payload, tuple(skipped_calls)))
        try:
            # Content keys only in resume=True runs: no list of empty ones to pickle
            header = {**self._header, "labels": chunk.labels, "keys": keys if any(keys) else []}
            self._write_input(chunk, header, groups)
        except Exception as exc:
            self._release(chunk)
            self._completion.fail(chunk, storage_error("write the input of", chunk, exc))
            return None
        return chunk

    def _new_chunk(self, futures: list[Any], labels: list[str], resources: Resources) -> Chunk:
        """A chunk with the run's next id and a job record for its calls."""
        chunk = Chunk(Store.chunk_id(self._next_chunk), futures, labels, resources)
        self._next_chunk += 1
        chunk.record = JobRecord(self.store, chunk.id)
        if not self.backend.bounded:  # an engine with a queue: a queued job can be dropped
            chunk.record.canceller = self._cancel_one
        return chunk

    def _write_input(self, chunk: Chunk, header: dict[str, Any], groups: list[Group]) -> None:
        key = self.store.chunk_key(chunk.id)
        self.store.put(key, seal(self._secret, key, encode_chunk(header, groups)))

    def _release(self, chunk: Chunk) -> None:
        """The claimed calls of a chunk are in flight now (or failed): free their claim."""
        if chunk.claimed:
            with self._lock:
                self._claimed -= chunk.claimed
            chunk.claimed = 0

    def _submit(self, chunks: list[Chunk]) -> None:
        specs = [self._job_spec(chunk) for chunk in chunks]
        try:
            job_ids = self.backend.submit(specs, self.notify)
        except Exception as exc:
            for chunk in chunks:
                self._release(chunk)
            if is_unreachable(exc) and not self._submit_outage.expired():
                # The engine cannot be reached now: the same jobs are handed over again
                # once it answers, within engine_outage_grace.
                self._submit_outage.failed(f"{self.backend!r}.submit", exc)
                self._retry.extendleft(reversed(chunks))
                return
            outage = self._submit_outage
            outage_text = f" ({outage.describe()})" if outage.active else ""
            for chunk in chunks:
                self._completion.fail(
                    chunk,
                    BatchPoolError(
                        f"{self.backend!r} could not start the job for {chunk.describe()} "
                        f"(chunk {chunk.id}): {type(exc).__name__}: {exc}{outage_text}"
                    ),
                )
            return
        self._submit_outage.answered()
        for chunk, job_id in zip(chunks, job_ids, strict=True):
            chunk.job_id = job_id
            if chunk.record is not None:
                chunk.record.attempt = chunk.attempt
                chunk.record.job_ids.append(job_id)
            chunk.set_state("Ready")
            self._inflight[job_id] = chunk
            self._release(chunk)
        # What a client that attaches after this one died needs: which jobs exist. The
        # local pool's job ids die with this client: that entry may come a little later.
        retried = any(chunk.attempt > 1 for chunk in chunks)
        put_off = not (self.backend.job_ids_outlive_client or retried)
        self._journal.handed(chunks, put_off=put_off)

    def _job_spec(self, chunk: Chunk) -> JobSpec:
        threads = str(max(1, int(chunk.resources.cpus)))
        args = ["--chunk", chunk.id, "--attempt", str(chunk.attempt)]
        if chunk.late_skip:
            args += ["--skip", ",".join(map(str, chunk.late_skip))]
        return JobSpec(
            name=f"{self._run_name}-{chunk.id[:8]}-{chunk.attempt}",
            args=tuple(args),
            env={**self._job_env, **dict.fromkeys(THREAD_ENV, threads)},
            resources=chunk.resources,
        )

    def _poll(self) -> None:
        """Ask the backend, in one query, for the state of every job in flight (the
        answer comes back as a ``StatusAnswer`` event); while the engine cannot be
        asked, or its answer is slow, look in the store for the jobs that finished."""
        if not self._cancel_requested and time.monotonic() >= self._next_cancel_check:
            # `batchpool cancel` from a machine that cannot reach the engine leaves
            # only cancel.json: one existence check every CANCEL_CHECK seconds.
            self._next_cancel_check = time.monotonic() + CANCEL_CHECK
            if self._cancel_marked():
                self._on_cancel_request()
        ended = self._check_orphans()
        query = self._status_query
        if self._inflight and not query.busy and not self._outage.held():
            query.ask(list(self._inflight))
        elif query.busy and not query.counted_hung and query.busy_for() >= QUERY_HANG:
            query.counted_hung = True  # a hung command counts as "cannot ask"
            hung = f"it has not answered for {query.busy_for():.0f} s"
            self._outage.failed(f"{self.backend!r}.status", hung, since=query.asked_at)
        if self._outage.active or query.busy_for() > self._poll_ceiling:
            ended += self._look_in_store()
        if self._outage.expired() and self._inflight:
            self._give_up_unreachable()
        self._schedule_poll(ended, back_off=False)  # the answer backs off, if it must

    def _schedule_poll(self, ended: int, *, back_off: bool = True) -> None:
        if not self.backend.notifies:
            if ended:
                self._poll_interval = POLL_MIN
            elif back_off:
                self._poll_interval = min(self._poll_ceiling, self._poll_interval * 2)
        interval = min(self._poll_interval, ORPHAN_POLL) if self._orphans else self._poll_interval
        if self._outage.active:  # the store look, and the next try, are what is due
            interval = min(max(interval, self._outage.retry_at - time.monotonic()), STORE_LOOK_MAX)
        self._next_poll = time.monotonic() + max(interval, 0.0)

    def _on_states(self, answer: StatusAnswer) -> None:
        """The answer of a status query: jobs that ended are collected."""
        self._status_query.answered(answer)
        if answer.error is not None:
            self._outage.failed(f"{self.backend!r}.status", answer.error)
            self._schedule_poll(0)
            return
        self._outage.answered()
        ended = 0
        for job_id, state in answer.states.items():
            chunk = self._inflight.get(job_id)
            if chunk is None:  # ended meanwhile (an event, the store)
                continue
            if state is JobState.RUNNING and chunk.state == "Ready":
                chunk.set_state("Running")
            if state.is_final:
                ended += 1
                if state is JobState.SUCCEEDED:  # e.g. SGE: gone from qstat
                    why = "the backend reports that it ended"
                else:
                    why = f"the backend reports it {state.name}"
                self._on_event(JobEvent(job_id, state, reason=why))
        self._schedule_poll(ended)

    def _look_in_store(self) -> int:
        """Collect the jobs in flight whose outcome, or whose worker's end marker, is in
        the store (the engine cannot tell now); how many ended. Two existence checks
        per job, at most every ``STORE_LOOK_MAX`` seconds plus a little per job."""
        now = time.monotonic()
        if now < self._next_store_look:
            return 0
        self._next_store_look = now + min(
            STORE_LOOK_MAX, self._poll_ceiling + STORE_LOOK_PER_JOB * len(self._inflight)
        )
        ended = 0
        for job_id, chunk in list(self._inflight.items()):
            try:
                if self.store.exists(self.store.result_key(chunk.id, chunk.attempt)):
                    event = JobEvent(job_id, JobState.SUCCEEDED, reason="its outcome is stored")
                elif self.store.exists(self.store.end_key(chunk.id, chunk.attempt)):
                    why = "its worker ended (its end marker is stored) without writing an outcome"
                    event = JobEvent(job_id, JobState.LOST, reason=why)
                else:
                    continue
            except Exception as exc:  # the store fails too: the engine may yet answer
                log.warning("batchpool: could not look for the outcomes of jobs: %s", exc)
                return ended
            ended += 1
            self._on_event(event)
        return ended

    def _give_up_unreachable(self) -> None:
        """The engine stayed unreachable for its grace: the jobs in flight without an
        outcome are lost. Each is cancelled through the engine before it runs again, so
        that two attempts never run at once by our doing; one that cannot be cancelled
        may still run, so it fails instead of running again."""
        self._next_store_look = 0.0
        self._look_in_store()
        if not self._inflight:
            return
        job_ids = list(self._inflight)
        why = self._outage.describe()
        try:
            self.backend.cancel(job_ids)
            cancelled = ""
        except Exception as exc:
            cancelled = f"{type(exc).__name__}: {exc}"
        else:  # the engine answers commands again: a new attempt gets a new grace
            self._outage.answered()
        for job_id in job_ids:
            chunk = self._inflight.pop(job_id)
            if self._completion.collect(chunk):  # its outcome came meanwhile
                continue
            if not cancelled:
                reason = f"{why}; it was cancelled through the engine before a new attempt"
                self._lost(chunk, JobEvent(job_id, JobState.LOST, reason=reason))
                continue
            reason = (
                f"{why}; it could not be cancelled ({cancelled}), so it may still run: it is "
                "not run again, so that two attempts never run at once"
            )
            chunk.reasons.append(f"attempt {chunk.attempt} (job {job_id}): {reason}")
            text = "\n".join(
                [f"{chunk.describe()} got no result:", *("  " + r for r in chunk.reasons)]
            )
            self._completion.fail(chunk, WorkerLostError(text), reason=reason)

    # -- a job ended ----------------------------------------------------------------------

    def _on_event(self, event: JobEvent) -> None:
        if not event.state.is_final:
            running = self._inflight.get(event.job_id)
            if running is not None and event.state is JobState.RUNNING:
                running.set_state("Running")
            return
        chunk = self._inflight.pop(event.job_id, None)
        if chunk is None:  # already handled through a status poll
            return
        self._collect(chunk, event)

    def _collect(self, chunk: Chunk, event: JobEvent) -> None:
        """Complete a chunk's futures from its outcome, or handle the job as lost."""
        if not self._completion.collect(chunk):
            self._lost(chunk, event)

    def broken_error(self) -> InitializerError:
        """A new error for a call refused because the executor is broken."""
        error = InitializerError(f"the executor is broken: {self.broken}")
        error.__cause__ = self.broken.__cause__ if self.broken is not None else None
        return error

    def _break(self, error: BaseException) -> None:
        """The initializer failed: as the stdlib's pool breaks, fail every call not yet
        handed over, and refuse new ones (``enqueue``); jobs in flight end as they do."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = error
            groups = list(self._pending)
            self._pending.clear()
            self._claimed -= self._claimed_pending
            self._claimed_pending = 0
            parked = list(self._parked)
            self._parked.clear()
        logging.getLogger("concurrent.futures").critical(
            "Exception in initializer:", exc_info=error
        )
        for group in groups:
            for future in group.futures:
                if not future.done():
                    self._completion.ended["Error"] += width(future)
                    future.set_exception(error)
                else:
                    self._completion.ended["Cancelled"] += width(future)
        for chunk in [*parked, *self._retry]:
            self._completion.fail(chunk, error, reason=f"{type(error).__name__}: {error}")
        self._retry.clear()

    def _lost(self, chunk: Chunk, event: JobEvent) -> None:
        if all(f is None or f.done() for f in chunk.futures):
            # Its calls were cancelled (their queued job dropped): nothing to retry.
            dropped = cf.CancelledError("cancelled by the caller")
            self._completion.fail(
                chunk, dropped, state="Cancelled", reason="cancelled by the caller"
            )
            return
        reason = event.reason or f"it ended as {event.state.name}"
        # Ask the engine why (its state, reason, exit status, output), unless it cannot
        # be asked now.
        if not event.log_tail and not self._outage.active:
            try:
                detail = self.backend.explain(event.job_id)
            except Exception as exc:
                detail = f"(the backend could not say why: {exc!r})"
            if detail:
                reason = f"{reason}: {detail}"
        chunk.reasons.append(f"attempt {chunk.attempt} (job {event.job_id}): {reason}")
        self._completion.lost_attempt(chunk, reason)  # its time is billed (billing.py)
        fatal = self._fatal_cause(chunk, event, reason)
        if fatal is not None:  # a retry would run the calls again, and fail the same way
            self._completion.fail(chunk, fatal, reason=f"{type(fatal).__name__}: {fatal}")
            return
        if not self._cancel_requested and self._cancel_marked():
            self._on_cancel_request()
        if self._cancel_requested:
            cancelled = "`batchpool cancel` asked the run to stop"
            event = JobEvent(event.job_id, JobState.CANCELLED, reason=cancelled)
            reason = cancelled
        if event.state is not JobState.CANCELLED and self._split(chunk, reason):
            return
        if event.state is not JobState.CANCELLED and chunk.deaths < self._max_attempts:
            log.info("batchpool: chunk %s lost (%s); retrying", chunk.id, reason)
            chunk.attempt += 1
            self._retry.append(chunk)
            return
        state = "Error"
        if event.state is JobState.CANCELLED:
            state = "Cancelled"
            headline = f"the job running {chunk.describe()} was cancelled ({reason})"
        elif chunk.inherited_deaths:  # the culprit of a chunk split (culprits.py)
            headline = (
                f"{chunk.describe()} killed its worker, or was lost with it, each of the "
                f"{chunk.deaths} times it ran: with other calls of its chunk, then alone "
                f"{chunk.attempt} time{'s' if chunk.attempt != 1 else ''} (the calls it "
                "shared its chunk with ran apart from it and have their results)"
            )
        else:
            attempts = f"{chunk.attempt} attempt{'s' if chunk.attempt != 1 else ''}"
            headline = (
                f"{chunk.describe()} got no result after {attempts}: each time its job ended, "
                "or was lost, without writing one, so the job itself failed (an exception "
                "raised by a call would have been that call's result)"
            )
        text = "\n".join([headline, *("  " + r for r in chunk.reasons)])
        if event.log_tail:
            text += "\nLast lines of the job's output:\n" + event.log_tail
        self._completion.fail(chunk, WorkerLostError(text), state=state, reason=reason)

    def _split(self, chunk: Chunk, reason: str) -> bool:
        """Run the calls of a chunk whose job died again in two pieces, so that those
        that do not kill their worker return (culprits.py); False when it has one call
        still wanted, or its input cannot be read again (it is retried whole)."""
        if not self._isolate_culprits or chunk.live_calls() < 2:
            return False
        key = self.store.chunk_key(chunk.id)
        try:
            header, groups = decode_chunk(unseal(self._secret, key, self.store.get(key)))
        except Exception as exc:
            log.warning("batchpool: chunk %s is retried whole: %s", chunk.id, exc)
            return False
        wanted = wanted_calls(chunk, input_skips(groups))
        if len(wanted) < 2:
            return False
        header = {
            **header,
            PIECE_OF: header.get(PIECE_OF, chunk.id),
            SPLIT_FROM: chunk.id,
            DEATHS: chunk.deaths,  # an attach keeps the bound on runs per call
        }
        pieces: list[Chunk] = []
        for calls in halves(wanted):
            runs = set(calls)
            futures, widths = piece_members(chunk, runs)
            piece = self._new_chunk(futures, list(chunk.labels), chunk.resources)
            assert piece.record is not None
            piece.record.split_from = chunk.record
            piece.widths = widths
            piece.budgets = chunk.budgets
            piece.inherited_deaths = chunk.deaths
            piece.reasons = list(chunk.reasons)
            for future in futures:
                if future is not None:
                    future._job = piece.record
            try:
                self._write_input(piece, header, piece_groups(groups, runs))
            except Exception as exc:
                self._completion.fail(piece, storage_error("write the input of", piece, exc))
                continue
            pieces.append(piece)
        names = ", ".join(piece.id for piece in pieces)
        log.info(
            "batchpool: chunk %s lost (%s); its calls run again in %s", chunk.id, reason, names
        )
        chunk.set_state("Error")
        if chunk.record is not None:
            chunk.record.exit = f"lost: {reason}; its calls run again split, in {names}"
        self._journal.note(chunk)
        self._journal.given_up(
            chunk,
            "Error",
            f"{reason}; its calls run again split, in {names}",
            split_into=[piece.id for piece in pieces],
        )
        self._retry.extend(pieces)
        return True

    def _stop_for_budget(self, budget: FailureBudget) -> None:
        """More calls failed than ``budget`` allows: its calls not yet handed over, and
        its jobs that the engine still queues, fail with its error; running jobs finish."""
        log.warning("batchpool: %s; stopping its calls", budget.describe())
        with self._lock:
            groups = [group for group in self._pending if budget in group.budgets]
            kept = [group for group in self._pending if budget not in group.budgets]
            self._pending.clear()
            self._pending.extend(kept)
            claimed = sum(group.started for group in groups)
            self._claimed -= claimed
            self._claimed_pending -= claimed
            parked = [chunk for chunk in self._parked if budget in chunk.budgets]
            self._parked = collections.deque(c for c in self._parked if c not in parked)
        waiting = [*parked, *(chunk for chunk in self._retry if budget in chunk.budgets)]
        self._retry = collections.deque(c for c in self._retry if budget not in c.budgets)
        mine = [job for job, chunk in self._inflight.items() if budget in chunk.budgets]
        queued = self._queued_jobs(mine)
        calls = sum(g.n_calls for g in groups) + sum(c.live_calls() for c in waiting)
        calls += sum(self._inflight[job].live_calls() for job in queued)
        budget.stopped = (
            f" ({calls} call{'s' if calls != 1 else ''}; the {len(queued)} job"
            f"{'s' if len(queued) != 1 else ''} of them that the engine still queued "
            "were cancelled)"
        )
        reason = budget.describe()
        for group in groups:
            for future in group.futures:  # not yet run, or cancelled by the caller
                self._completion.ended["Cancelled"] += width(future)
                if not future.done():
                    future.set_exception(budget.error())
        for chunk in waiting:
            self._completion.fail(chunk, budget.error(), state="Cancelled", reason=reason)
        for job_id in queued:
            chunk = self._inflight.pop(job_id)
            self._completion.fail(chunk, budget.error(), state="Cancelled", reason=reason)

    def _queued_jobs(self, job_ids: list[str]) -> list[str]:
        """Of these jobs in flight, those the engine still queued, now cancelled through
        it (one status query, one cancel); none while the engine cannot be asked."""
        if not job_ids:
            return []
        if self._outage.active:
            log.warning(
                "batchpool: the engine cannot be asked which jobs are still queued, so none "
                "is cancelled (%s)",
                self._outage.describe(),
            )
            return []
        try:
            states = self.backend.status(job_ids)
            queued = [job for job, state in states.items() if state is JobState.PENDING]
            if queued:
                self.backend.cancel(queued)
        except Exception as exc:
            log.warning("batchpool: could not cancel the queued jobs: %s", exc)
            return []
        return queued

    def _fatal_cause(self, chunk: Chunk, event: JobEvent, reason: str) -> BatchPoolError | None:
        """Why running a job that ended without a result again cannot help, if it cannot:
        its worker said so (``event.fatal``: a chunk refused for its signature, a storage
        error that does not pass), the run's input is gone from storage, or the storage
        refuses this client's writes too (full, read-only, denied)."""
        if event.fatal:
            return fatal_error(event.reason or reason)
        key = self.store.chunk_key(chunk.id)
        try:
            if not self.store.exists(key):
                return StorageError(
                    f"the input of {chunk.describe()} ({self.store.path(key)}) is gone from "
                    f"storage: the run at {self.store.url} was deleted, so its job cannot run again"
                )
            self._save_log(chunk, reason, event.log_tail)
        except StorageError as exc:
            if not exc.transient:
                return exc
            log.warning("batchpool: could not save the log of a lost job of %s: %s", chunk.id, exc)
        except Exception as exc:
            log.warning("batchpool: could not save the log of a lost job of %s: %s", chunk.id, exc)
        return None

    def _save_log(self, chunk: Chunk, reason: str, tail: str) -> None:
        """Keep what is known of a job that died without saving its output in ``logs/``,
        so ``future.logs()`` and ``batchpool logs`` show it from anywhere."""
        key = self.store.log_key(chunk.id, chunk.attempt)
        try:  # what the job saved while it ran (the worker's live log), if anything
            saved = self.store.get(key).decode("utf-8", errors="replace")
        except FileNotFoundError:
            saved = ""
        if "batchpool: the job ended without a result" in saved:
            return
        text = f"batchpool: the job ended without a result: {reason}\n"
        if tail:
            text += f"Last lines of its output:\n{tail.rstrip()}\n"
        if saved:
            text = f"{saved.rstrip()}\n{text}"
        self.store.put(key, text.encode())

    def _cancel_marked(self) -> bool:
        """Whether ``batchpool cancel`` asked this run to stop (checked when a job is lost,
        as a cancel through the engine makes jobs end without a result, and every
        ``CANCEL_CHECK`` seconds while jobs are in flight)."""
        try:
            return self.store.exists(self.store.CANCEL)
        except Exception:
            return False

    def _on_cancel_request(self) -> None:
        """Stop the run: nothing more is dispatched or retried, queued calls are cancelled."""
        log.warning("batchpool: the run %s was cancelled (batchpool cancel)", self.store.url)
        self._cancel_requested = True
        self.cancel_pending()
        with self._lock:  # parked chunks are never handed over now
            parked = list(self._parked)
            self._parked.clear()
        for chunk in parked:
            for i, (future, _, n) in enumerate(chunk.spans()):
                if future is not None:
                    chunk.futures[i] = None
                    self._completion.ended["Cancelled"] += n
            chunk.set_state("Cancelled")
            self._journal.given_up(chunk, "Cancelled", "batchpool cancel")
        if self._inflight:  # each ends as CANCELLED, and is not retried
            try:
                self.backend.cancel(list(self._inflight))
            except Exception as exc:
                log.warning("batchpool: cancelling the jobs in flight failed: %s", exc)
        for chunk in list(self._retry):
            self._completion.fail(
                chunk,
                WorkerLostError(f"{chunk.describe()} was cancelled before its retry ran"),
                state="Cancelled",
                reason="batchpool cancel",
            )
        self._retry.clear()

    # -- a run adopted from a client that died -------------------------------------------

    def _adopt(self) -> None:
        """Take over the chunks of a run whose client died (``BatchPoolExecutor.attach``)."""
        for item in self._adopted:
            chunk = item.chunk
            if item.how == "done":
                self._collect(chunk, JobEvent(chunk.job_id, JobState.SUCCEEDED))
            elif item.how == "engine":  # the engine still knows the job: poll it as ours
                chunk.set_state("Ready")
                self._inflight[chunk.job_id] = chunk
            elif item.how == "orphan":  # a worker on this machine may still run it
                chunk.set_state("Running")
                self._orphans[chunk.id] = chunk
            elif item.how == "given_up":  # the client that died had given up on it
                why = "; ".join(chunk.reasons)
                self._completion.fail(chunk, WorkerLostError(f"{chunk.describe()} failed: {why}"))
            else:  # never handed to an engine, or handed to one that died with the client
                self._retry.append(chunk)
        self._adopted.clear()
        self._next_poll = time.monotonic()  # look at the adopted jobs at once

    def _check_orphans(self) -> int:
        """Collect the adopted chunks whose workers finished; how many did."""
        ended = 0
        for chunk in list(self._orphans.values()):
            why = "its worker ended without a result after the client that started it died"
            if not self.store.exists(self.store.result_key(chunk.id, chunk.attempt)):
                marker = chunk.worker
                alive = marker is not None and is_our_worker(
                    marker.host, marker.pid, marker.pid_started, marker.boot_id, marker.worker
                )
                if alive and time.monotonic() < chunk.orphan_deadline:
                    continue  # still running
                if alive and marker is not None and marker.pid:
                    # Past its grace and, provably, our own worker: stop it before the
                    # chunk runs again, so that no call runs twice at once.
                    why = "its worker was still running it when its grace ran out"
                    try:
                        os.kill(marker.pid, signal.SIGKILL)
                    except OSError:
                        pass
            del self._orphans[chunk.id]
            ended += 1
            self._collect(chunk, JobEvent(chunk.job_id, JobState.LOST, reason=why))
        return ended

    def _count_calls(self) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        with self._lock:
            pending = [f for group in self._pending for f in group.futures]
            pending += [f for chunk in self._parked for f in chunk.futures if f is not None]
            counts.update(self._completion.ended)
            counts["Success"] += self._resumed
            counts["Cancelled"] += self._cancelled_pending
        for future in pending:
            counts["Cancelled" if future.cancelled() else "Pending"] += width(future)
        chunks = [*self._retry, *self._inflight.values(), *self._orphans.values()]
        for chunk in chunks:
            state = "Pending" if chunk in self._retry else chunk.state
            for call, _, n in chunk.spans():
                if call is not None:
                    counts["Cancelled" if call.cancelled() else state] += n
        return {state: counts[state] for state in JOB_STATES if counts[state]}

    def _fail_everything(self, exc: BaseException) -> None:
        with self._lock:
            self._stopping = True
            groups = list(self._pending)
            self._pending.clear()
            self._claimed -= self._claimed_pending
            self._claimed_pending = 0
        error = BatchPoolError(f"the executor's watcher thread failed: {type(exc).__name__}: {exc}")
        if self._inflight:
            try:
                self.backend.cancel(list(self._inflight))
            except Exception:
                log.exception("batchpool: cancelling the jobs in flight failed")
        with self._lock:
            parked = list(self._parked)
            self._parked.clear()
        for chunk in parked:
            for future in chunk.futures:
                if future is not None and not future.done():
                    future.set_exception(error)
        for chunk in [*self._inflight.values(), *self._retry]:
            self._completion.fail(chunk, error)
        for group in groups:
            for future in group.futures:
                if not future.done():
                    future.set_exception(error)
        self._inflight.clear()
        self._retry.clear()

    def _close(self) -> None:
        self._status_query.close()
        self._journal.flush()
        if not self._cleanup:
            self._journal.close(self._completion.usage.as_dict())
        if self._owns_backend:
            try:
                self.backend.close()
            except Exception:
                log.exception("batchpool: closing %r failed", self.backend)
        if self._cleanup:
            try:
                self.store.delete_run()
                if self._on_cleanup is not None:
                    self._on_cleanup()
            except Exception as exc:
                log.warning("batchpool: could not delete the run at %s: %s", self.store.url, exc)


@dataclass(eq=False)
class _Notified:
    """A cancelled future, to be moved to ``CANCELLED_AND_NOTIFIED``."""

    future: BatchPoolFuture


class _Request:
    """A question for the watcher thread, answered from its loop."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._answered = threading.Event()
        self._value: Any = None

    def answer(self, value: Any) -> None:
        self._value = value
        self._answered.set()

    def wait(self, timeout: float) -> Any:
        if not self._answered.wait(timeout):
            raise TimeoutError(
                f"the executor's watcher thread did not answer within {timeout} s; it may be "
                "waiting on storage (see the log of the 'batchpool' logger)"
            )
        return self._value
