"""An engine that cannot be asked: its status queries in a thread of their own, and
the clock of an outage.

Clusters fail in their own ways: slurmctld restarts and its commands answer "Unable
to contact slurm controller" for a minute, ``squeue`` hangs for 30 s under load, a
qmaster fails over. Jobs keep running meanwhile. So, for the watcher:

- A failed status query makes the states of the jobs in flight *unknown*, not lost.
  ``EngineOutage`` counts from the first failure; the watcher keeps asking with
  backoff and completes, from the store, what finished meanwhile. Only when the
  engine stayed unreachable for ``grace`` seconds are the jobs given up on.
- A submission that fails because the engine cannot be reached (``is_unreachable``)
  is tried again with the same backoff, within the same grace.
- ``StatusQuery`` runs ``backend.status`` in its own thread, one query at a time, and
  posts the answer to the watcher's queue: a hung command never stalls completions
  that the store already shows, nor dispatch, nor ``cancel``.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from batchpool.backends.base import Backend, JobState

log = logging.getLogger("batchpool")

#: Seconds the engine may stay unreachable before the jobs in flight count as lost.
DEFAULT_GRACE = 600.0
#: Longest pause between two attempts to reach an engine that does not answer.
RETRY_MAX = 30.0
#: A status query that has not answered after this many seconds counts as failed
#: (backends bound their own commands; this bounds one that does not).
QUERY_HANG = 180.0


def is_unreachable(exc: BaseException) -> bool:
    """Whether an engine command failed because the engine could not be reached (a
    timeout, a refused connection, a controller that is down), so that the same
    command may work later; False for what it refused (a bad option, a quota)."""
    if getattr(exc, "transient", False):
        return True
    return isinstance(exc, (TimeoutError, ConnectionError, subprocess.TimeoutExpired))


@dataclass
class EngineOutage:
    """The clock of an engine that cannot be asked: since when, how often, and why."""

    grace: float = DEFAULT_GRACE
    #: What an outage means, for the log: "<consequence> after <grace> s".
    consequence: str = (
        "the states of its jobs are unknown until it answers again: what finished is read "
        "from the store, and jobs count as lost"
    )
    since: float | None = None  # monotonic time of the first failure of this outage
    failures: int = 0
    last_error: str = ""
    retry_at: float = 0.0  # no engine command before this (monotonic)

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, what: str, exc: BaseException | str, *, since: float | None = None) -> None:
        """An engine command failed, or hung (``since``: when it was issued)."""
        now = time.monotonic()
        self.failures += 1
        self.last_error = f"{what}: {exc if isinstance(exc, str) else _text(exc)}"
        if self.since is None:
            self.since = now if since is None else since
            log.warning(
                "batchpool: the engine cannot be reached (%s); %s only after %g s",
                self.last_error,
                self.consequence,
                self.grace,
            )
        else:
            log.info("batchpool: the engine still cannot be asked (%s)", self.last_error)
        self.retry_at = now + min(RETRY_MAX, 0.5 * 2 ** min(self.failures - 1, 10))

    def answered(self) -> None:
        """The engine answered: the outage, if there was one, is over."""
        if self.since is not None:
            log.warning(
                "batchpool: the engine answers again after %.0f s (%d failed commands)",
                time.monotonic() - self.since,
                self.failures,
            )
        self.since = None
        self.failures = 0
        self.retry_at = 0.0

    def lasted(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def expired(self) -> bool:
        return self.since is not None and self.lasted() >= self.grace

    def held(self) -> bool:
        """Whether engine commands wait for the next retry time."""
        return self.since is not None and time.monotonic() < self.retry_at

    def describe(self) -> str:
        """``the engine could not be asked for 612 s (31 failed commands; last: ...)``."""
        return (
            f"the engine could not be asked for {self.lasted():.0f} s "
            f"(engine_outage_grace={self.grace:g}; {self.failures} failed "
            f"command{'s' if self.failures != 1 else ''}; last: {self.last_error})"
        )


@dataclass(eq=False)
class StatusAnswer:
    """What one status query said: the states, or why it failed."""

    job_ids: list[str]
    asked_at: float
    states: dict[str, JobState] = field(default_factory=dict)
    error: BaseException | None = None


class StatusQuery:
    """``backend.status`` in a thread of its own, one query at a time; each answer is
    handed to ``post`` (the watcher's event queue)."""

    def __init__(self, backend: Backend, post: Callable[[StatusAnswer], None]) -> None:
        self._backend = backend
        self._post = post
        self._asks: queue.SimpleQueue[StatusAnswer | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: When the query under way was issued (monotonic), None when none is.
        #: Written by the watcher thread only (``ask``, ``answered``).
        self.asked_at: float | None = None
        #: Whether the query under way was already counted as hung.
        self.counted_hung = False

    @property
    def busy(self) -> bool:
        return self.asked_at is not None

    def busy_for(self) -> float:
        return 0.0 if self.asked_at is None else time.monotonic() - self.asked_at

    def ask(self, job_ids: Sequence[str]) -> None:
        """Start a query for ``job_ids``; its answer reaches ``post``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="batchpool-status", daemon=True)
            self._thread.start()
        self.asked_at = time.monotonic()
        self.counted_hung = False
        self._asks.put(StatusAnswer(list(job_ids), self.asked_at))

    def answered(self, answer: StatusAnswer) -> None:
        """The watcher got ``answer``: the query under way is over, unless ``answer`` is
        of an older one (a hung query that answered late; its states are used all the
        same, they do not go stale that fast)."""
        if answer.asked_at == self.asked_at:
            self.asked_at = None

    def close(self) -> None:
        """End the thread once the query under way, if any, has answered."""
        if self._thread is not None:
            self._asks.put(None)

    def _run(self) -> None:
        while True:
            answer = self._asks.get()
            if answer is None:
                return
            try:
                answer.states = dict(self._backend.status(answer.job_ids))
            except Exception as exc:
                answer.error = exc
            self._post(answer)


def _text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
