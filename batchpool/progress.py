"""A progress bar for ``map`` (tqdm): calls done, failed, running, and the rate.

``progress=None`` (the default) shows a bar only when stderr is a terminal, and
only for maps still running after two seconds, so short maps and logs stay
clean. ``True`` always shows it (also in logs), ``False`` never.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchpool.mapping import MapPart
    from batchpool.watcher import Watcher

#: A default bar appears only for maps that run longer than this many seconds.
DEFAULT_DELAY = 2.0
#: The running/pending counts are refreshed at most this often (seconds).
REFRESH = 0.5


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


class Progress:
    """Counts the calls of one ``map`` as they end, on a tqdm bar."""

    def __init__(
        self, total: int | None, label: str, enabled: bool | None, watcher: Watcher
    ) -> None:
        self._bar: Any = None
        self._watcher = watcher
        self._lock = threading.Lock()
        self._total = total
        self._watched = 0
        self._done = 0
        self._failed = 0
        self._refreshed = 0.0
        if enabled is False or (enabled is None and not _stderr_is_terminal()):
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            desc=label,
            unit="call",
            delay=DEFAULT_DELAY if enabled is None else 0.0,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def watch(self, part: MapPart, n_calls: int) -> None:
        """Count the calls of this chunk of the map as they end."""
        if self._bar is None:
            return
        with self._lock:
            self._watched += n_calls
        resumed = n_calls - (part.batch.width if part.batch is not None else 0)
        if resumed:  # returned in an earlier session of the run: done already
            self._count(resumed, 0)
        if part.batch is not None:
            part.batch.add_done_callback(self._ended)

    def _ended(self, batch: cf.Future[Any]) -> None:
        n_calls = getattr(batch, "width", 1)
        if batch.cancelled():
            failed = 0
        elif batch.exception() is not None:
            failed = n_calls
        else:  # not from the result: map's iterator may have let go of it already
            failed = getattr(batch, "failed", 0)
        self._count(n_calls, failed)

    def input_done(self) -> None:
        """Every call of the map was submitted: the total is known now."""
        if self._bar is None:
            return
        with self._lock:
            if self._total is None:
                self._total = self._watched
                self._bar.total = self._watched
                self._bar.refresh()
            finished = self._done >= self._watched
        if finished:
            self.close()

    def _count(self, n_calls: int, failed: int) -> None:
        with self._lock:
            bar = self._bar
            if bar is None:
                return
            self._done += n_calls
            self._failed += failed
            bar.update(n_calls)
            now = time.monotonic()
            # Most futures end in the watcher's thread, the one place its counts are
            # read without asking it; a cancel in the caller's thread skips them.
            if now - self._refreshed >= REFRESH or self._done == self._total:
                self._refreshed = now
                postfix = {"failed": self._failed}
                counts = self._watcher.counts_in_own_thread()
                if counts is not None:
                    postfix["running"] = counts.get("Running", 0) + counts.get("Ready", 0)
                    postfix["pending"] = counts.get("Pending", 0)
                bar.set_postfix(postfix, refresh=False)
            finished = self._total is not None and self._done >= self._total
        if finished:
            self.close()

    def close(self) -> None:
        with self._lock:
            bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
