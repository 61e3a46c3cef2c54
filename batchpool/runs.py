"""What a run is and how its jobs are doing, read from the store alone.

The executor writes, and ``batchpool`` (the CLI) and ``BatchPoolExecutor.attach``
read, the run's JSON objects (see ``store.py`` for the layout): the manifest,
the client's journal in ``jobs/``, and the workers' ``events/`` markers. Nothing
here needs the run's secret or unpickles anything, so it works from any machine
that reaches the storage.

A job (one chunk, over its attempts) is in one of Hail Batch's states
(``JOB_STATES``), derived from the newest evidence:

- **Success** / **Failed**: an outcome was written; Failed when a call raised.
- **Error**: the client gave up after its attempts (journal), or the worker
  failed before it could write an outcome and no attempt followed.
- **Cancelled**: the client dropped the job (journal).
- **Running**: a worker wrote its start marker and no end marker yet.
- **Ready**: the client handed it to the engine (journal); no worker started yet.
- **Pending**: its input is in the store, waiting for the client to hand it over.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchpool.future import FINAL_STATES, JOB_STATES
from batchpool.store import Store, open_storage

__all__ = [
    "JOB_STATES",
    "JobView",
    "RunView",
    "Usage",
    "find_runs",
    "open_run",
    "process_started",
    "read_run",
]


def process_started(pid: int) -> float | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), to tell a live
    process from a later one that reuses its pid; None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its ")". Then field 3
    # is the state (a zombie has ended, whoever reaps it) and field 22 the start time.
    fields = stat_line.rsplit(b")", 1)[1].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return float(fields[19])


# -- usage ------------------------------------------------------------------------------------


@dataclass
class Usage:
    """What the jobs of a run used, summed over the attempts that ended.

    ``core_seconds`` is wall time times the CPUs each job asked for: what batch
    services bill. ``cpu_seconds`` is the CPU time the workers used.
    ``peak_memory_bytes`` is the largest peak resident size of one job.
    """

    jobs: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    core_seconds: float = 0.0
    peak_memory_bytes: int = 0
    cost_per_core_hour: float | None = None

    def add(self, end: Mapping[str, Any], cpus: float = 1.0) -> None:
        """Count one job's end marker (or outcome meta)."""
        wall = float(end.get("wall_seconds") or 0.0)
        self.jobs += 1
        self.wall_seconds += wall
        self.cpu_seconds += float(end.get("cpu_seconds") or 0.0)
        self.core_seconds += wall * cpus
        self.peak_memory_bytes = max(self.peak_memory_bytes, int(end.get("peak_memory_bytes") or 0))

    @property
    def core_hours(self) -> float:
        return self.core_seconds / 3600

    @property
    def cpu_hours(self) -> float:
        return self.cpu_seconds / 3600

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
        }

    def __str__(self) -> str:
        text = (
            f"{self.jobs} job{'s' if self.jobs != 1 else ''}, "
            f"{self.core_hours:.4f} core-hours billed, {self.cpu_hours:.4f} CPU-hours used, "
            f"peak memory {format_bytes(self.peak_memory_bytes)}"
        )
        if self.cost is not None:
            cost = f"{self.cost:,.2f}" if self.cost >= 1 else f"{self.cost:.2g}"
            text += f", estimated cost {cost} (at {self.cost_per_core_hour}/core-hour)"
        return text


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
    #: attempts whose worker started: {attempt: start marker}
    starts: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    ends: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    logs: list[int] = field(default_factory=list, repr=False)

    @property
    def job_id(self) -> str | None:
        return self.job_ids[-1] if self.job_ids else None

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
        }


@dataclass
class RunView:
    """A run as its store tells it, at the moment it was read."""

    store: Store
    manifest: dict[str, Any]
    jobs: list[JobView]
    #: When the client closed the run (``shutdown``), None while open or if it died.
    closed: float | None = None
    cancel_request: dict[str, Any] | None = None
    size_bytes: int = 0
    journal_entries: int = 0

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.store.root.rsplit("/", 1)[-1])

    @property
    def name(self) -> str | None:
        return self.manifest.get("name")

    @property
    def created(self) -> str | None:
        return self.manifest.get("created")

    @property
    def backend(self) -> dict[str, Any]:
        backend = self.manifest.get("backend")
        if isinstance(backend, str):  # manifests from before the backend's options were kept
            return {"name": backend, "options": {}}
        return dict(backend or {})

    def counts(self) -> dict[str, int]:
        """Jobs by state, in ``JOB_STATES`` order, states with no job left out."""
        found = Counter(job.state for job in self.jobs)
        return {state: found[state] for state in JOB_STATES if found[state]}

    def call_counts(self) -> dict[str, int]:
        """Calls by state: those of a Failed job that returned count as Success, and
        failures that a later session ran again (``rerun``) count there only."""
        found: Counter[str] = Counter()
        for job in self.jobs:
            calls = job.calls or 0
            if job.state == "Failed":
                found["Failed"] += 0 if job.rerun else job.failed_calls
                found["Success"] += calls - job.failed_calls
            else:
                found[job.state] += calls
        return {state: found[state] for state in JOB_STATES if found[state]}

    def troubled(self) -> list[JobView]:
        """Jobs that Failed, Error'd or were Cancelled and were not run again later."""
        trouble = ("Failed", "Error", "Cancelled")
        return [job for job in self.jobs if job.state in trouble and not job.rerun]

    @property
    def finished(self) -> bool:
        return all(job.state in FINAL_STATES for job in self.jobs)

    @property
    def state(self) -> str:
        """``running``, ``closed`` (the client shut down), or ``finished`` (no job left)."""
        if self.closed is not None:
            return "closed"
        if self.jobs and self.finished:
            return "finished"
        return "running"

    def usage(self, cost_per_core_hour: float | None = None) -> Usage:
        price = cost_per_core_hour
        if price is None:
            price = (self.manifest.get("settings") or {}).get("cost_per_core_hour")
        usage = Usage(cost_per_core_hour=price)
        for job in self.jobs:
            for end in job.ends.values():
                if "wall_seconds" in end:
                    usage.add(end, job.cpus)
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


