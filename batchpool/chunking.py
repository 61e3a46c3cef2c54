"""Grouping calls into chunks: one chunk is one job, one input and one outcome in storage."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: ``map`` aims at this many chunks per worker, so a slow chunk does not hold up the end.
CHUNKS_PER_WORKER = 4
#: A chunk of a function whose calls are known to be quick lasts at least this long.
MIN_CHUNK_SECONDS = 0.01
#: The largest chunk ``map`` makes by itself; bounds the latency of one job (and a worker
#: pickles large results in parts, see ``worker.COMPACT_BYTES``).
MAX_AUTO_CHUNKSIZE = 16384
#: With no length to go by, chunks start at one call and double up to this size.
MAX_GROWING_CHUNKSIZE = MAX_AUTO_CHUNKSIZE
#: The most single submits coalesced into one chunk.
MAX_COALESCE = 1024


def common_length(iterables: Sequence[Iterable[Any]]) -> int | None:
    """How many tuples ``zip(*iterables)`` yields, when every iterable knows its length."""
    if not iterables:
        return 0  # zip() of nothing is empty
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


def auto_chunksize(n_items: int, workers: int, seconds_per_call: float | None = None) -> int:
    """The chunk size ``map`` picks for ``n_items`` calls over ``workers`` parallel jobs.

    With ``seconds_per_call`` (what earlier calls of the function took), chunks that
    would end sooner than ``MIN_CHUNK_SECONDS`` are made larger, down to one per worker:
    a job's own cost (a few files, a few hops between threads, about a millisecond)
    must not outweigh its calls."""
    workers = max(1, workers)
    per_chunk = math.ceil(n_items / (CHUNKS_PER_WORKER * workers))
    if seconds_per_call is not None and seconds_per_call > 0:
        lasting = math.ceil(MIN_CHUNK_SECONDS / seconds_per_call)
        per_chunk = max(per_chunk, min(lasting, n_items // workers))
    return max(1, min(MAX_AUTO_CHUNKSIZE, per_chunk))


def chunk_sizes(chunksize: int | None) -> Iterator[int]:
    """Successive chunk sizes: ``chunksize`` every time, or 1, 2, 4, ... up to a cap."""
    if chunksize is not None:
        return itertools.repeat(chunksize)
    growing = (min(2**i, MAX_GROWING_CHUNKSIZE) for i in itertools.count())
    return growing


def iter_chunks(items: Iterable[T], chunksize: int | None) -> Iterator[list[T]]:
    """Split ``items`` into consecutive lists, lazily, keeping order and losing nothing."""
    iterator = iter(items)
    for size in chunk_sizes(chunksize):
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


def coalesce_target(n_pending: int, free_slots: int, limit: int) -> int:
    """How many queued single submits to put in the next chunk.

    While there are free slots for every queued call, each call is its own job,
    so calls run side by side as they would in a process pool (and a lone submit
    has the lowest latency). A backlog larger than the free slots is spread over
    ``limit`` chunks: a burst of thousands becomes dozens of jobs, not thousands.
    """
    if n_pending <= free_slots:
        return 1
    return max(1, min(MAX_COALESCE, math.ceil(n_pending / max(1, limit))))
