"""What the watcher keeps track of: groups of calls waiting, and chunks that run as jobs.

A ``CallGroup`` is calls that share one pickled payload (one ``submit``, or one
``map`` chunk); the watcher puts one or more groups into a ``Chunk``, which is one
job. A chunk's members are its calls' futures, or one ``MapBatch`` that stands for
all the calls of a map chunk; ``spans`` says which entries of the chunk's outcome
belong to which member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchpool.backends.base import Resources
from batchpool.budget import FailureBudget
from batchpool.documents import StartMarker
from batchpool.future import BatchPoolFuture, JobRecord, width


@dataclass(eq=False)
class CallGroup:
    """Calls that share one pickled payload: one ``submit``, or one ``map`` chunk.

    ``futures`` are its members: one future per call, or a map chunk's one
    ``MapBatch`` that stands for all its calls."""

    payload: bytes
    futures: list[BatchPoolFuture]
    label: str  # e.g. "f()", for messages
    fixed: bool = False  # a map chunk, sized already: never merged with other groups
    resources: Resources | None = None  # None: the executor's
    keys: list[str] | None = None  # each call's content hash, for resume=True runs
    #: Marked running as it was enqueued, into a free slot (see ``Watcher.enqueue``).
    started: bool = False
    #: The ``max_failures`` budgets that count its calls (the executor's, its map's).
    budgets: tuple[FailureBudget, ...] = ()

    @property
    def n_calls(self) -> int:
        return sum(width(f) for f in self.futures)


@dataclass(eq=False)
class Chunk:
    """Calls that run as one job. ``futures`` are its members, ``widths`` how many of the
    outcome's entries each stands for, in order (empty: one each)."""

    id: str
    futures: list[BatchPoolFuture | None]  # None where a member was cancelled and is skipped
    labels: list[str]
    resources: Resources
    record: JobRecord | None = None
    attempt: int = 1
    job_id: str = ""
    reasons: list[str] = field(default_factory=list)
    #: Calls cancelled after the chunk's input was written: the worker skips them.
    late_skip: list[int] = field(default_factory=list)
    state: str = "Pending"  # JOB_STATES; mirrored into ``record.state``
    #: An adopted chunk's worker on this machine (its signed start marker), and until
    #: when it is waited for.
    worker: StartMarker | None = None
    orphan_deadline: float = 0.0
    widths: list[int] = field(default_factory=list)
    claimed: int = 0  # its groups that enqueue marked started (see Watcher._release)
    budgets: tuple[FailureBudget, ...] = ()  # those of its groups (all the same)
    #: Times its calls died before this chunk existed: a piece of a chunk whose job
    #: died (culprits.py) inherits the deaths of the chunk it was split from.
    inherited_deaths: int = 0

    def spans(self) -> list[tuple[BatchPoolFuture | None, int, int]]:
        """``(member, first entry, width)`` for each member."""
        widths = self.widths or [1] * len(self.futures)
        spans, first = [], 0
        for member, n in zip(self.futures, widths, strict=True):
            spans.append((member, first, n))
            first += n
        return spans

    @property
    def n_calls(self) -> int:
        return sum(self.widths) if self.widths else len(self.futures)

    def live_calls(self) -> int:
        return sum(n for member, _, n in self.spans() if member is not None)

    def set_state(self, state: str) -> None:
        self.state = state
        if self.record is not None:
            self.record.state = state

    def table_entry(self) -> dict[str, Any]:
        """This chunk's row of the job table in ``manifest.json``."""
        return {
            "attempts": self.attempt,
            "job_ids": list(self.record.job_ids) if self.record is not None else [self.job_id],
            "calls": self.n_calls,
            "state": self.state,
        }

    @property
    def deaths(self) -> int:
        """How many jobs that ran this chunk's calls died, this attempt's included."""
        return self.inherited_deaths + self.attempt

    def describe(self) -> str:
        calls = self.live_calls()
        names = ", ".join(sorted(set(self.labels)))
        return f"{calls} call{'s' if calls != 1 else ''} to {names}"


@dataclass(eq=False)
class Adopted:
    """A chunk of an attached run, and how to take it over (see ``_adopt``)."""

    chunk: Chunk
    how: str  # "done", "given_up", "engine", "orphan" or "new"
