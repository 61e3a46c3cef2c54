"""BatchPoolFuture: a real ``concurrent.futures.Future`` that can also be awaited."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections.abc import Generator
from typing import Any


class BatchPoolFuture(cf.Future[Any]):
    """The future of one call.

    Everything ``concurrent.futures`` offers works on it (``wait``,
    ``as_completed``, callbacks, ``asyncio.wrap_future``); ``await future`` works
    inside a running event loop without blocking it.
    """

    def cancel(self) -> bool:
        """Cancel the call if it has not started; True if it will never run.

        Unlike a bare ``Future``, waiters in ``wait``/``as_completed`` learn of the
        cancellation at once, not when the executor next looks at the call.
        """
        if not super().cancel():
            return False
        with self._condition:  # re-entrant
            if self._state == cf._base.CANCELLED:
                self.set_running_or_notify_cancel()
        return True

    def _start(self) -> bool:
        """Mark the call running, unless it was cancelled; for the executor only."""
        with self._condition:
            if self._state != cf._base.PENDING:
                return False
            self._state = cf._base.RUNNING
            return True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    async def async_result(self, timeout: float | None = None) -> Any:
        """The call's result, awaited; ``TimeoutError`` after ``timeout`` seconds.

        A timeout does not cancel the call.
        """
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self)), timeout)

    async def async_cancel(self) -> bool:
        """``cancel()`` for callers in an event loop (it never blocks)."""
        return self.cancel()
