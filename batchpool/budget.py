"""``max_failures``: stop a run, or a map, once more of its calls failed than allowed.

A ``FailureBudget`` counts the calls that ended and those that failed (raised, or got
no result: ``WorkerLostError``) among the calls it watches: every call of the executor
(``BatchPoolExecutor(max_failures=...)``) or of one map (``map(..., max_failures=...)``).
Once it is exceeded, the watcher stops what it watches (``Watcher._stop_for_budget``):
calls not yet handed over and jobs still queued by the engine fail with
``FailureBudgetExceeded``; jobs already running finish. The watcher thread counts;
callers' threads only read ``tripped``.
"""

from __future__ import annotations

import math
from typing import Any

from batchpool.errors import FailureBudgetExceeded

#: How many failures the error names.
FIRST_FAILURES = 3


def check_max_failures(value: Any) -> int | float | None:
    """``max_failures`` as given, or a clear error: a count (an int >= 0) or a fraction
    of the calls ended so far (a float between 0 and 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"max_failures must be a count of calls (an int >= 0) or a fraction of the calls "
            f"ended so far (a float between 0 and 1), not {type(value).__name__}"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"max_failures={value} must be >= 0 (0: stop at the first failure)")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError(
            f"max_failures={value} as a float is a fraction of the calls ended so far and "
            "must be between 0 and 1; give an int for a count of calls"
        )
    return value


class FailureBudget:
    """How many calls of ``scope`` may fail: a count, or a fraction of those ended.

    A fraction is judged once at least ``1 / fraction`` calls have ended (0.1: after 10
    calls), so that the first failure alone never stops a run allowed 10%."""

    def __init__(self, limit: int | float, scope: str) -> None:
        self.limit = limit
        self.scope = scope
        self.ended = 0
        self.failed = 0
        self.first_failures: list[str] = []
        self.tripped = False
        #: What was stopped when it tripped, for the error's text (set by the watcher).
        self.stopped = ""
        self._when_tripped = ""

    def allowed(self) -> float:
        """How many failures are allowed now."""
        if isinstance(self.limit, float):
            if self.ended < math.ceil(1 / self.limit):
                return math.inf
            return self.limit * self.ended
        return self.limit

    def record(self, ended: int, failures: list[str], failed: int | None = None) -> bool:
        """Count ``ended`` calls, ``failed`` of them failed (default: one per entry of
        ``failures``, their descriptions); True when this exceeds the budget for the
        first time."""
        self.ended += ended
        self.failed += len(failures) if failed is None else failed
        room = FIRST_FAILURES - len(self.first_failures)
        if room > 0:
            self.first_failures.extend(failures[:room])
        if self.tripped or self.failed <= self.allowed():
            return False
        self.tripped = True
        self._when_tripped = self.describe()  # the figures the error names
        return True

    def describe(self) -> str:
        limit = self.limit
        allowed = f"{limit:.0%} of the calls ended" if isinstance(limit, float) else str(limit)
        return (
            f"max_failures={limit!r} of {self.scope} was exceeded: {self.failed} of the "
            f"{self.ended} calls that ended so far failed (allowed: {allowed})"
        )

    def error(self) -> FailureBudgetExceeded:
        """The error of the calls this budget stopped (a new one per caller), with the
        figures of the moment it was exceeded."""
        text = (
            f"{self._when_tripped or self.describe()}, so its calls not yet run were "
            f"stopped{self.stopped} and fail with this error; jobs already running "
            f"finish. The first failures: {'; '.join(self.first_failures)}. Mend them and "
            "run again (with resume=True, only the calls that did not return run), or "
            "allow more with a larger max_failures"
        )
        return FailureBudgetExceeded(text)


def failure_text(exc: BaseException, where: str) -> str:
    """One failure as the budget's error names it."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200] + (
        f" ({where})"
    )
