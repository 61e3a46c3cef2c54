"""What storage records of a run's jobs: the journal as they go, the job table at the end.

The journal (``jobs/``) is what a client that attaches after this one died reads to
know which jobs exist and which were given up on: signed entries, each created at the
next free sequence number, so two sessions of a ``resume=True`` run never overwrite
each other's. Hand-overs to a backend whose jobs die with the client (the local pool)
are put off by up to ``HANDED_FLUSH`` seconds and written many in one entry: an
attach finds those chunks in ``chunks/`` and their workers by their start markers, so
the journal may say it a little later, off the path of each job.

The job table (each chunk's engine job ids, attempts and final state) goes into
``manifest.json`` once, as the run closes: rewriting the manifest per job would cost
O(jobs²) bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from batchpool import documents
from batchpool.billing import billed_cores_of
from batchpool.chunks import Chunk
from batchpool.documents import JournalEntry, Manifest
from batchpool.store import Store

log = logging.getLogger("batchpool")

#: Hand-overs to a backend whose jobs die with the client are journaled at most this
#: many seconds late, many in one entry (and as the run closes).
HANDED_FLUSH = 1.0


class RunJournal:
    """The run's journal and job table. Used by the watcher thread, and ``add`` also by
    callers' threads (``note_rerun``)."""

    def __init__(
        self, store: Store, secret: bytes, next_seq: int = 0, memory_per_core: float | None = None
    ) -> None:
        self._store = store
        self._secret = secret
        self._memory_per_core = memory_per_core  # the billing rule (billing.billed_cores)
        self._lock = threading.Lock()
        self._next_seq = next_seq
        self._handed: list[dict[str, Any]] = []  # hand-overs not yet journaled
        self._handed_since = 0.0
        # chunk id -> its engine job ids and state: manifest.json's job table at close
        self._jobs: dict[str, dict[str, Any]] = {}

    def add(self, **entry: Any) -> None:
        """Append one entry, signed; a failure only warns (the run goes on)."""
        try:
            document = documents.build(JournalEntry, {"time": time.time(), **entry})
            with self._lock:
                seq = self._store.add_journal_entry(document, self._secret, self._next_seq)
                self._next_seq = seq + 1
        except Exception as exc:
            log.warning("batchpool: could not add to the run's journal: %s", exc)

    def handed(self, chunks: list[Chunk], *, put_off: bool) -> None:
        """Chunks were handed to the backend; ``put_off`` when their jobs die with this
        client, so the entry may come up to ``HANDED_FLUSH`` seconds late."""
        handed = [
            {
                "chunk": chunk.id,
                "attempt": chunk.attempt,
                "job_id": chunk.job_id,
                "calls": chunk.live_calls(),
                "labels": sorted(set(chunk.labels)),
                "cpus": chunk.resources.cpus,
                "billed_cores": billed_cores_of(chunk.resources, self._memory_per_core),
            }
            for chunk in chunks
        ]
        for chunk in chunks:
            self.note(chunk)
        if not put_off:
            self.flush()  # in order
            self.add(handed=handed)
            return
        if not self._handed:
            self._handed_since = time.monotonic()
        self._handed.extend(handed)
        if self.flush_due_in() == 0.0:
            self.flush()

    def flush_due_in(self) -> float | None:
        """Seconds until the hand-overs put off must be written (0 when overdue), or
        None when there are none."""
        if not self._handed:
            return None
        return max(0.0, self._handed_since + HANDED_FLUSH - time.monotonic())

    def flush(self) -> None:
        """Write the hand-overs put off, in one entry."""
        if self._handed:
            handed, self._handed = self._handed, []
            self.add(handed=handed)

    def given_up(
        self, chunk: Chunk, state: str, reason: str, split_into: list[str] | None = None
    ) -> None:
        """Nothing more is done for this chunk: it ended as ``state``, for ``reason``;
        ``split_into``: its calls run on in these pieces (culprits.py)."""
        entry: dict[str, Any] = {"chunk": chunk.id, "attempt": chunk.attempt, "state": state}
        if split_into:
            entry["split_into"] = split_into
        self.add(given_up=[{**entry, "reason": reason[:2000]}])

    def note(self, chunk: Chunk) -> None:
        """Keep the chunk's job ids and state for the job table."""
        self._jobs[chunk.id] = chunk.table_entry()

    def close(self, usage: dict[str, Any]) -> None:
        """The run closes: journal it with what its jobs used, and put every chunk's job
        ids, attempts and final state in manifest.json."""
        self.flush()
        self.add(closed=time.time(), usage=usage)
        key = self._store.MANIFEST
        try:
            manifest = self._store.get_document(Manifest, key, self._secret)
            jobs = {**documents.to_builtins(manifest).get("jobs", {}), **self._jobs}
            self._store.put_document(key, documents.replace(manifest, jobs=jobs), self._secret)
        except Exception as exc:
            log.warning("batchpool: could not write the job table of %s: %s", self._store.url, exc)
