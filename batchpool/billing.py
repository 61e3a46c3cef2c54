"""What a run costs, as a batch service bills it: the cores it bills, the time lost to
attempts that died, and an estimate of a map before it runs.

Hail Batch bills a job for the larger of the cores it asked and the cores its memory
implies, in its own core sizes, and bills the time of attempts that a preemption cut
short as well. Its documentation (hail-is/hail, ``hail/python/hailtop/batch/docs/
service.rst``, "Billing") says so in three notes:

- "each 1 core requested gets 3.75 GB of memory. Therefore, if a user requests 1 CPU
  and 7 GB of memory, the user will get 2 cores for their job and will be billed for 2
  cores";
- "The amount of CPU reserved for a job is rounded up to powers of two with a minimum
  of 0.25 cores. For example, a job requesting 5 cores will be rounded up to 8 cores";
- "If a worker is preempted ... you will be billed for the time the job was running up
  until the preemption time".

``billed_cores`` is that rule, in one place: the journal (``Handed.billed_cores``), the
live ``usage()`` and ``batchpool status`` all use it. ``memory_per_core`` is in GiB (the
unit of the job option ``memory="7G"``, see ``amount_mib``); None or 0 turns the rule
off, and a job is billed the CPUs it asked, as engines that do not bill memory do.

``record_lost_attempt`` writes the end marker of an attempt whose worker died without
one, on the worker's behalf, so that the time it ran is counted (``EndMarker.lost``).
``estimate`` runs a few calls of a map and says what the whole map would take.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchpool import documents
from batchpool.backends.base import Resources, amount_mib
from batchpool.documents import EndMarker, StartMarker
from batchpool.runs import format_cost
from batchpool.store import Store

if TYPE_CHECKING:
    from batchpool.executor import BatchPoolExecutor

log = logging.getLogger("batchpool")

#: The smallest core size Hail Batch bills; sizes are this times a power of two.
SMALLEST_CORE_SIZE = 0.25
#: Memory words of Hail Batch (``job.memory("standard")``): memory that follows the
#: cores asked for, so it implies no more cores than those.
MEMORY_PER_CORE_WORDS = frozenset({"lowmem", "standard", "highmem"})


def core_size(cores: float) -> float:
    """``cores`` rounded up to Hail Batch's core sizes: 0.25, 0.5, 1, 2, 4, 8, 16, ..."""
    if cores <= SMALLEST_CORE_SIZE:
        return SMALLEST_CORE_SIZE
    # A hair under the exact quotient, so that 2.0000000001 (float noise) stays 2.
    return SMALLEST_CORE_SIZE * 2.0 ** math.ceil(math.log2(cores / SMALLEST_CORE_SIZE) - 1e-9)


def memory_per_core_gib(value: float | str | None) -> float | None:
    """``memory_per_core`` as GiB per core, or None when the rule is off (None or 0);
    a ``ValueError`` that says what to pass otherwise."""
    if value is None:
        return None
    what = (
        f"memory_per_core={value!r} is not an amount of memory per core; pass GiB per core "
        "as a number (3.75, what Hail Batch bills by), a string such as '3.75G' or '512M', "
        "or 0 to bill the CPUs asked only"
    )
    if isinstance(value, bool):
        raise ValueError(what)
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(what)
        return float(value) or None
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text) or None  # a bare number: GiB, as the number form
        except ValueError:
            pass
        try:
            mib = amount_mib(text, "memory_per_core")
        except ValueError:
            raise ValueError(what) from None
        return mib / 1024
    raise ValueError(what)


def billed_cores(
    cpus: float, memory: str | int | None, memory_per_core: float | str | None
) -> float:
    """The cores a job that asks ``cpus`` and ``memory`` is billed.

    With ``memory_per_core`` (GiB per core; None or 0: off) the job is billed the
    larger of ``cpus`` and ``memory / memory_per_core``, rounded up to Hail Batch's
    core sizes (0.25, 0.5, 1, 2, 4, ...; Hail rounds the cores asked up too, so 3 CPUs
    bill 4): 1 CPU and "7G" at 3.75 is 2 cores, 1 CPU and "16G" is 8, 0.5 CPU and "1G"
    is 0.5. Without it, the job is billed ``cpus``, as asked.
    ``memory`` is the job option (``"7G"``, ``"512M"``, bytes as an int; Hail's
    ``"standard"``, ``"lowmem"`` and ``"highmem"`` follow the cores)."""
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not cpus > 0:
        raise ValueError(f"cpus={cpus!r} is not a number of CPUs > 0; pass e.g. 1, 4 or 0.5")
    ratio = memory_per_core_gib(memory_per_core)
    if ratio is None:
        return float(cpus)
    implied = 0.0
    if memory is not None and not (
        isinstance(memory, str) and memory.strip().lower() in MEMORY_PER_CORE_WORDS
    ):
        if isinstance(memory, bool) or not isinstance(memory, (int, str)):
            raise ValueError(
                f"memory={memory!r} is not an amount of memory; pass e.g. '7G', '512M' or bytes"
            )
        implied = amount_mib(memory, "the billing rule") / 1024 / ratio
    return core_size(max(float(cpus), implied))


