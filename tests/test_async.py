"""The asyncio surface: async_submit, async_map, awaitable futures, async with.

Each test runs its own event loop with ``asyncio.run`` (no plugin needed).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from calls import add, divide, touch_after, triple, wait_for
from conftest import Gate

from batchpool import BatchPoolExecutor, BatchPoolFuture


class RecordsPicklingThread:
    """An argument that records which thread pickles it."""

    threads: list[int] = []

    def __reduce__(self) -> tuple[Any, ...]:
        RecordsPicklingThread.threads.append(threading.get_ident())
        return (int, (7,))


def test_the_issue_example(tmp_path: Path) -> None:
    seen: list[Any] = []

    async def main() -> None:
        async with BatchPoolExecutor(storage=str(tmp_path)) as bpe:
            fut = await bpe.async_submit(pow, 2, 10)
            seen.append(await fut)
            async for r in await bpe.async_map(lambda x, y: x + y, [range(3), range(3)]):
                seen.append(r)

    asyncio.run(main())
    assert seen == [1024, 0, 2, 4]


def test_async_submit_returns_an_awaitable_real_future(executor: BatchPoolExecutor) -> None:
    async def main() -> Any:
        future = await executor.async_submit(add, 2, 3)
        assert isinstance(future, BatchPoolFuture)
        return await future

    assert asyncio.run(main()) == 5


def test_async_map_without_await(executor: BatchPoolExecutor) -> None:
    async def main() -> list[int]:
        return [r async for r in executor.async_map(triple, [range(20)], chunksize=3)]

    assert asyncio.run(main()) == [3 * i for i in range(20)]


def test_async_map_raises_at_the_failing_item(executor: BatchPoolExecutor) -> None:
    async def main() -> list[float]:
        got: list[float] = []
        with pytest.raises(ZeroDivisionError):
            async for r in await executor.async_map(divide, [[1, 2, 0, 4]], chunksize=1):
                got.append(r)
        return got

    assert asyncio.run(main()) == [1.0, 0.5]


def test_async_map_timeout(executor: BatchPoolExecutor, gate: Gate) -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            async for _ in await executor.async_map(wait_for, [[gate.path("go")]], timeout=0.1):
                pass

    asyncio.run(main())
    gate.open("go")


def test_async_map_break_cancels_what_has_not_started(tmp_path: Path, gate: Gate) -> None:
    gate.open("first")
    gates = [gate.path("first")] + [gate.path("rest")] * 19
    paths = [gate.path(f"t{i}") for i in range(20)]

    async def main() -> None:
        async with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as ex:
            results = await ex.async_map(touch_after, [gates, paths], chunksize=1)
            async for _ in results:
                break
            await results.aclose()  # type: ignore[attr-defined]
            gate.open("rest")

    asyncio.run(main())
    assert sum(Path(p).exists() for p in paths[1:]) <= 2


def test_exceptions_through_await(executor: BatchPoolExecutor) -> None:
    async def main() -> None:
        future = await executor.async_submit(divide, 0)
        with pytest.raises(ZeroDivisionError):
            await future

    asyncio.run(main())


def test_gather_wrap_future_and_async_result(executor: BatchPoolExecutor) -> None:
    async def main() -> list[int]:
        futures = [executor.submit(triple, i) for i in range(10)]
        first = await futures[0].async_result(timeout=30)
        rest = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures[1:]))
        return [first, *rest]

    assert asyncio.run(main()) == [3 * i for i in range(10)]


def test_pickling_never_runs_on_the_event_loop_thread(executor: BatchPoolExecutor) -> None:
    RecordsPicklingThread.threads.clear()

    async def main() -> int:
        loop_thread = threading.get_ident()
        future = await executor.async_submit(add, RecordsPicklingThread(), 1)
        total = await future
        async for _ in await executor.async_map(add, [[RecordsPicklingThread()], [1]]):
            pass
        assert RecordsPicklingThread.threads, "the argument was never pickled"
        assert loop_thread not in RecordsPicklingThread.threads
        return int(total)

    assert asyncio.run(main()) == 8


def test_the_loop_keeps_running_while_a_call_runs(executor: BatchPoolExecutor, gate: Gate) -> None:
    async def main() -> Any:
        future = await executor.async_submit(wait_for, gate.path("go"), "done")
        ticks = 0
        while ticks < 20:  # the loop runs other tasks while the call is out
            await asyncio.sleep(0.001)
            ticks += 1
        assert not future.done()
        gate.open("go")
        return await future

    assert asyncio.run(main()) == "done"


def test_async_with_waits_on_exit(tmp_path: Path) -> None:
    async def main() -> list[BatchPoolFuture]:
        async with BatchPoolExecutor(max_workers=2, storage=str(tmp_path)) as ex:
            return [await ex.async_submit(triple, i) for i in range(5)]

    futures = asyncio.run(main())
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 3, 6, 9, 12]
