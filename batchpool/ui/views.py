"""What the web page shows, as plain data: runs, a run's jobs, one job, read from the store.

The page reads what ``batchpool runs/status/logs`` read (``runs.py``, and the CLI's
helpers for the run's state and the engine's word), through a short-lived cache: a
page and its refreshes every few seconds must not each read every marker of a run of
10,000 jobs. Runs are found only by the folder names the storage lists (``find_runs``)
and jobs only by the chunk ids a run holds: no text of a request is ever a path.
Everything here is data; the templates escape it and the script writes it as text.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchpool import cli
from batchpool.future import FINAL_STATES, JOB_STATES
from batchpool.runs import JobView, RunView, Usage, format_bytes, read_run
from batchpool.store import Store

#: Jobs per page of the run page's table.
PAGE_SIZE = 100
#: Seconds a live run (and the list of runs) is read again at most every.
LIVE_TTL = 2.0
#: Seconds an ended run (closed, finished) is kept: it changes only if resumed.
ENDED_TTL = 30.0
#: The most text of one log shown on the page (the newest part).
MAX_LOG_BYTES = 2 << 20
#: The most failed jobs whose errors the run page lists.
MAX_ERRORS = 20
#: Job options shown on the job page (``env`` is shown by names only).
RESOURCE_OPTIONS = ("memory", "gpus", "walltime", "queue", "account", "image", "working_dir")


class NotFound(LookupError):
    """A run or a job that the store does not hold (any more)."""


@dataclass
class _Entry:
    read: float
    value: Any


@dataclass
class Cache:
    """Values read from the store, kept for a few seconds; one reader per key at a time."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    key_locks: dict[str, threading.Lock] = field(default_factory=dict)

    def get(self, key: str, ttl: Callable[[Any], float], read: Callable[[], Any]) -> Any:
        with self.lock:
            key_lock = self.key_locks.setdefault(key, threading.Lock())
        with key_lock:  # a second page asking meanwhile waits for this read
            entry = self.entries.get(key)
            if entry is not None and time.monotonic() - entry.read < ttl(entry.value):
                return entry.value
            value = read()
            self.entries[key] = _Entry(time.monotonic(), value)
            return value

    def forget(self, key: str) -> None:
        with self.lock:
            self.entries.pop(key, None)


@dataclass
class LoadedRun:
    """A run read from its store, with its state as ``batchpool status`` gives it."""

    run: RunView
    state: str
    engine_problem: str | None


class Storage:
    """The runs of one storage root, as the page reads them."""

    def __init__(self, root: Store) -> None:
        self.root = root
        self.cache = Cache()

    # -- finding --------------------------------------------------------------------------

    def stores(self) -> dict[str, Store]:
        """``{folder name: store}`` of the runs the storage lists now (cached briefly)."""
        found: dict[str, Store] = self.cache.get(
            "", lambda _: LIVE_TTL, lambda: {s.root.rsplit("/", 1)[-1]: s for s in self._list()}
        )
        return found

    def _list(self) -> list[Store]:
        if not cli.storage_exists(self.root):
            raise FileNotFoundError(
                f"{self.root.url} does not exist; give `batchpool ui` the folder that holds runs"
            )
        return cli.runs_in(self.root)

    def load(self, folder: str) -> LoadedRun:
        """The run in ``folder`` (one the storage lists), read at most every few seconds."""
        store = self.stores().get(folder)
        if store is None:
            raise NotFound(f"no run {folder!r} in {self.root.url} (deleted, or never there)")

        def read() -> LoadedRun:
            try:
                run = read_run(store, cli.run_secret(store))
            except FileNotFoundError as exc:
                raise NotFound(f"run {folder!r} is gone from {self.root.url}: {exc}") from None
            alive = cli.client_alive(run)
            state = cli.run_state(run, alive)
            problem = cli.refine_states(run, alive) if state == "running" else None
            return LoadedRun(run, state, problem)

        def ttl(loaded: LoadedRun) -> float:
            return LIVE_TTL if loaded.state in ("running", "detached") else ENDED_TTL

        loaded: LoadedRun = self.cache.get(f"run:{folder}", ttl, read)
        return loaded

    def forget(self, folder: str) -> None:
        self.cache.forget(f"run:{folder}")
        self.cache.forget("")


# -- the runs page --------------------------------------------------------------------------