def billed_cores_of(resources: Resources, memory_per_core: float | None) -> float:
    """``billed_cores`` of a job's ``Resources``; its CPUs when its memory cannot be read
    (the engine says what is wrong with it: billing never stops a run)."""
    try:
        return billed_cores(resources.cpus, resources.memory, memory_per_core)
    except ValueError as exc:
        if str(exc) not in _warned:  # once per memory, not once per job
            _warned.add(str(exc))
            log.warning("batchpool: billing the CPUs asked only: %s", exc)
        return float(resources.cpus)


_warned: set[str] = set()


# -- attempts that died ----------------------------------------------------------------------


def record_lost_attempt(
    store: Store, secret: bytes, chunk_id: str, attempt: int, reason: str
) -> EndMarker | None:
    """Write the end marker of an attempt that died without one, on its worker's behalf:
    from its start marker to now, ``lost=True``. None when the attempt never started (no
    start marker), its worker wrote its own end marker, or the store fails (a warning:
    the run goes on). Signed as the worker signs its markers."""
    try:
        start = store.get_document(StartMarker, store.start_key(chunk_id, attempt), secret)
    except FileNotFoundError:
        return None  # it never started: nothing ran, nothing is billed
    except Exception as exc:
        log.warning("batchpool: could not read the start of a lost job of %s: %s", chunk_id, exc)
        return None
    if start.started is None:
        return None
    ended = max(time.time(), start.started)
    end = EndMarker(
        chunk=chunk_id,
        attempt=attempt,
        host=start.host,
        pid=start.pid,
        started=start.started,
        ended=ended,
        wall_seconds=ended - start.started,
        error=f"lost: {reason}"[:10_000],
        lost=True,
    )
    key = store.end_key(chunk_id, attempt)
    try:  # never over the worker's own marker
        if not store.create_new(key, documents.encode(end, key, secret)):
            return None
    except Exception as exc:
        log.warning("batchpool: could not record the lost job of %s: %s", chunk_id, exc)
        return None
    return end


# -- an estimate before a map ---------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """What a map would take, from a sample of its calls run as jobs (``estimate``)."""

    #: The calls of the whole map, and how many of them were run to measure.
    calls: int
    sample: int
    #: Wall seconds per call in the sample's jobs (their start-up included).
    seconds_per_call: float
    #: Cores each job is billed (``billed_cores``).
    billed_cores: float
    #: How many jobs run at once (``executor.max_workers``).
    workers: int
    #: Core-hours billed for the whole map: calls x seconds per call x billed cores.
    core_hours: float
    #: How long the whole map would run: its calls' seconds shared by the workers.
    wall_seconds: float
    #: ``core_hours`` at the executor's ``cost_per_core_hour``, when one was given.
    cost: float | None = None
    cost_per_core_hour: float | None = None
    #: The function's name, for the sentence.
    function: str = "the function"

    def __str__(self) -> str:
        workers = f"{self.workers} worker{'s' if self.workers != 1 else ''}"
        text = (
            f"about {_duration(self.wall_seconds)} on {workers}, "
            f"{self.core_hours:.3g} core-hours billed"
        )
        if self.cost is not None:
            text += f", estimated cost {format_cost(self.cost)}"
        sample = f"{self.sample} call{'s' if self.sample != 1 else ''}"
        return (
            f"{text} (estimated from {sample} of {self.function}: "
            f"{_duration(self.seconds_per_call)} each)"
        )


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate(
    executor: BatchPoolExecutor,
    fn: Callable[..., Any],
    items: Iterable[Any],
    sample: int = 10,
) -> Estimate:
    """Run the first ``sample`` calls of ``map(fn, items)`` as jobs and say how long the
    whole map would take and how many core-hours it would bill (``Estimate``).

    The sample's jobs are spread over the workers; seconds per call are the wall seconds
    those jobs report, over the calls they ran (measured from the executor's ``usage()``,
    so other jobs of the executor that end meanwhile are counted too). A sample call
    that raises raises here, before the big map. ``items`` without a length is read
    into a list."""
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"sample={sample!r} must be a number of calls >= 1 to run and time")
    listed = items if isinstance(items, Sequence) else list(items)
    calls = len(listed)
    if calls == 0:
        raise ValueError("estimate() needs at least one item: there is no call to time")
    taken = [listed[i] for i in range(min(sample, calls))]
    workers = executor.max_workers
    before = executor.usage()
    chunksize = max(1, -(-len(taken) // max(1, workers)))  # spread over the workers
    for _ in executor.map(fn, taken, chunksize=chunksize, progress=False):
        pass  # a call that raised raises here
    after = executor.usage()
    per_call = max(0.0, after.wall_seconds - before.wall_seconds) / len(taken)
    cores = billed_cores_of(executor._resources, executor._memory_per_core)
    core_hours = calls * per_call * cores / 3600
    price = after.cost_per_core_hour
    return Estimate(
        calls=calls,
        sample=len(taken),
        seconds_per_call=per_call,
        billed_cores=cores,
        workers=workers,
        core_hours=core_hours,
        wall_seconds=calls * per_call / max(1, workers),
        cost=None if price is None else core_hours * price,
        cost_per_core_hour=price,
        function=getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn),
    )