def _get_many(store: Store, keys: Iterable[str]) -> dict[str, Any]:
    """The JSON objects at ``keys`` (missing or unreadable ones left out)."""
    found: dict[str, Any] = {}
    for key, data in store.get_many(list(keys)).items():
        try:
            found[key] = json.loads(data)
        except ValueError:
            continue
    return found


def read_run(store: Store) -> RunView:
    """Read a run's manifest, journal and markers: a handful of listings, then one
    batched read of the JSON objects (concurrent on object stores)."""
    try:
        manifest = store.get_json(store.MANIFEST)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{store.url} is not a batchpool run: it has no {store.MANIFEST}; "
            "give the folder of one run (`batchpool runs STORAGE` lists them)"
        ) from None
    listed: dict[str, int] = {}
    for folder in ("chunks", "results", "logs", "events", "jobs", "blobs"):
        listed.update(store.list(folder))
    jobs: dict[str, JobView] = {}

    def job(chunk: str) -> JobView:
        if chunk not in jobs:
            jobs[chunk] = JobView(chunk)
        return jobs[chunk]

    results: set[tuple[str, int]] = set()
    marker_keys = []
    for key in listed:
        folder = key.partition("/")[0]
        if folder in ("blobs", "jobs"):
            continue
        folder, chunk, attempt = store.parse_key(key)
        view = job(chunk)
        if folder == "results":
            results.add((chunk, attempt))
            view.attempt = max(view.attempt, attempt)
        elif folder == "logs":
            view.logs.append(attempt)
        elif folder == "events":
            marker_keys.append(key)
            view.attempt = max(view.attempt, attempt)
    journal_keys = sorted(key for key in listed if key.startswith("jobs/"))
    objects = _get_many(store, [*journal_keys, *marker_keys])
    try:
        cancel_request = store.get_json(store.CANCEL)
    except (FileNotFoundError, ValueError):
        cancel_request = None

    closed = None
    final: dict[str, dict[str, Any]] = {}
    rerun: set[str] = set()
    for key in journal_keys:
        entry = objects.get(key) or {}
        for handed in entry.get("handed", ()):
            view = job(handed["chunk"])
            view.attempt = max(view.attempt, int(handed.get("attempt", 1)))
            view.job_ids.append(str(handed.get("job_id", "")))
            view.calls = handed.get("calls", view.calls)
            view.labels = handed.get("labels") or view.labels
            view.cpus = float(handed.get("cpus") or view.cpus)
        for given_up in entry.get("given_up", ()):
            final[given_up["chunk"]] = given_up
        if "closed" in entry:
            closed = entry["closed"]
        if "opened" in entry:  # a later session (attach, resume=True) opened it again
            closed = None
        rerun.update(entry.get("rerun", ()))
    for key in marker_keys:
        _, chunk, attempt = store.parse_key(key)
        marker = objects.get(key)
        if marker is None:
            continue
        if key.endswith(".start"):
            jobs[chunk].starts[attempt] = marker
        else:
            jobs[chunk].ends[attempt] = marker

    for view in jobs.values():
        _derive(view, results, final.get(view.chunk))
        view.rerun = view.chunk in rerun
    ordered = sorted(jobs.values(), key=lambda v: v.chunk)
    return RunView(
        store=store,
        manifest=manifest,
        jobs=ordered,
        closed=closed,
        cancel_request=cancel_request,
        size_bytes=sum(listed.values()),
        journal_entries=len(journal_keys),
    )


def _derive(view: JobView, results: set[tuple[str, int]], given_up: dict[str, Any] | None) -> None:
    latest = view.attempt
    start = view.starts.get(latest)
    end = view.ends.get(latest)
    if start:
        view.host, view.pid = start.get("host"), start.get("pid")
        view.pid_started = start.get("pid_started")
        view.started = start.get("started")
    if end:
        view.ended = end.get("ended")
        view.cpu_seconds = end.get("cpu_seconds")
        view.peak_memory_bytes = end.get("peak_memory_bytes")
        view.host = end.get("host", view.host)
        if end.get("started") is not None:
            view.started = end["started"]
        if view.calls is None and end.get("calls") is not None:
            view.calls = end["calls"]
    view.has_result = (view.chunk, latest) in results
    if view.has_result:
        failed = int((end or {}).get("failed") or 0)
        view.failed_calls = failed
        if end and end.get("error"):
            view.state, view.exit = "Error", str(end["error"])
        elif failed:
            view.state = "Failed"
            view.exit = f"{failed}/{view.calls if view.calls is not None else '?'} raised"
            errors = (end or {}).get("errors") or []
            if errors:
                view.exit += f": {errors[0]}"
        else:
            view.state, view.exit = "Success", "ok"
    elif given_up is not None:
        view.state = str(given_up.get("state", "Error"))
        view.reason = given_up.get("reason")
        view.exit = "cancelled" if view.state == "Cancelled" else "lost"
    elif end is not None:  # the worker failed before it wrote an outcome
        view.state, view.exit = "Error", str(end.get("error") or "no outcome")
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
    """The runs directly inside a storage root (folders holding a ``manifest.json``),
    in the order of their folder names (a run's name, then its creation time)."""
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