def run_summary(folder: str, loaded: LoadedRun) -> dict[str, Any]:
    run = loaded.run
    usage = run.usage()
    created = cli.created_time(run)
    return {
        "folder": folder,
        "run_id": run.run_id,
        "name": run.name or "",
        "created": cli.format_created(run),
        "created_ts": created,
        "age": cli.format_age_of(run),
        "state": loaded.state,
        "backend": run.backend_name or "?",
        "jobs": run.counts(),
        "calls": run.call_counts(),
        "n_jobs": len(run.jobs),
        "n_calls": sum(job.calls or 0 for job in run.jobs),
        "wall_seconds": round(usage.wall_seconds, 1),
        "wall": cli.format_duration(usage.wall_seconds if usage.jobs else None),
        "cpu_seconds": round(usage.cpu_seconds, 1),
        "cpu": cli.format_duration(usage.cpu_seconds if usage.jobs else None),
        "core_hours": round(usage.core_hours, 4),
        "lost_core_hours": round(usage.lost_core_hours, 4),
        "lost_attempts": usage.lost_attempts,
        "cost": usage.cost,
        "size_bytes": run.size_bytes,
        "size": format_bytes(run.size_bytes),
        "problems": run.problems,
        "live": loaded.state in ("running", "detached"),
    }


def runs_page(storage: Storage) -> dict[str, Any]:
    """Every run of the storage, newest first; a run that cannot be read says why."""
    rows: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    for folder in storage.stores():
        try:
            rows.append(run_summary(folder, storage.load(folder)))
        except NotFound:
            continue  # deleted since it was listed
        except Exception as exc:  # a damaged run must not hide the others
            unreadable.append({"folder": folder, "why": f"{type(exc).__name__}: {exc}"})
    rows.sort(key=lambda r: (r["created_ts"] or 0, r["folder"]), reverse=True)
    return {
        "storage": storage.root.url,
        "runs": rows,
        "unreadable": unreadable,
        "live": any(r["live"] for r in rows),
        "states": list(JOB_STATES),
    }


# -- the run page ---------------------------------------------------------------------------


def job_row(job: JobView, price: float | None = None) -> dict[str, Any]:
    """A row of the jobs table; ``cost`` at ``price`` per core-hour, when one was given."""
    cost = _job_cost(job, price)
    return {
        "chunk": job.chunk,
        "state": job.state,
        "attempt": job.attempt,
        "calls": job.calls,
        "job_id": job.job_id or "",
        "host": job.host or "",
        "duration": cli.format_duration(job.duration),
        "exit": cli.job_exit(job),
        "cpu": "-" if job.cpu_seconds is None else f"{job.cpu_seconds:.1f}s",
        "peak_memory": "-"
        if job.peak_memory_bytes is None
        else format_bytes(job.peak_memory_bytes),
        "cost": cost,
    }


def _job_cost(job: JobView, price: float | None) -> float | None:
    """What the job's attempts cost, as ``Usage`` bills them: wall time times its billed
    cores, the attempts that died included."""
    if price is None:
        return None
    usage = Usage(cost_per_core_hour=price)
    usage.add_job(job)
    return usage.cost


