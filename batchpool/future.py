"""BatchPoolFuture: a real ``concurrent.futures.Future`` that can also be awaited."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchpool.store import Store

#: Job states, in Hail Batch's words: Pending (waiting for a free slot in this client),
#: Ready (handed to the engine, queued there), Running, Success (every call returned),
#: Failed (a call raised), Error (the job ended without a result, every attempt), Cancelled.
JOB_STATES = ("Pending", "Ready", "Running", "Success", "Failed", "Error", "Cancelled")
FINAL_STATES = frozenset({"Success", "Failed", "Error", "Cancelled"})


@dataclass
class JobRecord:
    """Where a call ran: its chunk, the attempts so far, their job ids and how it ended.

    Shared by the calls of one chunk; it refers to no future, so a future kept
    by the caller keeps no other call's result alive. Times are Unix seconds.
    """

    store: Store
    chunk: str
    attempt: int = 1
    job_ids: list[str] = field(default_factory=list)
    state: str = "Pending"
    host: str | None = None
    started: float | None = None
    ended: float | None = None
    #: How the last attempt ended: "ok", "2/5 raised: ValueError: ...", "lost: <why>", ...
    exit: str | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    #: Cancels the chunk's job while the engine still queues it (set by the executor).
    canceller: Callable[[JobRecord, BatchPoolFuture], bool] | None = field(default=None, repr=False)
    #: The record of the chunk this one's calls were split from, when its job died.
    split_from: JobRecord | None = field(default=None, repr=False)

    @property
    def duration(self) -> float | None:
        """Wall seconds of the last attempt that ended with a result."""
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started


class BatchPoolFuture(cf.Future[Any]):
    """The future of one call.

    Everything ``concurrent.futures`` offers works on it (``wait``,
    ``as_completed``, callbacks, ``asyncio.wrap_future``); ``await future`` works
    inside a running event loop without blocking it.
    """

    def cancel(self) -> bool:
        """Cancel the call if it has not started; True if it will never run.

        The state becomes ``CANCELLED`` as with any ``Future``, and the executor
        moves it to ``CANCELLED_AND_NOTIFIED`` (``set_running_or_notify_cancel``)
        soon after. Unlike a bare ``Future``, waiters already in
        ``wait``/``as_completed`` learn of the cancellation at once.
        """
        if not super().cancel():
            # Handed to a cluster engine, the call may still wait in its queue.
            record = self._job
            if record is None or record.canceller is None or self.done():
                return False
            return record.canceller(record, self)
        with self._condition:
            if self._state == cf._base.CANCELLED:
                self._told = list(self._waiters)
                for waiter in self._told:
                    waiter.add_cancelled(self)
        if self._on_cancel is not None:
            self._on_cancel(self)
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """As ``Future``'s, telling each waiter of a cancellation only once; False,
        not an error, for a call that was cancelled and whose waiters were told."""
        with self._condition:
            if self._state == cf._base.CANCELLED_AND_NOTIFIED:
                return False
            if self._state == cf._base.CANCELLED:
                self._state = cf._base.CANCELLED_AND_NOTIFIED
                told = self._told
                for waiter in self._waiters:
                    if not any(waiter is t for t in told):
                        waiter.add_cancelled(self)
                self._told = []
                return False
        return super().set_running_or_notify_cancel()

    #: Waiters told of the cancellation by ``cancel`` itself.
    _told: Sequence[Any] = ()
    #: Set by the executor: it moves a cancelled future to CANCELLED_AND_NOTIFIED.
    _on_cancel: Callable[[BatchPoolFuture], None] | None = None

    def _cancel_queued(self) -> bool:
        """Cancel a call whose job the engine dropped before it started; for the executor.

        The future goes from RUNNING (handed to the engine) to cancelled, and its
        waiters and callbacks learn of it as they would of any cancellation.
        """
        with self._condition:
            if self._state != cf._base.RUNNING:
                return False
            self._state = cf._base.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    _job: JobRecord | None = None

    @property
    def job(self) -> JobRecord | None:
        """The chunk and attempts of this call's job; None until it is handed to a backend."""
        return self._job

    def logs(self) -> str:
        """What the job running this call printed (stdout and stderr), newest attempt last
        (after those of the chunks it was split from, when a job of it died).

        A job runs a chunk of calls, so this is the chunk's output. Empty when the
        call has not run, printed nothing, or its run was deleted from storage
        (``cleanup_bucket``).
        """
        records: list[JobRecord] = []
        record = self._job
        while record is not None:  # the chunks it was split from first
            records.insert(0, record)
            record = record.split_from
        parts = []
        for record in records:
            for attempt in range(1, record.attempt + 1):
                try:
                    text = record.store.get(record.store.log_key(record.chunk, attempt))
                except FileNotFoundError:
                    continue
                if len(records) > 1:
                    parts.append(f"--- chunk {record.chunk}, attempt {attempt} ---\n")
                elif record.attempt > 1:
                    parts.append(f"--- attempt {attempt} ---\n")
                parts.append(text.decode("utf-8", errors="replace"))
        return "".join(parts)

    def _start(self) -> bool:
        """Mark the call running, unless it was cancelled; for the executor only."""
        with self._condition:
            if self._state != cf._base.PENDING:
                return False
            self._state = cf._base.RUNNING
            return True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    async def async_result(self, timeout: float | None = None) -> Any:
        """The call's result, awaited; ``TimeoutError`` after ``timeout`` seconds.

        A timeout does not cancel the call.
        """
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self)), timeout)

    async def async_cancel(self) -> bool:
        """``cancel()`` for callers in an event loop (it never blocks)."""
        return self.cancel()


@dataclass
class BatchOutcome:
    """What a ``MapBatch`` holds once its job ended: each call's value, in order (None
    where it raised), and the exception of each call that raised, by its index."""

    values: list[Any]
    errors: dict[int, BaseException]


class MapBatch(BatchPoolFuture):
    """The one future of a ``map`` chunk: ``width`` calls, which the user never holds
    one by one. Its result is a ``BatchOutcome``; map's iterator yields the values or
    raises the exceptions item by item. A million-call map makes a few dozen of
    these instead of a million futures."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        #: How many of its calls raised, once it has a result. Kept apart from the
        #: result, which map's iterator lets go of as soon as it read it: a waiter can
        #: wake (and drop it) before the done-callbacks run (progress counts this).
        self.failed = 0

    def set_result(self, result: Any) -> None:
        if isinstance(result, BatchOutcome):
            self.failed = len(result.errors)
        super().set_result(result)


def width(member: BatchPoolFuture) -> int:
    """How many calls a chunk member stands for: 1, or a ``MapBatch``'s width."""
    return member.width if isinstance(member, MapBatch) else 1
