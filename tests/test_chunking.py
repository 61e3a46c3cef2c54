"""Properties of batchpool.chunking, and of ``map`` through a real executor."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool import BatchPoolExecutor
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
