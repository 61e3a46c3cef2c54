"""What a run is and how its jobs are doing, read from the store alone.

The executor writes, and ``batchpool`` (the CLI) and ``BatchPoolExecutor.attach``
read, the run's JSON documents (``documents.py``; ``store.py`` for the layout):
the manifest, the client's journal in ``jobs/``, and the workers' ``events/``
markers. Nothing here unpickles anything, and the secret is optional: without it
a run is read from any machine that reaches the storage, to be shown; with it,
only what carries the run's signature is read, to be acted on.

A job (one chunk, over its attempts) is in one of Hail Batch's states
(``JOB_STATES``), derived from the newest evidence:

- **Success** / **Failed**: an outcome was written; Failed when a call raised.
- **Error**: the client gave up after its attempts (journal), or the worker
  failed before it could write an outcome and no attempt followed.
- **Cancelled**: the client dropped the job (journal).
- **Running**: a worker wrote its start marker and no end marker yet.
- **Ready**: the client handed it to the engine (journal); no worker started yet.
- **Pending**: its input is in the store, waiting for the client to hand it over
  (or over again: the client found its last attempt dead, ``EndMarker.lost``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchpool.documents import (
    CancelRequest,
    DocumentError,
    EndMarker,
    GivenUp,
    JournalEntry,
    Manifest,
    StartMarker,
    decode,
    describe_problem,
)
from batchpool.errors import UnsafePathError
from batchpool.future import FINAL_STATES, JOB_STATES
from batchpool.store import Store, open_storage

__all__ = [
    "JOB_STATES",
    "JobView",
    "RunView",
    "Usage",
    "find_runs",
    "format_cost",
    "open_run",
    "read_run",
]


# -- usage ------------------------------------------------------------------------------------


@dataclass
class Usage:
    """What the jobs of a run used, summed over the attempts that ended.

    ``core_seconds`` is wall time times the cores each job is billed: the CPUs it
    asked for, or more when the run bills memory too (``memory_per_core``, see
    ``billing.billed_cores``): what batch services bill. It includes the time of
    attempts that died without an outcome (services bill preempted time), which is
    also counted apart: ``lost_attempts``, ``lost_seconds``, ``lost_core_seconds``.
    ``cpu_seconds`` is the CPU time the workers used. ``peak_memory_bytes`` is the
    largest peak resident size of one job. ``jobs`` counts the attempts whose worker
    said how they ended.
    """

    jobs: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    core_seconds: float = 0.0
    peak_memory_bytes: int = 0
    cost_per_core_hour: float | None = None
    lost_attempts: int = 0
    lost_seconds: float = 0.0
    lost_core_seconds: float = 0.0

    def add(self, end: EndMarker | Mapping[str, Any], cpus: float = 1.0) -> None:
        """Count one job's end marker (or the meta of its outcome), billed ``cpus``
        cores; an end marker the client wrote for an attempt that died (``lost``)
        counts as lost time."""
        if isinstance(end, EndMarker):
            wall, cpu, peak = end.wall_seconds, end.cpu_seconds, end.peak_memory_bytes
            lost = end.lost
        else:
            wall, cpu, peak = (
                end.get("wall_seconds"),
                end.get("cpu_seconds"),
                end.get("peak_memory_bytes"),
            )
            lost = bool(end.get("lost"))
        seconds = float(wall or 0.0)
        self.wall_seconds += seconds
        self.core_seconds += seconds * cpus
        if lost:
            self.lost_attempts += 1
            self.lost_seconds += seconds
            self.lost_core_seconds += seconds * cpus
            return
        self.jobs += 1
        self.cpu_seconds += float(cpu or 0.0)
        self.peak_memory_bytes = max(self.peak_memory_bytes, int(peak or 0))

    @property
    def core_hours(self) -> float:
        return self.core_seconds / 3600

    @property
    def cpu_hours(self) -> float:
        return self.cpu_seconds / 3600

    @property
    def lost_core_hours(self) -> float:
        """The core-hours of attempts that died without an outcome (in ``core_hours``)."""
        return self.lost_core_seconds / 3600

    @property
    def cost(self) -> float | None:
        """``core_hours * cost_per_core_hour``, when a price was given."""
        if self.cost_per_core_hour is None:
            return None
        return self.core_hours * self.cost_per_core_hour

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "wall_seconds": round(self.wall_seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "core_hours": round(self.core_hours, 6),
            "cpu_hours": round(self.cpu_hours, 6),
            "peak_memory_bytes": self.peak_memory_bytes,
            "cost_per_core_hour": self.cost_per_core_hour,
            "estimated_cost": None if self.cost is None else round(self.cost, 6),
            "lost_attempts": self.lost_attempts,
            "lost_seconds": round(self.lost_seconds, 3),
            "lost_core_hours": round(self.lost_core_hours, 6),
        }

    def __str__(self) -> str:
        text = (
            f"{self.jobs} job{'s' if self.jobs != 1 else ''}, "
            f"{self.core_hours:.4f} core-hours billed, {self.cpu_hours:.4f} CPU-hours used, "
            f"peak memory {format_bytes(self.peak_memory_bytes)}"
        )
        if self.lost_attempts:
            attempts = f"{self.lost_attempts} attempt{'s' if self.lost_attempts != 1 else ''}"
            text += f", {self.lost_core_hours:.4f} lost core-hours ({attempts} that died)"
        if self.cost is not None:
            cost = format_cost(self.cost)
            text += f", estimated cost {cost} (at {self.cost_per_core_hour}/core-hour)"
        return text

    def add_job(self, job: JobView) -> None:
        """Count every attempt of ``job`` that ended saying how long it ran, at the cores
        the job is billed (the journal's, else the CPUs it asked for)."""
        for end in job.ends.values():
            if end.wall_seconds is not None:
                self.add(end, job.billed_cores if job.billed_cores is not None else job.cpus)


def format_cost(cost: float) -> str:
    """Two decimals from 1 up, two significant digits below (``2.2e-05``)."""
    return f"{cost:,.2f}" if cost >= 1 else f"{cost:.2g}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -- one run ----------------------------------------------------------------------------------


@dataclass
class JobView:
    """One job of a run: a chunk of calls over its attempts, as the store tells it."""

    chunk: str
    state: str = "Pending"
    attempt: int = 1
    calls: int | None = None
    labels: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    cpus: float = 1.0
    #: The cores the job is billed (the journal's ``Handed.billed_cores``), if recorded.
    billed_cores: float | None = None
    host: str | None = None
    pid: int | None = None
    pid_started: float | None = None
    started: float | None = None
    ended: float | None = None
    exit: str | None = None
    failed_calls: int = 0
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    reason: str | None = None
    has_result: bool = False
    #: A later session of the run (``resume=True``) submitted its failed calls again.
    rerun: bool = False
    #: Its job died and its calls ran on split, in these chunks (their calls are
    #: counted there).
    split_into: list[str] = field(default_factory=list)
    #: attempts whose worker started: {attempt: start marker}
    starts: dict[int, StartMarker] = field(default_factory=dict, repr=False)
    ends: dict[int, EndMarker] = field(default_factory=dict, repr=False)
    logs: list[int] = field(default_factory=list, repr=False)

    @property
    def job_id(self) -> str | None:
        return self.job_ids[-1] if self.job_ids else None

    @property
    def start(self) -> StartMarker | None:
        """The start marker of the newest attempt, if its worker wrote one."""
        return self.starts.get(self.attempt)

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        if self.ended is None and self.state in FINAL_STATES:
            return None  # it ended without saying when (killed, given up)
        end = self.ended if self.ended is not None else time.time()
        return end - self.started

    def as_dict(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "state": self.state,
            "attempt": self.attempt,
            "calls": self.calls,
            "labels": self.labels,
            "job_ids": self.job_ids,
            "cpus": self.cpus,
            "billed_cores": self.billed_cores,
            "host": self.host,
            "started": self.started,
            "ended": self.ended,
            "duration": None if self.duration is None else round(self.duration, 3),
            "exit": self.exit,
            "failed_calls": self.failed_calls,
            "cpu_seconds": self.cpu_seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "reason": self.reason,
            "rerun": self.rerun,
            "split_into": self.split_into,
        }


@dataclass
class RunView:
    """A run as its store tells it, at the moment it was read.

    ``verified`` says whether the run secret was used to read it: then every document
    here carries the run's signature, and those that did not are left out and named
    in ``problems``. Without the secret, the documents are what the store holds,
    checked against their schemas only: good to show, never to act on.
    """

    store: Store
    #: None when manifest.json is damaged, forged, or of another format (see problems).
    manifest: Manifest | None
    jobs: list[JobView]
    verified: bool = False
    #: When the client closed the run (``shutdown``), None while open or if it died.
    closed: float | None = None
    cancel_request: CancelRequest | None = None
    size_bytes: int = 0
    #: The sequence number of the next journal entry.
    next_journal: int = 0
    #: What could not be read: objects not in their schema, unsigned or forged
    #: documents (when verified), files that are not part of a run's layout.
    problems: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def folder(self) -> str:
        return self.store.root.rsplit("/", 1)[-1]

    @property
    def run_id(self) -> str:
        return self.manifest.run_id if self.manifest is not None else self.folder

    @property
    def name(self) -> str | None:
        return self.manifest.name if self.manifest is not None else None

    @property
    def created(self) -> str | None:
        return self.manifest.created if self.manifest is not None else None

    @property
    def backend_name(self) -> str | None:
        return self.manifest.backend.name if self.manifest is not None else None

    def counts(self) -> dict[str, int]:
        """Jobs by state, in ``JOB_STATES`` order, states with no job left out."""
        found = Counter(job.state for job in self.jobs)
        return {state: found[state] for state in JOB_STATES if found[state]}

    def call_counts(self) -> dict[str, int]:
        """Calls by state: those of a Failed job that returned count as Success, and
        failures that a later session ran again (``rerun``) count there only."""
        found: Counter[str] = Counter()
        for job in self.jobs:
            calls = 0 if job.split_into else job.calls or 0
            if job.state == "Failed":
                found["Failed"] += 0 if job.rerun else job.failed_calls
                found["Success"] += max(0, calls - job.failed_calls)
            else:
                found[job.state] += calls
        return {state: found[state] for state in JOB_STATES if found[state]}

    def troubled(self) -> list[JobView]:
        """Jobs that Failed, Error'd or were Cancelled and were not run again later."""
        trouble = ("Failed", "Error", "Cancelled")
        return [
            job
            for job in self.jobs
            if job.state in trouble and not job.rerun and not job.split_into
        ]

    @property
    def finished(self) -> bool:
        return all(job.state in FINAL_STATES for job in self.jobs)

    @property
    def state(self) -> str:
        """``broken`` (no readable manifest), ``running``, ``closed`` (the client shut
        down), or ``finished`` (no job left)."""
        if self.manifest is None:
            return "broken"
        if self.closed is not None:
            return "closed"
        if self.jobs and self.finished:
            return "finished"
        return "running"

    @property
    def cost_per_core_hour(self) -> float | None:
        """The price the run was made with (``cost_per_core_hour=``), if any."""
        return self.manifest.settings.cost_per_core_hour if self.manifest is not None else None

    def usage(self, cost_per_core_hour: float | None = None) -> Usage:
        price = cost_per_core_hour if cost_per_core_hour is not None else self.cost_per_core_hour
        usage = Usage(cost_per_core_hour=price)
        for job in self.jobs:
            usage.add_job(job)
        return usage

    def job(self, chunk: str) -> JobView:
        """The job of a chunk id, or of a unique prefix of one (as ``status`` prints them)."""
        matches = [job for job in self.jobs if job.chunk == chunk]
        if not matches:
            matches = [job for job in self.jobs if job.chunk.startswith(chunk)]
        if len(matches) != 1:
            known = ", ".join(job.chunk for job in self.jobs[:5])
            what = "no job" if not matches else f"{len(matches)} jobs"
            raise KeyError(
                f"{what} of run {self.run_id} has chunk id {chunk!r}; "
                f"its chunks are {known}{' ...' if len(self.jobs) > 5 else ''}"
            )
        return matches[0]

    def log(self, job: JobView) -> str:
        """A job's captured output, every attempt, newest last."""
        parts = []
        for attempt in sorted(job.logs):
            text = self.store.get(self.store.log_key(job.chunk, attempt))
            if len(job.logs) > 1:
                parts.append(f"--- attempt {attempt} ---\n")
            parts.append(text.decode("utf-8", errors="replace"))
        return "".join(parts)


def read_run(store: Store, secret: bytes | None = None) -> RunView:
    """Read a run's manifest, journal and markers: a handful of listings, then one
    batched read of the JSON documents (concurrent on object stores).

    With ``secret``, documents that do not carry the run's signature are left out
    (and named in ``problems``); without it, they are checked against their schemas
    only. Objects that are not part of a run's layout are skipped and named too.
    FileNotFoundError when the folder holds no manifest.json at all.
    """
    problems: list[str] = []
    try:
        manifest: Manifest | None = store.get_document(Manifest, store.MANIFEST, secret)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{store.url} is not a batchpool run: it has no {store.MANIFEST}; "
            "give the folder of one run (`batchpool runs STORAGE` lists them)"
        ) from None
    except (DocumentError, UnsafePathError) as exc:
        manifest = None
        problems.append(describe_problem(exc))
    listed: dict[str, int] = {}
    for folder in ("chunks", "results", "logs", "events", "jobs", "blobs"):
        listed.update(store.list(folder))
    jobs: dict[str, JobView] = {}

    def job(chunk: str) -> JobView:
        if chunk not in jobs:
            jobs[chunk] = JobView(chunk)
        return jobs[chunk]

    results: set[tuple[str, int]] = set()
    marker_keys: list[tuple[str, str, int]] = []
    journal_keys: list[tuple[int, str]] = []
    stray: list[str] = []
    for key in listed:
        folder = key.partition("/")[0]
        if folder == "blobs":
            if not Store.is_blob_key(key):
                stray.append(key)
            continue
        if folder == "jobs":
            seq = Store.journal_seq(key)
            if seq is None:
                stray.append(key)
            else:
                journal_keys.append((seq, key))
            continue
        parsed = store.parse_key(key)
        if parsed is None:
            stray.append(key)
            continue
        folder, chunk, attempt = parsed
        view = job(chunk)
        if folder == "results":
            results.add((chunk, attempt))
            view.attempt = max(view.attempt, attempt)
        elif folder == "logs":
            view.logs.append(attempt)
        elif folder == "events":
            marker_keys.append((key, chunk, attempt))
    if stray:
        shown = ", ".join(sorted(stray)[:5]) + (" ..." if len(stray) > 5 else "")
        problems.append(
            f"{len(stray)} object{'s' if len(stray) != 1 else ''} that are not part of a run's "
            f"layout (skipped): {shown}"
        )
    journal_keys.sort()
    data = store.get_many([key for _, key in journal_keys] + [key for key, _, _ in marker_keys])
    try:
        cancel_request = store.get_document(CancelRequest, store.CANCEL)
    except FileNotFoundError:
        cancel_request = None
    except (DocumentError, UnsafePathError) as exc:
        cancel_request = None
        problems.append(describe_problem(exc))

    def document(kind: type[Any], key: str) -> Any:
        if key not in data:
            return None  # deleted since it was listed
        try:
            return decode(kind, key, data[key], secret)
        except DocumentError as exc:
            problems.append(describe_problem(exc))
            return None

    closed = None
    final: dict[str, GivenUp] = {}
    rerun: set[str] = set()
    for _, key in journal_keys:
        entry: JournalEntry | None = document(JournalEntry, key)
        if entry is None:
            continue
        for handed in entry.handed:
            view = job(handed.chunk)
            view.attempt = max(view.attempt, handed.attempt)
            view.job_ids.append(handed.job_id)
            view.calls = handed.calls
            view.labels = handed.labels or view.labels
            view.cpus = handed.cpus
            view.billed_cores = handed.billed_cores
        for given_up in entry.given_up:
            final[given_up.chunk] = given_up
        if entry.closed is not None:
            closed = entry.closed
        if entry.opened is not None:  # a later session (attach, resume=True) opened it again
            closed = None
        rerun.update(entry.rerun)
    for key, chunk, attempt in marker_keys:
        kind = StartMarker if key.endswith(".start") else EndMarker
        marker = document(kind, key)
        if marker is None:
            continue
        if (marker.chunk, marker.attempt) != (chunk, attempt):
            problems.append(f"{key}: names chunk {marker.chunk} attempt {marker.attempt} (skipped)")
            continue
        view = jobs[chunk]
        view.attempt = max(view.attempt, attempt)
        if isinstance(marker, StartMarker):
            view.starts[attempt] = marker
        else:
            view.ends[attempt] = marker

    for view in jobs.values():
        _derive(view, results, final.get(view.chunk))
        view.rerun = view.chunk in rerun
    ordered = sorted(jobs.values(), key=lambda v: v.chunk)
    return RunView(
        store=store,
        manifest=manifest,
        jobs=ordered,
        verified=secret is not None,
        closed=closed,
        cancel_request=cancel_request,
        size_bytes=sum(listed.values()),
        next_journal=journal_keys[-1][0] + 1 if journal_keys else 0,
        problems=problems,
    )


