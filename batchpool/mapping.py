"""``map`` and ``async_map``: the input cut into chunks, one future per chunk, results in order.

A million-call map makes a few hundred futures, not a million, as the stdlib's
``ProcessPoolExecutor.map`` does with a chunksize: each chunk is one ``MapBatch``
whose result is the outcome of each of its calls, and the iterator flattens them
lazily, raising a call's exception when its item is reached. The input is read
chunk by chunk (all of it at once, or ``buffersize`` chunks ahead of the caller),
and each chunk is pickled in the caller's thread, where a pickling problem is
raised at once.

In a ``resume=True`` run, the calls of a chunk that returned before are not sent
again: the chunk's ``MapPart`` holds their earlier results, and a ``MapBatch``
only for the rest.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchpool.budget import FailureBudget, check_max_failures, failure_text
from batchpool.chunking import auto_chunksize, common_length, iter_chunks
from batchpool.errors import check_positive_int
from batchpool.future import BatchOutcome, MapBatch
from batchpool.progress import Progress
from batchpool.serialization import describe_callable

if TYPE_CHECKING:
    from batchpool.backends.base import Resources
    from batchpool.executor import BatchPoolExecutor

# On Python 3.10 concurrent.futures.TimeoutError is not yet the builtin one: raise
# something that both ``except`` clauses catch.
if cf.TimeoutError is TimeoutError:
    MapTimeout: type[Exception] = TimeoutError
else:  # pragma: no cover - Python 3.10
    MapTimeout = type("TimeoutError", (cf.TimeoutError, TimeoutError), {})

#: In a ``MapPart``'s ``resumed``: this call runs (its outcome comes from the batch).
_RUNS = object()


@dataclass(eq=False)
class MapPart:
    """One chunk of a map: the batch of its calls that run, and (``resume=True``) the
    earlier outcomes of those that do not, at their positions."""

    batch: MapBatch | None
    resumed: list[Any] | None = None  # (ok, value) per call, or _RUNS

    def cancel(self) -> None:
        if self.batch is not None:
            self.batch.cancel()

    def values(self, deadline: float | None) -> Iterator[Any]:
        """Each call's value, in order, once the batch is done; a call's exception is
        raised at its item."""
        ran: Iterator[Any] = iter(())
        if self.batch is not None:
            ran = _batch_values(self.batch, deadline)
        if self.resumed is None:
            return ran
        return _merge(self.resumed, ran)


@dataclass(frozen=True)
class MapOptions:
    """How a map runs, beyond its function and input (see ``BatchPoolExecutor.map``)."""

    chunksize: int | None = None
    buffersize: int | None = None
    resources: Resources | None = None  # None: the executor's
    progress: bool | None = None
    canary: int | None = None  # None: the executor's
    max_failures: int | float | None = None  # None: only the executor's


def check_canary(canary: Any) -> int:
    if isinstance(canary, bool) or not isinstance(canary, int) or canary < 0:
        raise ValueError(
            f"canary={canary!r} must be a number of calls >= 0: the first calls of a map, "
            "run before the rest is submitted (0: no canary)"
        )
    return canary


def check_map_arguments(fn: Any, options: MapOptions) -> None:
    """A clear error for what ``map`` cannot take, before any input is read."""
    if not callable(fn):
        raise TypeError(f"map() needs a callable, not a {type(fn).__name__}")
    if options.chunksize is not None:
        check_positive_int("chunksize", options.chunksize)
    if options.buffersize is not None:
        check_positive_int("buffersize", options.buffersize)
    if options.canary is not None:
        check_canary(options.canary)
    check_max_failures(options.max_failures)


def map_parts(
    executor: BatchPoolExecutor,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...] | list[Iterable[Any]],
    options: MapOptions,
    deadline: float | None = None,
) -> Generator[MapPart, None, None]:
    """Submit a map's chunks (all now, or ``buffersize`` ahead) and yield them in order.

    Everything is checked and, without ``buffersize``, submitted before this returns;
    closing the generator cancels what was submitted and not yet yielded. With a
    canary, its calls run first, and this raises the first of their errors."""
    check_map_arguments(fn, options)
    executor._check_open()
    chunksize, buffersize = options.chunksize, options.buffersize
    canary = executor._canary if options.canary is None else options.canary
    budget = _map_budget(fn, options)
    # Over one iterable, a chunk holds the arguments themselves: no tuple per call to
    # make, pickle and unpickle, and the worker calls fn through map().
    single = len(iterables) == 1
    items: Iterator[Any] = iter(iterables[0]) if single else zip(*iterables, strict=False)
    length = common_length(iterables)
    if buffersize is None and length is None:
        listed = list(items)  # everything is submitted now anyway: learn the length
        length, items = len(listed), iter(listed)
    label = describe_callable(fn)
    if chunksize is None and length is not None:
        watcher = executor._watcher
        chunksize = auto_chunksize(length, watcher.capacity, watcher.seconds_per_call(label))
    bar = Progress(length, label, options.progress, executor._watcher)
    first_item = 0

    def submit_chunk(chunk: list[Any]) -> MapPart:
        nonlocal first_item
        start, first_item = first_item, first_item + len(chunk)
        where = f"{label} in map() (the chunk of items {start} to {first_item - 1})"
        todo = chunk
        part = MapPart(None)
        keys = None
        if executor._resume:  # calls that returned before are not sent again
            no_kwargs: dict[str, Any] = {}
            calls = [((item,) if single else item, no_kwargs) for item in chunk]
            keys = executor._call_keys(fn, calls)
        if keys is not None:
            earlier = [executor._resumed_outcome(key) for key in keys]
            if any(outcome is not None for outcome in earlier):
                part.resumed = [_RUNS if outcome is None else outcome for outcome in earlier]
                runs = [i for i, outcome in enumerate(earlier) if outcome is None]
                todo, keys = [chunk[i] for i in runs], [keys[i] for i in runs]
        if todo:
            payload = executor._payloads.positional(fn, todo, where, single=single)
            part.batch = MapBatch(len(todo))
            executor._enqueue_batch(part.batch, payload, label, options.resources, keys, budget)
        bar.watch(part, len(chunk))
        return part

    submitted: collections.deque[MapPart] = collections.deque()
    first = list(itertools.islice(items, canary))
    if first:  # a canary: its calls run, and return, before the rest of the input is read
        slots = max(1, min(len(first), executor._watcher.capacity))
        size = -(-len(first) // slots)  # spread over the workers, for a quick answer
        submitted.extend(submit_chunk(c) for c in iter_chunks(first, min(size, chunksize or size)))
        try:
            _check_canary(submitted, len(first), label, deadline)
        except BaseException:
            bar.close()
            raise
    chunks = iter_chunks(items, chunksize)
    ahead = None if buffersize is None else max(0, buffersize - len(submitted))
    submitted.extend(submit_chunk(c) for c in itertools.islice(chunks, ahead))
    if buffersize is None:
        bar.input_done()

    def in_order() -> Generator[MapPart, None, None]:
        try:
            while submitted:
                yield submitted.popleft()
                if buffersize is not None:
                    for chunk in itertools.islice(chunks, 1):
                        submitted.append(submit_chunk(chunk))
            bar.input_done()
        except GeneratorExit:
            bar.close()
            raise
        finally:  # closed early: cancel what was submitted ahead, read no more input
            for part in submitted:
                part.cancel()

    return in_order()


class MapResults:
    """What ``map`` returns: the results of its calls in order, a call's exception
    raised at its item, after which the rest is cancelled and the iterator ends (as the
    stdlib's map iterator does).

    Iterating it runs in C: ``iter()`` gives an ``itertools.chain`` over each chunk's
    values, so a million results do not each resume a Python generator. ``next()`` and
    ``close()`` work as on the stdlib's generator."""

    __slots__ = ("_chain", "_chunks")

    def __init__(self, parts: Generator[MapPart, None, None], deadline: float | None) -> None:
        self._chunks = _chunk_values(parts, deadline)
        self._chain = itertools.chain.from_iterable(self._chunks)

    def __iter__(self) -> Iterator[Any]:
        return self._chain

    def __next__(self) -> Any:
        return next(self._chain)

    def close(self) -> None:
        """Stop early: cancel the calls not yet yielded, read no more input."""
        self._chunks.close()


def _check_canary(
    parts: collections.deque[MapPart], n_calls: int, label: str, deadline: float | None
) -> None:
    """Wait for a map's canary calls; raise the first error of one, with a note that
    nothing else of the map was submitted."""
    for part in parts:
        if part.batch is None:  # returned in an earlier session (resume=True)
            continue
        try:
            if deadline is None:
                part.batch.exception()
            else:
                part.batch.exception(max(0.0, deadline - time.monotonic()))
        except cf.TimeoutError:
            for each in parts:
                each.cancel()
            raise MapTimeout(
                f"map() did not finish within its timeout: its canary ({n_calls} calls of "
                f"{label}) was still running, and nothing else of the map was submitted"
            ) from None
    for part in parts:
        batch = part.batch
        if batch is None:
            continue
        error = batch.exception()  # done: this does not wait
        if error is None:
            outcome: BatchOutcome = batch.result()
            if outcome.errors:
                error = outcome.errors[min(outcome.errors)]
        if error is not None:
            raise _canary_failed(error, label, n_calls)


def _canary_failed(error: BaseException, label: str, n_calls: int) -> BaseException:
    """``error`` of a canary call, with a note that nothing else of the map was submitted."""
    note = (
        f"batchpool: this call is in the canary of map() of {label} (its first "
        f"{n_calls} calls, run before the rest): nothing else of the map was submitted"
    )
    add_note = getattr(error, "add_note", None)  # Python 3.11+
    if add_note is not None and note not in getattr(error, "__notes__", ()):
        add_note(note)
    return error


def _map_budget(fn: Callable[..., Any], options: MapOptions) -> FailureBudget | None:
    """The map's own ``max_failures`` budget, if it has one."""
    if options.max_failures is None:
        return None
    return FailureBudget(options.max_failures, f"map() of {describe_callable(fn)}")


def results(parts: Generator[MapPart, None, None], deadline: float | None) -> MapResults:
    return MapResults(parts, deadline)


def _chunk_values(
    parts: Generator[MapPart, None, None], deadline: float | None
) -> Generator[Iterator[Any], None, None]:
    """Each chunk's values, in order, as the caller reaches them."""
    try:
        for part in parts:
            values = part.values(deadline)
            del part  # the caller alone keeps results alive
            if type(values) is not _POPPING:  # it may raise a call's exception
                values = _ending_on_error(values, parts)
            yield values
    finally:
        parts.close()


def _ending_on_error(
    values: Iterator[Any], parts: Generator[MapPart, None, None]
) -> Generator[Any, None, None]:
    try:
        yield from values
    except BaseException:
        parts.close()  # the rest is cancelled, and the iterator ends after this item
        raise


def submitted_map(
    submit: Callable[..., cf.Future[Any]],
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    deadline: float | None,
    options: MapOptions,
    canary: int,
) -> Iterator[Any]:
    """``map`` as ``concurrent.futures.Executor.map`` does it: one ``submit`` per call.

    For code that replaced an executor's ``submit`` to watch map's calls, as
    ``tqdm.contrib.concurrent``'s helpers do for their progress bar: it sees every
    call. batchpool still groups the calls into chunks as it does ``submit``'s. The
    caller checks the arguments first (``check_map_arguments``). A canary's calls are
    waited for here; the map's own ``max_failures`` cancels the calls not yet started
    once exceeded, and the iterator raises its error where it reaches one."""
    buffersize = options.buffersize
    items = zip(*iterables, strict=False)
    pending: collections.deque[cf.Future[Any]] = collections.deque()
    if canary:
        pending.extend(submit(fn, *args) for args in itertools.islice(items, canary))
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if cf.wait(pending, remaining).not_done:
            for future in pending:
                future.cancel()
            raise MapTimeout("map() did not finish within its timeout: its canary was running")
        for future in pending:
            error = future.exception()
            if error is not None:
                raise _canary_failed(error, describe_callable(fn), canary)
    budget = _map_budget(fn, options)
    lock = threading.Lock()

    def count(future: cf.Future[Any]) -> None:
        if budget is None or future.cancelled():
            return
        error = future.exception()
        failures = [failure_text(error, "a call of the map")] if error is not None else []
        with lock:
            if not budget.record(1, failures):
                return
        for each in list(pending):
            each.cancel()

    def send(args: tuple[Any, ...]) -> cf.Future[Any]:
        if budget is not None and budget.tripped:
            raise budget.error()
        future = submit(fn, *args)
        future.add_done_callback(count)
        return future

    for future in pending:
        count(future)
    limit = None if buffersize is None else max(0, buffersize - len(pending))
    pending.extend(send(args) for args in itertools.islice(items, limit))

    def in_order() -> Iterator[Any]:
        try:
            while pending:
                future = pending.popleft()
                if buffersize is not None:
                    for args in itertools.islice(items, 1):
                        pending.append(send(args))
                try:
                    if deadline is None:
                        yield future.result()
                    else:
                        yield future.result(max(0.0, deadline - time.monotonic()))
                except cf.CancelledError:
                    if budget is not None and budget.tripped:
                        raise budget.error() from None
                    raise
                except cf.TimeoutError:
                    raise MapTimeout("map() did not finish within its timeout") from None
                finally:
                    del future  # the caller alone keeps the result alive
        finally:  # closed early: cancel the rest, read no more input
            for future in pending:
                future.cancel()

    return in_order()


def _batch_values(batch: MapBatch, deadline: float | None) -> Iterator[Any]:
    try:
        if deadline is None:
            outcome: BatchOutcome = batch.result()
        else:
            outcome = batch.result(max(0.0, deadline - time.monotonic()))
    except cf.TimeoutError:
        raise MapTimeout("map() did not finish within its timeout") from None
    # Read once: the batch lets go of its values, which the caller alone keeps.
    batch._result = None
    return _values(outcome)


_END = object()
#: The type of a chunk's values when none of its calls raised (see ``_values``).
_POPPING: type = type(iter([].pop, _END))


def _values(outcome: BatchOutcome) -> Iterator[Any]:
    """The values of a chunk, popped as the stdlib's map pops them: a result the caller
    dropped is freed at once, not when the chunk ends."""
    values, errors = outcome.values, outcome.errors
    del outcome
    values.reverse()
    if not errors:  # the common case, in C: pop until the end marker at the bottom
        values.insert(0, _END)
        return iter(values.pop, _END)
    return _values_and_errors(values, errors)


def _values_and_errors(values: list[Any], errors: dict[int, BaseException]) -> Iterator[Any]:
    i = -1
    while values:
        i += 1
        if i in errors:
            raise errors[i]
        yield values.pop()


def _merge(resumed: list[Any], ran: Iterator[Any]) -> Iterator[Any]:
    """A resumed chunk's values: earlier outcomes where the calls are not run again."""
    for earlier in resumed:
        if earlier is _RUNS:
            yield next(ran)
        else:
            ok, value = earlier
            if not ok:
                raise value
            yield value


class AsyncMap:
    """What ``async_map`` returns: awaitable (to an async iterator) and async-iterable."""

    def __init__(
        self,
        executor: BatchPoolExecutor,
        fn: Callable[..., Any],
        iterables: list[Iterable[Any]],
        timeout: float | None,
        options: MapOptions,
    ) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or a number of seconds >= 0")
        self._executor = executor
        self._options = options
        self._fn = fn
        self._iterables = iterables
        self._timeout = timeout
        self._parts: collections.deque[MapPart] | None = None
        self._deadline: float | None = None
        self._results = self._iterate()

    async def _submit(self) -> None:
        if self._parts is None:
            loop = asyncio.get_running_loop()
            if self._timeout is not None:
                self._deadline = loop.time() + self._timeout

            def submit_all() -> collections.deque[MapPart]:
                deadline = None if self._timeout is None else time.monotonic() + self._timeout
                parts = map_parts(
                    self._executor, self._fn, self._iterables, self._options, deadline
                )
                return collections.deque(parts)

            self._parts = await asyncio.to_thread(submit_all)
            self._fn = self._iterables = None  # type: ignore[assignment]

    async def _iterate(self) -> AsyncIterator[Any]:
        await self._submit()
        assert self._parts is not None
        parts, self._parts = self._parts, collections.deque()
        loop = asyncio.get_running_loop()
        try:
            while parts:
                part = parts.popleft()
                if part.batch is not None:
                    waiter = asyncio.wrap_future(part.batch)
                    if self._deadline is None:
                        await waiter
                    else:
                        try:
                            remaining = max(0.0, self._deadline - loop.time())
                            await asyncio.wait_for(asyncio.shield(waiter), remaining)
                        except (asyncio.TimeoutError, TimeoutError):
                            raise MapTimeout(
                                "async_map() did not finish within its timeout"
                            ) from None
                    del waiter
                values = part.values(None)  # done: reading it does not block
                del part
                for value in values:
                    yield value
                    del value
        finally:
            for part in parts:
                part.cancel()

    def __await__(self) -> Generator[Any, None, AsyncIterator[Any]]:
        async def ready() -> AsyncIterator[Any]:
            await self._submit()
            return self._results

        return ready().__await__()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._results
