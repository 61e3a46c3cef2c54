"""Real backends that check what the watcher asks of them, for tests."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from batchpool.backends import JobSpec, JobState
from batchpool.backends.base import Notify


class ChecksQueries:
    """A mixin for a real backend class: each status query must ask about every job
    handed over before the previous query answered (so before the watcher asked
    again) that has not ended since: one query for all the jobs in flight, never one
    per job. Status queries run in a thread of the watcher's own, so jobs handed over
    while one is under way are only due in the next. ``missed`` lists what a query
    left out; ``checked`` counts the queries that had such jobs to ask about."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checks_lock = threading.Lock()
        self.handed: set[str] = set()
        self.known: set[str] = set()  # handed over before the last query answered
        self.queries: list[set[str]] = []  # the jobs each query asked about
        self.missed: list[set[str]] = []  # jobs that a query should have asked about
        self.checked = 0

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        ids: list[str] = super().submit(jobs, notify)  # type: ignore[misc]
        with self._checks_lock:
            self.handed.update(ids)
        return ids

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        asked = set(job_ids)
        self.queries.append(asked)
        states: dict[str, JobState] = super().status(job_ids)  # type: ignore[misc]
        with self._checks_lock:
            known, self.known = self.known, set(self.handed)
        self.checked += bool(known)
        left = known - asked
        if left:  # ended already? (one more query, for the check only)
            more: dict[str, JobState] = super().status(list(left))  # type: ignore[misc]
            ended = {job for job, state in more.items() if state.is_final}
            if left - ended:
                self.missed.append(left - ended)
        return states