def _derive(view: JobView, results: set[tuple[str, int]], given_up: GivenUp | None) -> None:
    latest = view.attempt
    start = view.starts.get(latest)
    end = view.ends.get(latest)
    if start:
        view.host, view.pid = start.host, start.pid
        view.pid_started = start.pid_started
        view.started = start.started
    if end:
        view.ended = end.ended
        view.cpu_seconds = end.cpu_seconds
        view.peak_memory_bytes = end.peak_memory_bytes
        view.host = end.host or view.host
        if end.started is not None:
            view.started = end.started
        if view.calls is None and end.calls is not None:
            view.calls = end.calls
    view.has_result = (view.chunk, latest) in results
    if view.has_result:
        failed = end.failed if end is not None else 0
        view.failed_calls = failed
        if end is not None and end.error:
            view.state, view.exit = "Error", end.error
        elif failed:
            view.state = "Failed"
            view.exit = f"{failed}/{view.calls if view.calls is not None else '?'} raised"
            if end is not None and end.errors:
                view.exit += f": {end.errors[0]}"
        else:
            view.state, view.exit = "Success", "ok"
    elif given_up is not None:
        view.state = given_up.state
        view.reason = given_up.reason
        view.exit = "cancelled" if view.state == "Cancelled" else "lost"
        view.split_into = list(given_up.split_into)
        if view.split_into:
            view.exit = "lost: split"
    elif end is not None and end.lost:
        # The client found this attempt dead (and wrote its end marker) and has not
        # given up on it: it waits to be handed over again, as the client counts it.
        # Not Error: an attach runs it again (recovery._how), as it would have.
        view.state, view.exit = "Pending", end.error
    elif end is not None:  # the worker failed before it wrote an outcome
        view.state, view.exit = "Error", end.error or "no outcome"
        view.reason = view.exit
    elif start is not None:
        view.state = "Running"
    elif view.job_ids:
        view.state = "Ready"
    else:
        view.state = "Pending"


# -- finding runs -----------------------------------------------------------------------------


def open_run(target: str | Store, storage_options: dict[str, Any] | None = None) -> Store:
    """The store of the run at ``target``: a run's folder or URL."""
    if isinstance(target, Store):
        return target
    fs, root = open_storage(target, storage_options)
    return Store(fs, root)


def find_runs(storage: Any, storage_options: dict[str, Any] | None = None) -> list[Store]:
    """The folders directly inside a storage root that hold a ``manifest.json``, in the
    order of their names (a run's name, then its creation time). Whether each is a
    batchpool run its manifest tells (``read_run``; ``Store.layout_problem``)."""
    fs, root = open_storage(storage, storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    folders = [e["name"].rstrip("/") for e in entries if e.get("type") == "directory"]
    manifests = [f"{folder}/{Store.MANIFEST}" for folder in folders]
    present = set()
    for path in manifests:  # one HEAD each; runs are few next to chunks
        if fs.exists(path):
            present.add(path.rsplit("/", 1)[0])
    stores = [Store(fs, folder) for folder in folders if folder in present]
    return sorted(stores, key=lambda s: s.root)
