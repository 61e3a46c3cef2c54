"""Completing a chunk's futures: from its job's outcome, or with an error.

The watcher thread decides what happens to a job (hand it over, retry it, give up);
``Completion`` does what follows once a chunk's calls have their answers: it reads and
checks the outcome, sets each future's result or exception (a ``MapBatch`` gets the
values of all its calls), notes how the job ended and what it used, and counts calls
by their final state. Only the watcher thread calls it.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable
from typing import Any

from batchpool.billing import billed_cores_of, record_lost_attempt
from batchpool.budget import FailureBudget, failure_text
from batchpool.chunks import Chunk
from batchpool.errors import BatchPoolError, StorageError, fatal_error
from batchpool.future import BatchOutcome, MapBatch
from batchpool.journal import RunJournal
from batchpool.runs import Usage
from batchpool.safetext import printable
from batchpool.serialization import Serializer, calls_in, decode_outcome, outcome_values, unseal
from batchpool.store import Store

log = logging.getLogger("batchpool")

#: Lines of a job's log added to the exceptions its calls raised.
LOG_TAIL_LINES = 20


class Completion:
    def __init__(
        self,
        *,
        store: Store,
        secret: bytes,
        serializer: Serializer,
        journal: RunJournal,
        on_initializer_failed: Callable[[BaseException], None],
        on_budget_exceeded: Callable[[FailureBudget], None],
        cost_per_core_hour: float | None = None,
        memory_per_core: float | None = None,
    ) -> None:
        self._store = store
        self._memory_per_core = memory_per_core  # the billing rule (billing.billed_cores)
        self._secret = secret
        self._serializer = serializer
        self._journal = journal
        self._on_initializer_failed = on_initializer_failed
        self._on_budget_exceeded = on_budget_exceeded
        #: Calls by final state. Changed by the watcher thread only (a += from two
        #: threads loses counts).
        self.ended: collections.Counter[str] = collections.Counter()
        #: What the jobs that ended used.
        self.usage = Usage(cost_per_core_hour=cost_per_core_hour)
        #: Seconds per call of the last job of each function (by label) that ran alone
        #: in its chunk, for map's chunk sizes. Read from callers' threads: one dict
        #: lookup, atomic.
        self.seconds_per_call: dict[str, float] = {}

    def collect(self, chunk: Chunk) -> bool:
        """Complete the chunk's futures from its job's outcome; False when there is no
        outcome (the job ended without writing one: the watcher retries or gives up)."""
        key = self._store.result_key(chunk.id, chunk.attempt)
        try:
            frame = self._store.get(key)
        except FileNotFoundError:
            return False
        except Exception as exc:
            self.fail(chunk, storage_error("read the outcome of", chunk, exc))
            return True
        try:
            meta, entries = decode_outcome(unseal(self._secret, key, frame))
            del frame
            if not meta.get("fatal") and calls_in(entries) != chunk.n_calls:
                raise BatchPoolError(
                    f"{key} holds {calls_in(entries)} outcomes for {chunk.n_calls} calls"
                )
        except Exception as exc:
            self.fail(chunk, exc)
            return True
        self._record_end(chunk, meta)
        if meta.get("fatal"):  # the worker could not run the calls, and a retry could not
            error = fatal_error(str(meta["fatal"]))
            self.fail(chunk, error, reason=f"{type(error).__name__}: {error}")
            return True
        live: set[int] = set()  # the calls whose results are still wanted
        for future, first, n in chunk.spans():
            if future is not None and not future.done():
                live.update(range(first, first + n))
        values, errors = outcome_values(
            entries, self._serializer, lambda first, n: not live.isdisjoint(range(first, first + n))
        )
        del entries
        failures = list(errors.values())
        if failures:
            self._add_log_tail(chunk, failures)
        for future, first, n in chunk.spans():
            if future is None:
                continue
            if future.done():  # cancelled while its job ran
                self.ended["Cancelled"] += n
                continue
            mine = {i - first: e for i, e in errors.items() if first <= i < first + n}
            # Counted first: done-callbacks may ask for status().
            self.ended["Success"] += n - len(mine)
            self.ended["Failed"] += len(mine)
            if chunk.budgets:
                where = f"a call to {chunk.labels[0]} in chunk {chunk.id}"
                named = [failure_text(e, where) for e in itertools.islice(mine.values(), 3)]
                self._count_failures(chunk, n, named, len(mine))
            if isinstance(future, MapBatch):
                future.set_result(BatchOutcome(values[first : first + n], mine))
            elif mine:
                future.set_exception(mine[0])
            else:
                future.set_result(values[first])
        del values
        if meta.get("initializer_failed") and failures:
            self._on_initializer_failed(failures[0])
        del failures  # the callers alone keep results alive
        return True

    def fail(
        self, chunk: Chunk, exc: BaseException, *, state: str = "Error", reason: str = ""
    ) -> None:
        """End the chunk's unfinished calls with ``exc``, and journal that it was given up."""
        chunk.set_state(state)
        self._journal.note(chunk)
        if chunk.record is not None:
            ended = "cancelled" if state == "Cancelled" else "lost"
            chunk.record.exit = f"{ended}: {reason or exc}"
        failed = 0
        for future, _, n in chunk.spans():
            if future is None:
                continue
            if not future.done():
                self.ended[state] += n
                failed += n
                future.set_exception(exc)
            elif future.cancelled():
                self.ended["Cancelled"] += n
        self._journal.given_up(chunk, state, reason or f"{type(exc).__name__}: {exc}")
        if state == "Error" and failed and chunk.budgets:
            text = failure_text(exc, f"{chunk.describe()}, chunk {chunk.id}")
            self._count_failures(chunk, failed, [text], failed)

    def _count_failures(
        self, chunk: Chunk, ended: int, failures: list[str], failed: int | None = None
    ) -> None:
        """Count calls of the chunk that ended against its ``max_failures`` budgets."""
        for budget in chunk.budgets:
            if budget.record(ended, failures, failed):
                self._on_budget_exceeded(budget)

    def lost_attempt(self, chunk: Chunk, reason: str) -> None:
        """The chunk's attempt died without an outcome: write its end marker on its
        worker's behalf (if it started and wrote none), and count its time as lost."""
        end = record_lost_attempt(self._store, self._secret, chunk.id, chunk.attempt, reason)
        if end is not None:
            self.usage.add(end, billed_cores_of(chunk.resources, self._memory_per_core))

    def usage_copy(self) -> Usage:
        usage = self.usage
        return Usage(**{name: getattr(usage, name) for name in usage.__dataclass_fields__})

    def _record_end(self, chunk: Chunk, meta: dict[str, Any]) -> None:
        """Note how a chunk's job ended (its record, the run's usage)."""
        failed = int(meta.get("failed") or 0)
        chunk.set_state("Failed" if failed else "Success")
        self._journal.note(chunk)
        record = chunk.record
        if record is not None:
            record.host = meta.get("host")
            record.started, record.ended = meta.get("started"), meta.get("ended")
            record.cpu_seconds = meta.get("cpu_seconds")
            record.peak_memory_bytes = meta.get("peak_memory_bytes")
            calls = meta.get("calls", chunk.n_calls)
            errors = meta.get("errors") or []
            record.exit = f"{failed}/{calls} raised" if failed else "ok"
            if errors:
                record.exit += f": {errors[0]}"
        if "wall_seconds" in meta:
            self.usage.add(meta, billed_cores_of(chunk.resources, self._memory_per_core))
            calls = meta.get("calls") or 0
            if calls > 0 and len(set(chunk.labels)) == 1:
                # The calls' own time when the worker measured it: the job's wall time
                # also holds reading its input, which a loaded machine makes long.
                seconds = meta.get("calls_seconds", meta["wall_seconds"])
                self.seconds_per_call[chunk.labels[0]] = float(seconds) / calls

    def _add_log_tail(self, chunk: Chunk, failures: list[BaseException]) -> None:
        """End the exceptions of a chunk's calls with the last lines of its job's log."""
        log_key = self._store.log_key(chunk.id, chunk.attempt)
        try:
            text = self._store.get(log_key).decode("utf-8", errors="replace")
        except Exception:  # the job printed nothing (no log), or it is unreadable
            return
        lines = text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:]
        if not lines:
            return
        # Printed with the traceback: escape sequences in the log are shown, not obeyed.
        note = f"Last lines of the job's log ({self._store.path(log_key)}):\n" + "\n".join(
            "    " + printable(line, one_line=True) for line in lines
        )
        for exc in failures:
            add_note = getattr(exc, "add_note", None)  # Python 3.11+
            if add_note is not None:
                add_note(note)


def storage_error(what: str, chunk: Chunk, exc: Exception) -> StorageError:
    return StorageError(
        f"could not {what} {chunk.describe()} (chunk {chunk.id}) in storage: "
        f"{type(exc).__name__}: {exc}",
        transient=getattr(exc, "transient", False),
    )
