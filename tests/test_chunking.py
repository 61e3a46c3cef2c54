"""Properties of batchpool.chunking, and of ``map`` through a real executor."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool import BatchPoolExecutor
from batchpool.backends.base import Resources
from batchpool.chunking import (
    CHUNKS_PER_WORKER,
    MAX_AUTO_CHUNKSIZE,
    MAX_COALESCE,
    MAX_GROWING_CHUNKSIZE,
    MIN_CHUNK_SECONDS,
    auto_chunksize,
    coalesce_target,
    common_length,
    iter_chunks,
)
from batchpool.chunks import Chunk
from batchpool.culprits import halves, most_runs, piece_groups, piece_members, wanted_calls
from batchpool.future import BatchOutcome, BatchPoolFuture, MapBatch

pytestmark = pytest.mark.timeout(120)

# Pure functions: many examples are cheap. No example database in the repo.
pure = settings(max_examples=200, deadline=None, database=None)
# Through the executor: few examples, each a real map over worker processes.
real = settings(max_examples=15, deadline=None, database=None)

chunksizes = st.none() | st.integers(min_value=1, max_value=300)


# -- iter_chunks ---------------------------------------------------------------------------


@pure
@given(items=st.lists(st.integers(), max_size=2000), chunksize=chunksizes)
def test_iter_chunks_keeps_order_and_loses_nothing(items, chunksize):
    chunks = list(iter_chunks(items, chunksize))
    assert [x for chunk in chunks for x in chunk] == items
    assert all(chunk for chunk in chunks)
    assert all(isinstance(chunk, list) for chunk in chunks)


@pure
@given(n=st.integers(min_value=0, max_value=2000), chunksize=st.integers(1, 300))
def test_iter_chunks_fixed_size(n, chunksize):
    sizes = [len(chunk) for chunk in iter_chunks(range(n), chunksize)]
    assert len(sizes) == -(-n // chunksize)  # ceil
    assert all(size == chunksize for size in sizes[:-1])
    if sizes:
        assert 1 <= sizes[-1] <= chunksize


@pure
@given(n=st.integers(min_value=0, max_value=2000))
def test_iter_chunks_without_size_grows_by_doubling_up_to_the_cap(n):
    sizes = [len(chunk) for chunk in iter_chunks(range(n), None)]
    assert sum(sizes) == n
    expected = [min(2**i, MAX_GROWING_CHUNKSIZE) for i in range(len(sizes))]
    assert sizes[:-1] == expected[:-1]
    if sizes:
        assert 1 <= sizes[-1] <= expected[-1]


@pure
@given(items=st.lists(st.integers(), max_size=500), chunksize=chunksizes)
def test_iter_chunks_is_lazy(items, chunksize):
    """It reads no further than the chunk it yields, so an endless generator works."""
    consumed = []

    def source():
        for x in items:
            consumed.append(x)
            yield x

    chunks = iter_chunks(source(), chunksize)
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        assert len(consumed) == seen
    assert consumed == items


def test_iter_chunks_of_an_endless_generator():
    first = list(itertools.islice(iter_chunks(itertools.count(), 5), 3))
    assert first == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]


# -- auto_chunksize, coalesce_target, common_length ----------------------------------------


@pure
@given(n=st.integers(0, 10**9), workers=st.integers(-5, 10_000))
def test_auto_chunksize_bounds(n, workers):
    size = auto_chunksize(n, workers)
    assert isinstance(size, int)
    assert 1 <= size <= MAX_AUTO_CHUNKSIZE
    if size < MAX_AUTO_CHUNKSIZE:  # not capped: about four chunks per worker, no more
        assert -(-n // size) <= CHUNKS_PER_WORKER * max(1, workers)


@pure
@given(
    n=st.integers(1, 10**9),
    workers=st.integers(1, 10_000),
    seconds=st.floats(1e-9, 1e3, allow_nan=False),
)
def test_auto_chunksize_for_quick_calls_keeps_a_chunk_per_worker(n, workers, seconds):
    balanced = auto_chunksize(n, workers)
    size = auto_chunksize(n, workers, seconds)
    assert balanced <= size <= MAX_AUTO_CHUNKSIZE  # only ever larger, and still capped
    if size > balanced:  # made larger because a balanced chunk would end too soon
        assert balanced * seconds < MIN_CHUNK_SECONDS
        assert -(-n // size) >= min(workers, n)  # no fewer chunks than workers


@pure
@given(
    n_pending=st.integers(0, 10**7),
    free_slots=st.integers(-5, 10_000),
    limit=st.integers(-5, 10_000),
)
def test_coalesce_target_bounds(n_pending, free_slots, limit):
    target = coalesce_target(n_pending, free_slots, limit)
    assert isinstance(target, int)
    assert 1 <= target <= MAX_COALESCE
    if n_pending <= free_slots:  # room for every queued call: each runs alone
        assert target == 1
    elif target < MAX_COALESCE:  # a backlog, not capped: it fits in ``limit`` chunks
        assert target * max(1, limit) >= n_pending


@pure
@given(lists=st.lists(st.lists(st.integers(), max_size=30), min_size=1, max_size=5))
def test_common_length_is_what_zip_yields(lists):
    assert common_length(lists) == len(list(zip(*lists, strict=False)))
    assert common_length([tuple(x) for x in lists]) == len(list(zip(*lists, strict=False)))
    assert common_length([range(len(x)) for x in lists]) == len(list(zip(*lists, strict=False)))


@pure
@given(lists=st.lists(st.lists(st.integers(), max_size=30), min_size=1, max_size=5))
def test_common_length_is_none_when_an_iterable_has_no_length(lists):
    mixed = [*lists, (x for x in range(3))]
    assert common_length(mixed) is None
    assert common_length([iter(x) for x in lists]) is None


def test_common_length_of_no_iterables_is_zero():
    assert common_length([]) == 0


# -- map through a real executor -----------------------------------------------------------


def affine(x: int) -> int:
    return 3 * x + 1


def add3(a: int, b: int, c: int) -> tuple[int, int, int, int]:
    return (a, b, c, a + b + c)


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    storage = tmp_path_factory.mktemp("chunking-runs")
    with BatchPoolExecutor(max_workers=2, storage=str(storage)) as executor:
        yield executor


@real
@given(xs=st.lists(st.integers(-(10**6), 10**6), max_size=300), chunksize=chunksizes)
def test_map_equals_builtin_map(ex, xs, chunksize):
    assert list(ex.map(affine, xs, chunksize=chunksize, timeout=60)) == [affine(x) for x in xs]


@real
@given(
    a=st.lists(st.integers(), max_size=120),
    b=st.lists(st.integers(), max_size=120),
    c=st.lists(st.integers(), max_size=120),
    chunksize=chunksizes,
)
def test_map_of_several_iterables_has_zip_semantics(ex, a, b, c, chunksize):
    expected = [add3(*t) for t in zip(a, b, c, strict=False)]
    assert list(ex.map(add3, a, b, c, chunksize=chunksize, timeout=60)) == expected
    # Iterables without a length (one generator) give the same result.
    got = list(ex.map(add3, a, iter(b), c, chunksize=chunksize, timeout=60))
    assert got == expected


@real
@given(
    xs=st.lists(st.integers(), max_size=300),
    chunksize=chunksizes,
    buffersize=st.integers(1, 8),
    as_generator=st.booleans(),
)
def test_map_with_buffersize(ex, xs, chunksize, buffersize, as_generator):
    source = (x for x in xs) if as_generator else xs
    got = list(ex.map(affine, source, chunksize=chunksize, buffersize=buffersize, timeout=60))
    assert got == [affine(x) for x in xs]


def test_map_with_buffersize_reads_an_endless_generator_lazily(ex):
    pulled = []

    def endless():
        for i in itertools.count():
            if i >= 1000:  # closing must not drain the input: fail instead of eating memory
                raise AssertionError("map read 1000 items of an endless generator")
            pulled.append(i)
            yield i

    it = ex.map(affine, endless(), chunksize=2, buffersize=3, timeout=60)
    assert [next(it) for _ in range(10)] == [affine(i) for i in range(10)]
    it.close()  # cancels what was submitted ahead and reads no more input
    # 10 items used, at most ``buffersize`` chunks of 2 read ahead of them.
    assert len(pulled) <= 10 + 3 * 2 + 2


def test_map_of_no_iterables_is_empty(ex):
    assert list(ex.map(affine)) == []


# -- the pieces of a chunk whose job died (culprits.py) --------------------------------------

members_of_a_chunk = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=8)


@pure
@given(widths=members_of_a_chunk, data=st.data())
def test_pieces_run_each_wanted_call_once_and_gather_rebuilds_the_batch(
    widths: list[int], data: st.DataObject
) -> None:
    """However a chunk's members lie (one-call futures, map batches of any width), its two
    pieces run every wanted call exactly once between them, their members and widths
    cover the chunk's outcome, and each map batch gets back every value at its place."""
    futures: list[Any] = []
    for w in widths:
        futures.append(MapBatch(w) if w > 1 else BatchPoolFuture())
        futures[-1]._start()
    chunk = Chunk("c", futures, ["f()"], Resources(), widths=list(widths))
    n = chunk.n_calls
    skipped = set(data.draw(st.sets(st.integers(0, n - 1), max_size=n // 3)))
    # An input skip inside a batch never happens (only whole members are skipped).
    skipped = {i for i in skipped if chunk_member_width(chunk, i) == 1}
    wanted = wanted_calls(chunk, skipped)
    assert wanted == [i for i in range(n) if i not in skipped]
    halves_ = halves(wanted)
    assert sorted(halves_[0] + halves_[1]) == wanted
    assert abs(len(halves_[0]) - len(halves_[1])) <= 1
    pieces = []
    for calls in halves_:
        runs = set(calls)
        members, piece_widths = piece_members(chunk, runs)
        assert sum(piece_widths) == n
        piece = Chunk("p", members, ["f()"], Resources(), widths=piece_widths)
        covered = [
            i for m, first, w in piece.spans() if m is not None for i in range(first, first + w)
        ]
        assert covered == sorted(runs)
        groups = piece_groups([(n, b"", tuple(sorted(skipped)))], runs)
        assert set(groups[0][2]) == set(range(n)) - runs
        pieces.append(piece)
    # Each piece completes its members as Completion does: value = the call's index.
    for piece in pieces:
        for member, first, w in piece.spans():
            if member is None or member.done():
                continue
            if isinstance(member, MapBatch):
                member.set_result(BatchOutcome(list(range(first, first + w)), {}))
            else:
                member.set_result(first)
    for member, first, w in chunk.spans():
        if first in skipped:
            continue
        assert member.done()
        if isinstance(member, MapBatch):
            assert member.result().values == list(range(first, first + w))
        else:
            assert member.result() == first


def chunk_member_width(chunk: Chunk, call: int) -> int:
    for _member, first, w in chunk.spans():
        if first <= call < first + w:
            return w
    raise AssertionError(call)


def test_most_runs_of_a_call() -> None:
    assert most_runs(3, 1) == 3
    assert most_runs(3, 20) == 6  # 20, 10, 5, 3, 2 calls, then alone
    assert most_runs(1, 4) == 3
    assert most_runs(10, 1000) == 11
