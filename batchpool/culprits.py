"""Isolating the culprit of a chunk whose job died: the chunk runs again split.

One call that kills its worker (a segfault, the OOM killer) would otherwise take every
call of its chunk down with it, attempt after attempt. Instead, when a job of several
calls dies without an outcome, the watcher writes two new chunks ("pieces"), each
holding the same pickled groups with the other half of the calls marked skipped, and
runs those. A piece that returns gives its calls their results; a piece that dies is
halved again, down to single calls, which are retried as any one-call chunk is. So the
calls that do not kill their worker return, and only the culprits fail.

Each call runs at most ``max(max_attempts, 1 + ceil(log2(n)))`` times for a chunk of
``n`` calls: once per level of halving it died at, and alone until its deaths reach
``max_attempts`` (but always at least once alone).

A piece's members are those of the chunk that died, at the positions of the calls it
runs (``None`` elsewhere), so its outcome completes them as any chunk's does. A map
chunk's one ``MapBatch`` that the halves cut through is stood for, in each piece, by a
``MapBatch`` of that piece's calls; a ``Gather`` gives the map chunk its outcome once all
of them have theirs. Only the watcher thread uses this module.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
from typing import Any

from batchpool.chunks import Chunk
from batchpool.future import BatchOutcome, BatchPoolFuture, MapBatch
from batchpool.serialization import Group

#: In a piece's input header: the chunk whose calls it runs part of (the first one
#: split, for pieces of pieces), so that ``attach`` maps them onto that chunk's calls,
#: and the chunk it was split from (``attach`` takes a piece over only when the
#: journal says that chunk was split, and not the chunk itself).
PIECE_OF, SPLIT_FROM = "piece_of", "split_from"
#: In a piece's input header: how many times its calls had died (``inherited_deaths``).
DEATHS = "deaths"


def most_runs(max_attempts: int, n_calls: int) -> int:
    """How many times, at most, a call of a chunk of ``n_calls`` runs (module docstring)."""
    return max(max_attempts, 1 + math.ceil(math.log2(max(1, n_calls))))


def wanted_calls(chunk: Chunk, skipped: set[int]) -> list[int]:
    """The chunk-wide indices of the calls whose results are still wanted: their member
    is neither skipped nor done, and the input does not skip them (``skipped``)."""
    wanted: list[int] = []
    for member, first, n in chunk.spans():
        if member is None or member.done():
            continue
        wanted.extend(i for i in range(first, first + n) if i not in skipped)
    return wanted


def input_skips(groups: list[Group]) -> set[int]:
    """The chunk-wide indices of the calls a chunk's input marks skipped."""
    skipped: set[int] = set()
    first = 0
    for n_calls, _payload, skip in groups:
        skipped.update(first + i for i in skip)
        first += n_calls
    return skipped


def halves(calls: list[int]) -> list[list[int]]:
    middle = (len(calls) + 1) // 2
    return [calls[:middle], calls[middle:]]


def piece_groups(groups: list[Group], runs: set[int]) -> list[Group]:
    """``groups`` with every call not in ``runs`` (chunk-wide indices) marked skipped."""
    pieces: list[Group] = []
    first = 0
    for n_calls, payload, _skip in groups:
        skip = tuple(i for i in range(n_calls) if first + i not in runs)
        pieces.append((n_calls, payload, skip))
        first += n_calls
    return pieces


def piece_members(chunk: Chunk, runs: set[int]) -> tuple[list[BatchPoolFuture | None], list[int]]:
    """The members and widths of a piece of ``chunk`` that runs the calls ``runs``.

    A member wholly inside the piece is itself; a ``MapBatch`` that the piece covers
    only part of is stood for by a new batch of each stretch of calls it covers (see
    ``Gather``); what the piece does not run is ``None``, one entry per call."""
    futures: list[BatchPoolFuture | None] = []
    widths: list[int] = []

    def skip(n: int) -> None:
        futures.extend([None] * n)
        widths.extend([1] * n)

    for member, first, n in chunk.spans():
        mine = [i - first for i in range(first, first + n) if i in runs]
        if member is None or not mine:
            skip(n)
        elif len(mine) == n:
            futures.append(member)
            widths.append(n)
        else:
            assert isinstance(member, MapBatch)  # a one-call member is in or out
            gather = Gather.of(member)
            cursor = 0
            for start, stop in _stretches(mine):
                skip(start - cursor)
                futures.append(gather.part(start, stop - start))
                widths.append(stop - start)
                cursor = stop
            skip(n - cursor)
    return futures, widths


def _stretches(offsets: list[int]) -> list[tuple[int, int]]:
    """The consecutive stretches of sorted ``offsets``, as ``(start, stop)``."""
    stretches: list[tuple[int, int]] = []
    start = prev = offsets[0]
    for i in offsets[1:]:
        if i != prev + 1:
            stretches.append((start, prev + 1))
            start = i
        prev = i
    stretches.append((start, prev + 1))
    return stretches


class Gather:
    """The parts of a map chunk's ``MapBatch`` that its pieces run: once each part has
    its outcome, the batch gets the outcome of all its calls, in order."""

    def __init__(self, batch: MapBatch) -> None:
        self.batch = batch
        #: (offset in the batch, part), in no order; parts of parts replace their part.
        self.parts: list[tuple[int, MapBatch]] = []

    @classmethod
    def of(cls, batch: MapBatch) -> Gather:
        """The gather of ``batch``'s parts (a part split again has a gather of its own,
        which completes the part, which completes the batch)."""
        gather: Gather | None = getattr(batch, "_gather", None)
        if gather is None:
            gather = cls(batch)
            batch._gather = gather  # type: ignore[attr-defined]
        return gather

    def part(self, offset: int, width: int) -> MapBatch:
        """A new part of ``width`` calls from ``offset``, running already."""
        part = MapBatch(width)
        part._start()
        self.parts.append((offset, part))
        part.add_done_callback(self._part_done)
        return part

    def _part_done(self, _part: cf.Future[Any]) -> None:
        if self.batch.done() or not all(part.done() for _, part in self.parts):
            return
        values: list[Any] = [None] * self.batch.width
        errors: dict[int, BaseException] = {}
        cancelled = 0
        for offset, part in self.parts:
            if part.cancelled():
                cancelled += part.width
                for i in range(part.width):
                    errors[offset + i] = cf.CancelledError()
                continue
            error = part.exception()
            if error is not None:
                for i in range(part.width):
                    errors[offset + i] = error
                continue
            outcome: BatchOutcome = part.result()
            values[offset : offset + part.width] = outcome.values
            for i, exc in outcome.errors.items():
                errors[offset + i] = exc
        if cancelled == self.batch.width:
            self.batch._cancel_queued()
            return
        self.batch.set_result(BatchOutcome(values, errors))