def run_page(
    storage: Storage, folder: str, state: str | None = None, page: int = 1
) -> dict[str, Any]:
    """The header of ``batchpool status``, a page of the jobs table (of one state, or
    all), the failed calls' errors and the counts for the bar of states."""
    loaded = storage.load(folder)
    run = loaded.run
    price = run.cost_per_core_hour
    shown = [job for job in run.jobs if state is None or job.state == state]
    pages = max(1, -(-len(shown) // PAGE_SIZE))
    page = min(max(1, page), pages)
    rows = [job_row(job, price) for job in shown[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]]
    return {
        **run_summary(folder, loaded),
        "header": cli.status_header(run, loaded.state),
        "engine_problem": loaded.engine_problem,
        "filter": state,
        "page": page,
        "pages": pages,
        "page_size": PAGE_SIZE,
        "shown": len(shown),
        "rows": rows,
        "errors": failed_calls(run),
        "states": list(JOB_STATES),
        "cancelled": run.cancel_request is not None,
    }


def failed_calls(run: RunView) -> list[dict[str, Any]]:
    """The first failed jobs, with what their calls raised and the remote tracebacks."""
    found = []
    for job in run.troubled()[:MAX_ERRORS]:
        end = job.ends.get(job.attempt)
        found.append(
            {
                "chunk": job.chunk,
                "state": job.state,
                "exit": cli.job_exit(job),
                "errors": list(end.errors) if end is not None else [],
                "tracebacks": list(end.tracebacks) if end is not None else [],
            }
        )
    return found


def timeline(storage: Storage, folder: str) -> dict[str, Any]:
    """Each job that started as ``[lane, start, end, state]`` (seconds from the run's first
    start; end None while it runs), one lane per worker (host and pid) or, when there are
    too many workers to draw, per host."""
    run = storage.load(folder).run
    started = [job for job in run.jobs if job.started is not None]
    if not started:
        return {"t0": None, "now": 0.0, "lanes": [], "bars": [], "states": list(JOB_STATES)}
    t0 = min(float(job.started or 0.0) for job in started)
    workers = Counter(f"{job.host or '?'} pid {job.pid or '?'}" for job in started)
    by_worker = len(workers) <= 64

    def lane_of(job: JobView) -> str:
        return f"{job.host or '?'} pid {job.pid or '?'}" if by_worker else job.host or "?"

    lanes = sorted({lane_of(job) for job in started})
    index = {name: i for i, name in enumerate(lanes)}
    bars = []
    for job in started:
        end = job.ended
        if end is None and job.state in FINAL_STATES:
            end = job.started  # it ended without saying when (killed, given up): a tick
        bars.append(
            [
                index[lane_of(job)],
                round(float(job.started or 0.0) - t0, 3),
                None if end is None else round(end - t0, 3),
                JOB_STATES.index(job.state),
            ]
        )
    running = any(bar[2] is None for bar in bars)
    last = max((bar[2] for bar in bars if bar[2] is not None), default=0.0)
    return {
        "t0": t0,
        # the right end of the time axis: now while jobs run, else the last end
        "now": round(time.time() - t0, 3) if running else last,
        "lanes": lanes,
        "bars": bars,
        "states": list(JOB_STATES),
    }


# -- the job page ---------------------------------------------------------------------------


def find_job(run: RunView, chunk: str) -> JobView:
    """The job of exactly this chunk id: the page links only to ids the run holds."""
    for job in run.jobs:
        if job.chunk == chunk:
            return job
    raise NotFound(f"run {run.run_id} has no job {chunk!r}")


def log_of(run: RunView, job: JobView, attempt: int) -> dict[str, Any]:
    """One attempt's saved output (the newest ``MAX_LOG_BYTES``), and whether it is cut."""
    if attempt not in job.logs and not (attempt == job.attempt and job.state == "Running"):
        return {"attempt": attempt, "text": None, "cut": 0}
    try:
        data = run.store.get(run.store.log_key(job.chunk, attempt))
    except FileNotFoundError:
        return {"attempt": attempt, "text": None, "cut": 0}
    cut = max(0, len(data) - MAX_LOG_BYTES)
    return {"attempt": attempt, "text": data[cut:].decode("utf-8", errors="replace"), "cut": cut}


def job_page(storage: Storage, folder: str, chunk: str) -> dict[str, Any]:
    loaded = storage.load(folder)
    run = loaded.run
    job = find_job(run, chunk)
    settings = run.manifest.settings if run.manifest is not None else None
    options: Mapping[str, Any] = settings.job_options if settings is not None else {}
    resources = {"cpus": job.cpus}
    for name in RESOURCE_OPTIONS:
        value = options.get(name)
        if value not in (None, "", 0, [], ()):
            resources[name] = value
    env = options.get("env") or []
    # Names only: the values may be secrets (tokens, passwords).
    env_names = sorted(str(pair[0]) for pair in env if isinstance(pair, (list, tuple)) and pair)
    attempts = []
    for attempt in range(1, job.attempt + 1):
        start = job.starts.get(attempt)
        end = job.ends.get(attempt)
        attempts.append(
            {
                "attempt": attempt,
                "job_id": job.job_ids[attempt - 1] if attempt <= len(job.job_ids) else "",
                "host": (end.host if end is not None and end.host else None)
                or (start.host if start is not None else None)
                or "",
                "pid": start.pid if start is not None else None,
                "engine_job": start.engine_job if start is not None else "",
                "started": _clock(start.started if start is not None else None),
                "ended": _clock(end.ended if end is not None else None),
                "wall": cli.format_duration(end.wall_seconds if end is not None else None),
                "cpu": cli.format_duration(end.cpu_seconds if end is not None else None),
                "peak_memory": format_bytes(end.peak_memory_bytes)
                if end is not None and end.peak_memory_bytes is not None
                else "-",
                "error": (end.error if end is not None else None) or "",
                "errors": list(end.errors) if end is not None else [],
                "tracebacks": list(end.tracebacks) if end is not None else [],
                "log": log_of(run, job, attempt),
            }
        )
    return {
        "folder": folder,
        "run_id": run.run_id,
        "name": run.name or "",
        "run_state": loaded.state,
        "job": job_row(job, run.cost_per_core_hour),
        "labels": job.labels,
        "job_ids": job.job_ids,
        "reason": job.reason or "",
        "started": _clock(job.started),
        "ended": _clock(job.ended),
        "resources": resources,
        "env_names": env_names,
        "backend": run.backend_name or "?",
        "attempts": attempts,
        "live": job.state in ("Pending", "Ready", "Running") and loaded.state != "closed",
    }


def _clock(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
