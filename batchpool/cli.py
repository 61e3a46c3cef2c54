"""The ``batchpool`` command: list, inspect, cancel and clean runs, from their storage.

Every subcommand reads the run's store (see ``store.py``) through ``runs.py``;
``status`` and ``cancel`` also ask the engine named in the run's manifest when
its job ids outlive the client (Slurm, SGE), made here from its name alone. The
command works from any machine that reaches the storage; where the run's secret
is at hand it checks signatures, and ``cancel`` acts on the engine and on local
workers only then (see README "Security").
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from batchpool.backends.base import Backend, JobState, backend_class, make_backend
from batchpool.documents import CancelRequest, DocumentError, Manifest, to_builtins
from batchpool.errors import BackendError, BatchPoolError
from batchpool.processes import is_our_worker, same_process
from batchpool.recovery import find_secret, forget_secret
from batchpool.runs import JobView, RunView, find_runs, format_bytes, read_run
from batchpool.safetext import escaped_terminal, printable
from batchpool.serialization import SECRET_ENV
from batchpool.store import StorageError, Store, open_storage

EXIT_OK = 0
#: The command worked and found trouble: a job failed, or there was nothing to cancel.
EXIT_TROUBLE = 1
#: Bad usage, or what was named is not a run, does not exist, or holds no such chunk.
EXIT_USAGE = 2
#: The storage or the engine could not be reached, or an engine command failed.
EXIT_UNREACHABLE = 3

EXIT_CODES_HELP = """\
exit codes:
  0  ok
  1  the command worked but found trouble: `status` found a job Failed, Error or
     Cancelled; `cancel` found nothing left to cancel; `clean` skipped a run
  2  bad usage, RUN or STORAGE is not a run or does not exist, or CHUNK is unknown
  3  the storage or the engine is unreachable, or a command of the engine failed
"""

#: States of jobs that may still run.
ACTIVE_STATES = ("Pending", "Ready", "Running")
#: Backend names under which a run's jobs ran in a local pool of the client
#: (older manifests recorded the class name).
LOCAL_BACKENDS = frozenset({"local", "LocalBackend"})
#: How long one storage operation of the command retries transient failures (seconds).
RETRY_DEADLINE = 30.0
CHUNK_WIDTH = 14
EXIT_WIDTH = 48
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AGE_FORMS = "30s, 15m, 12h, 7d or 2w, or combined like 1d12h"


class CommandError(Exception):
    """What went wrong, as one line for stderr, and the command's exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# -- formatting -------------------------------------------------------------------------------


def safe(text: str) -> str:
    """Store text as one printable line: control characters shown as escapes."""
    return printable(text, one_line=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned on the widest cell, three spaces apart, as ``kubectl get`` prints;
    cells (store text) made printable."""
    rows = [[safe(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


def format_age(seconds: float) -> str:
    """``45s``, ``5m``, ``3h`` or ``2d``: the largest whole unit."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_duration(seconds: float | None) -> str:
    """``1.2s``, ``3m04s`` or ``2h05m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "-"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def shorten(text: str, width: int = EXIT_WIDTH) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def parse_age(text: str) -> float:
    """Seconds of an age like ``7d``, ``12h`` or ``1d12h``."""
    compact = text.replace(" ", "").lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise CommandError(
            f"--older-than {text!r} is not an age; give a number and a unit: {AGE_FORMS}"
        )
    return sum(float(n) * AGE_UNITS[u] for n, u in parts)


def iso_time(text: Any) -> float | None:
    """Epoch seconds of an ISO 8601 time (as manifests record them); None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def created_time(run: RunView) -> float | None:
    """When the run was created (epoch seconds), from its manifest."""
    return iso_time(run.created)


def format_created(run: RunView) -> str:
    created = created_time(run)
    if created is None:
        return "?"
    return datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M")


def format_age_of(run: RunView) -> str:
    created = created_time(run)
    return "?" if created is None else format_age(time.time() - created)


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, default=str))


# -- finding the store and the run ------------------------------------------------------------


def open_root(target: str, options: Mapping[str, Any]) -> Store:
    """The store of a folder or URL (a run or a storage root)."""
    try:
        fs, root = open_storage(target, dict(options))
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    return Store(fs, root, retry_deadline=RETRY_DEADLINE)


def runs_in(store: Store) -> list[Store]:
    """The runs directly inside ``store``'s folder, oldest first."""
    return [
        Store(run.fs, run.root, retry_deadline=RETRY_DEADLINE)
        for run in find_runs((store.fs, store.root))
    ]


def folder_exists(store: Store) -> bool:
    try:
        store.fs.invalidate_cache(store.root)
        return bool(store.fs.exists(store.root))
    except OSError as exc:
        raise StorageError(f"could not look for {store.url}: {type(exc).__name__}: {exc}") from exc


def storage_exists(store: Store) -> bool:
    """Whether a folder that holds runs exists; on object stores, where a folder exists
    only while objects are under it, whether its bucket does."""
    if folder_exists(store):
        return True
    if isinstance(store.fs, LocalFileSystem):
        return False
    bucket = store.root.split("/", 1)[0]
    return bucket != store.root and folder_exists(Store(store.fs, bucket))


def read_manifest(store: Store) -> Manifest | None:
    """The run's manifest, checked against its schema; None when it is missing or is not
    a batchpool run's (unsigned: for finding runs by name, never to act on)."""
    try:
        return store.get_document(Manifest, Store.MANIFEST)
    except (FileNotFoundError, DocumentError):
        return None


def run_names(stores: Sequence[Store], limit: int = 5) -> str:
    names = [s.root.rsplit("/", 1)[-1] for s in stores[-limit:]]
    more = len(stores) - len(names)
    return ", ".join(names) + (f" (and {more} more)" if more > 0 else "")


def resolve_run(target: str, options: Mapping[str, Any], *, exact: bool = False) -> Store:
    """The run that ``target`` names: a run's folder or URL; else, among the runs beside
    it, the newest whose name (as given to the executor) is ``target``'s last part, or
    the one run whose id starts with it, which is said on stderr. With ``exact`` (for
    commands that change a run), only a folder or a name that names one run alone."""
    store = open_root(target, options)
    if store.exists(Store.MANIFEST):
        return store
    parent_root, _, wanted = store.root.rpartition("/")
    parent = Store(store.fs, parent_root, retry_deadline=RETRY_DEADLINE) if parent_root else None
    siblings = runs_in(parent) if parent is not None and wanted else []
    named: list[tuple[float, str, Store]] = []
    prefixed: list[Store] = []
    for run in siblings:
        manifest = read_manifest(run)
        if manifest is not None and manifest.name == wanted:
            named.append((iso_time(manifest.created) or 0.0, run.root, run))
        elif run.root.rsplit("/", 1)[-1].startswith(wanted):
            prefixed.append(run)
    named.sort(key=lambda match: (match[0], match[1]))
    if len(named) == 1 or (named and not exact):
        return named[-1][2]
    if named:
        raise CommandError(
            f"{target} names {plural(len(named), 'run')}: {run_names([m[2] for m in named])}; "
            "give the folder of the one you mean"
        )
    if prefixed:
        ids = run_names(prefixed)
        if exact:
            raise CommandError(
                f"{target} is not a run: {wanted!r} is only the start of the id of "
                f"{plural(len(prefixed), 'run')} ({ids}); give the whole id of the one you mean"
            )
        if len(prefixed) > 1:
            raise CommandError(
                f"{target} is not a run: {wanted!r} is the start of the ids of "
                f"{plural(len(prefixed), 'run')} ({ids}); give more of the id"
            )
        print(
            f"batchpool: {wanted!r} taken as the start of the id of run {ids}",
            file=sys.stderr,
        )
        return prefixed[0]
    exists = folder_exists(store)
    inside = runs_in(store) if exists else []
    if inside:
        raise CommandError(
            f"{target} is not a run but a storage folder holding {plural(len(inside), 'run')}: "
            f"{run_names(inside)}; give the folder of one of them"
        )
    if not exists and not siblings and (parent is None or not folder_exists(parent)):
        raise CommandError(f"{target} does not exist; give the folder of a run")
    what = "is not a batchpool run" if exists else "does not exist"
    if siblings:
        raise CommandError(
            f"{target} {what} (no {Store.MANIFEST}), and no run in {parent_root} has an id "
            f"starting with or a name equal to {wanted!r}; runs there: {run_names(siblings)}"
        )
    raise CommandError(
        f"{target} {what} (no {Store.MANIFEST}); give the folder of a run "
        "(`batchpool runs STORAGE` lists them)"
    )


def run_secret(store: Store) -> bytes | None:
    """The run's secret, when this machine has it (``BATCHPOOL_RUN_SECRET``, or the file
    the client that made the run kept): then only what carries the run's signature is
    acted on."""
    try:
        return find_secret(store.url)
    except BatchPoolError as exc:  # a secret file that is not private, or not hex
        raise CommandError(str(exc)) from exc


def load_run(store: Store, secret: bytes | None = None) -> RunView:
    try:
        return read_run(store, secret)
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from exc


# -- liveness of the client and of local workers ----------------------------------------------


def client_alive(run: RunView) -> bool | None:
    """Whether the run's client process lives; None when it is on another host or its
    manifest does not say which process it is."""
    if run.manifest is None or run.manifest.client.host != socket.gethostname():
        return None
    return same_process(run.manifest.client.pid, run.manifest.client.pid_started)


def run_state(run: RunView, alive: bool | None) -> str:
    """``RunView.state``, or ``detached`` when the run's client died before closing it."""
    if run.state == "running" and alive is False:
        return "detached"
    return run.state


# -- the engine -------------------------------------------------------------------------------


@dataclass
class Engine:
    """The backend a run's manifest names, and what the command can ask of it.

    Only the name comes from the store: it picks one of the backends installed here.
    The backend is made with this command's ``--backend-option`` values in this
    process's environment, as any command of the engine would be: nothing in a store
    chooses a program to run or an environment variable.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    #: Its job ids outlive the client: it can be asked about and cancel the jobs.
    queryable: bool = False
    backend_class: type[Backend] | None = None

    @property
    def local(self) -> bool:
        return self.name in LOCAL_BACKENDS

    def usable_ids(self, run: RunView, jobs: Sequence[JobView]) -> dict[str, JobView]:
        """``{job id: job}`` of the jobs whose ids have this engine's own form; the others
        are named in ``run.problems`` and never reach an engine command."""
        usable: dict[str, JobView] = {}
        for job in jobs:
            if not job.job_id or self.backend_class is None:
                continue
            try:
                self.backend_class.check_job_id(job.job_id)
            except ValueError as exc:
                run.problems.append(f"chunk {job.chunk}: {exc}; the engine was not asked")
                continue
            usable[job.job_id] = job
        return usable


def engine_of(run: RunView, options: Mapping[str, Any] | None) -> Engine:
    engine = Engine(run.backend_name or "?", dict(options or {}))
    if not engine.local and run.backend_name:
        try:
            engine.backend_class = backend_class(engine.name)
            engine.queryable = engine.backend_class.job_ids_outlive_client
        except (ValueError, TypeError, ImportError):
            engine.queryable = False
    return engine


@contextlib.contextmanager
def rebuilt_backend(engine: Engine) -> Iterator[Backend]:
    """The run's backend, made here from its name and the command's backend options."""
    try:
        backend = make_backend(engine.name, **engine.options)
    except Exception as exc:
        raise CommandError(
            f"could not make a {engine.name} backend here ({type(exc).__name__}: {exc}); "
            "--backend-option KEY=VALUE passes its options (e.g. a command's path)",
            EXIT_UNREACHABLE,
        ) from exc
    try:
        yield backend
    finally:
        backend.close()


def ask_engine(engine: Engine, job_ids: Sequence[str]) -> dict[str, JobState]:
    with rebuilt_backend(engine) as backend:
        try:
            return backend.status(list(job_ids))
        except Exception as exc:
            raise CommandError(
                f"could not ask {engine.name} about the run's jobs ({type(exc).__name__}: {exc}); "
                "the states shown are the store's",
                EXIT_UNREACHABLE,
            ) from exc


def mark_error(run: RunView, job: JobView, reason: str) -> None:
    """Make a job that the store shows alive ``Error``, unless its result arrived meanwhile."""
    if run.store.exists(run.store.result_key(job.chunk, job.attempt)):
        return
    job.state, job.exit, job.reason = "Error", reason, reason


def refine_states(
    run: RunView, alive: bool | None, options: Mapping[str, Any] | None = None
) -> str | None:
    """Correct the store's Ready and Running jobs with what is known of them: the engine's
    word when its job ids outlive the client; for local runs, whether the worker process
    still lives. Returns why the engine could not be asked, if it could not. The engine
    is asked only about job ids read with the run's secret (``run.verified``): nothing a
    store writer wrote makes the command run an engine's program."""
    engine = engine_of(run, options)
    live = [job for job in run.jobs if job.state in ("Ready", "Running")]
    if engine.queryable:
        if not run.verified:
            return None
        asked = engine.usable_ids(run, live)
        if not asked:
            return None
        try:
            states = ask_engine(engine, list(asked))
        except CommandError as exc:
            return str(exc)
        for job_id, job in asked.items():
            state = states.get(job_id)
            if state is not None and state.is_final and not job.has_result:
                mark_error(run, job, f"the engine reports it {state.value} and it wrote no result")
    elif engine.local and alive is not True:  # a live client retries a lost job itself
        host = socket.gethostname()
        for job in live:
            gone = same_process(job.pid, job.pid_started) is False
            if job.state == "Running" and job.host == host and gone:
                mark_error(run, job, f"its worker process {job.pid} is gone")
    return None


# -- runs -------------------------------------------------------------------------------------


def run_summary(run: RunView, state: str) -> dict[str, Any]:
    created = created_time(run)
    return {
        "run_id": run.run_id,
        "url": run.url,
        "name": run.name,
        "created": run.created,
        "age_seconds": None if created is None else round(time.time() - created, 1),
        "state": state,
        "backend": run.backend_name,
        "job_counts": run.counts(),
        "call_counts": run.call_counts(),
        "size_bytes": run.size_bytes,
        "verified": run.verified,
        "problems": run.problems,
    }


def cmd_runs(args: argparse.Namespace) -> int:
    root = open_root(args.storage, args.storage_options)
    if not storage_exists(root):
        raise CommandError(f"{args.storage} does not exist; give the folder that holds runs")
    views = []
    for store in runs_in(root):
        try:
            views.append(read_run(store))
        except (OSError, ValueError, StorageError) as exc:  # deleted meanwhile, or unreadable
            print(f"batchpool runs: skipped {safe(store.url)}: {safe(str(exc))}", file=sys.stderr)
    rows = [(run, run_state(run, client_alive(run))) for run in views]
    if args.json:
        print_json({"storage": root.url, "runs": [run_summary(r, state) for r, state in rows]})
        return EXIT_OK
    if not rows:
        hint = ""
        if root.exists(Store.MANIFEST):
            hint = f" (it is itself a run: see `batchpool status {args.storage}`)"
        print(f"no runs in {args.storage}{hint}")
        return EXIT_OK
    table = [
        [
            run.folder if run.manifest is None else run.run_id,
            run.name or "-",
            format_created(run),
            format_age_of(run),
            state,
            format_counts(run.counts()),
            format_bytes(run.size_bytes),
        ]
        for run, state in rows
    ]
    print(format_table(["RUN", "NAME", "CREATED", "AGE", "STATE", "JOBS", "SIZE"], table))
    for run, _ in rows:
        if run.manifest is None:
            print(f"{run.folder}: {run.problems[0]}", file=sys.stderr)
    return EXIT_OK


# -- status -----------------------------------------------------------------------------------


def job_exit(job: JobView) -> str:
    text = job.exit or job.reason or "-"
    if job.state in ("Error", "Cancelled") and job.reason:
        text = job.reason
    return f"(run again) {text}" if job.rerun else text


def job_row(job: JobView) -> list[str]:
    return [
        job.chunk[:CHUNK_WIDTH],
        job.state,
        str(job.attempt),
        "-" if job.calls is None else str(job.calls),
        job.job_id or "-",
        job.host or "-",
        format_duration(job.duration),  # None once it ended without saying when
        shorten(job_exit(job)),
        "-" if job.cpu_seconds is None else f"{job.cpu_seconds:.1f}s",
        "-" if job.peak_memory_bytes is None else format_bytes(job.peak_memory_bytes),
    ]


def status_header(run: RunView, state: str) -> list[tuple[str, str]]:
    created = format_created(run)
    lines = [
        ("run", run.url),
        ("name", run.name or "-"),
        ("created", f"{created} ({format_age_of(run)} ago)" if created != "?" else "?"),
        ("backend", run.backend_name or "?"),
        ("state", state),
        ("jobs", format_counts(run.counts())),
        ("calls", format_counts(run.call_counts())),
        ("usage", str(run.usage())),
        (
            "signatures",
            "checked with the run's secret"
            if run.verified
            else "not checked (the run's secret is not on this machine): shown as the store "
            "says, and no engine asked",
        ),
    ]
    if run.cancel_request:
        request = run.cancel_request
        at = time.strftime("%Y-%m-%d %H:%M", time.localtime(request.requested))
        lines.append(("cancel", f"requested by {request.by} at {at}"))
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    store = resolve_run(args.run, args.storage_options)
    run = load_run(store, run_secret(store))
    alive = client_alive(run)
    state = run_state(run, alive)  # the store's: a job found dead does not finish the run
    engine_problem = refine_states(run, alive, args.backend_options)
    trouble = bool(run.troubled() or run.problems)
    code = EXIT_UNREACHABLE if engine_problem else EXIT_TROUBLE if trouble else EXIT_OK
    if args.json:
        jobs = [{**job.as_dict(), "job_id": job.job_id, "pid": job.pid} for job in run.jobs]
        document = {
            **run_summary(run, state),
            "client": None if run.manifest is None else to_builtins(run.manifest.client),
            "closed": run.closed,
            "cancel_request": None
            if run.cancel_request is None
            else to_builtins(run.cancel_request),
            "usage": run.usage().as_dict(),
            "engine_error": engine_problem,
            "jobs": jobs,
        }
        print_json(document)
    else:
        header = status_header(run, state)
        width = max(len(label) for label, _ in header) + 2
        for label, value in header:
            print(f"{label + ':':<{width}}{safe(value)}")
        print()
        if run.jobs:
            headers = ["CHUNK", "STATE", "ATTEMPT", "CALLS", "JOB ID", "HOST", "DURATION"]
            headers += ["EXIT", "CPU", "PEAK MEM"]
            print(format_table(headers, [job_row(job) for job in run.jobs]))
        else:
            print("no jobs yet")
        if run.problems:
            print(f"\n{plural(len(run.problems), 'problem')} in the store:")
            for problem in run.problems:
                print(f"  {safe(problem)}")
    if engine_problem:
        print(f"batchpool status: {safe(engine_problem)}", file=sys.stderr)
    return code


# -- logs -------------------------------------------------------------------------------------


def read_log(run: RunView, job: JobView, attempt: int | None) -> str | None:
    """A job's captured output (of one attempt, or all); None when it saved none."""
    try:
        if attempt is None:
            return run.log(job) if job.logs else None
        if attempt not in job.logs:
            return None
        data = run.store.get(run.store.log_key(job.chunk, attempt))
        return data.decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def cmd_logs(args: argparse.Namespace) -> int:
    run = load_run(resolve_run(args.run, args.storage_options))
    if args.chunk is not None:
        try:
            jobs = [run.job(args.chunk)]
        except KeyError as exc:
            raise CommandError(str(exc.args[0])) from None
        if args.attempt is not None and args.attempt > jobs[0].attempt:
            raise CommandError(
                f"job {jobs[0].chunk} has no attempt {args.attempt}: "
                f"it ran {plural(jobs[0].attempt, 'attempt')}"
            )
    else:
        jobs = [job for job in run.jobs if job.logs]
    found = []
    for job in jobs:
        text = read_log(run, job, args.attempt)
        attempt = args.attempt if args.attempt is not None else job.attempt
        if text is not None:
            found.append((job, attempt, text))
        elif args.chunk is not None:
            which = f" (attempt {args.attempt})" if args.attempt is not None else ""
            print(
                f"batchpool logs: job {job.chunk}{which} printed nothing "
                "(or its worker died before saving its output)",
                file=sys.stderr,
            )
    if args.json:
        print_json(
            {
                "run": run.url,
                "logs": [
                    {"chunk": job.chunk, "state": job.state, "attempt": attempt, "text": text}
                    for job, attempt, text in found
                ],
            }
        )
        return EXIT_OK
    # Logs are the jobs' own bytes, as they printed them, when they go to a file or a
    # pipe; on a terminal (escaped_terminal) their escape sequences are shown, not obeyed.
    if args.chunk is not None:
        for _, _, text in found:
            sys.stdout.write(text)
        return EXIT_OK
    if not found:
        print(f"batchpool logs: no job of run {run.run_id} saved any output", file=sys.stderr)
    for index, (job, attempt, text) in enumerate(found):
        separator = "\n" if index else ""
        sys.stdout.write(f"{separator}==> chunk {job.chunk} ({job.state}, attempt {attempt}) <==\n")
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return EXIT_OK


# -- cancel -----------------------------------------------------------------------------------


def signal_local_workers(run: RunView) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """SIGTERM to the worker of each Running job of this host that is, provably, the
    local pool worker its (verified) start marker names: on this host and boot, started
    when the marker says, and holding the worker token the marker records a digest of
    (``processes.is_our_worker``). Returns the signalled jobs and the skipped ones (why)."""
    host = socket.gethostname()
    signalled: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for job in run.jobs:
        if job.state != "Running":
            continue
        start = job.start
        if job.host != host or start is None:
            why = f"it runs on {job.host or 'an unknown host'}, not on {host}"
        elif not is_our_worker(
            start.host, start.pid, start.pid_started, start.boot_id, start.worker
        ):
            why = (
                f"process {job.pid} is not the batchpool worker that started it (that worker "
                "is gone, or the marker names another process)"
            )
        else:
            try:
                os.kill(int(job.pid or 0), signal.SIGTERM)
            except ProcessLookupError:
                why = f"its worker process {job.pid} ended meanwhile"
            except PermissionError:
                why = f"no permission to signal its worker process {job.pid}"
            else:
                signalled.append({"chunk": job.chunk, "pid": job.pid})
                continue
        skipped.append({"chunk": job.chunk, "why": why})
    return signalled, skipped


def cancel_on_engine(engine: Engine, run: RunView, jobs: Sequence[JobView]) -> list[str]:
    job_ids = list(engine.usable_ids(run, jobs))
    if not job_ids:
        return []
    with rebuilt_backend(engine) as backend:
        try:
            backend.cancel(job_ids)
        except Exception as exc:
            raise CommandError(
                f"{engine.name} could not cancel jobs {', '.join(job_ids)} "
                f"({type(exc).__name__}: {exc}); cancel.json is written, so a live client stops",
                EXIT_UNREACHABLE,
            ) from exc
    return job_ids


def user_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


UNVERIFIED = (
    "the run's secret is not on this machine, so its job ids and worker pids in the store "
    f"cannot be trusted: set {SECRET_ENV} to the secret (the hex text in the client's secret "
    "file) to cancel them from here"
)


def cancel_run(store: Store, backend_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``batchpool cancel`` does, for the command and the web page: write cancel.json,
    then stop the run's jobs where that can be done from here. Returns what was done;
    ``active`` lists the chunks that were still Pending, Ready or Running."""
    secret = run_secret(store)
    # Job ids and worker pids are acted on only from documents that carry the run's
    # signature: nobody who merely writes the store can name a job or a process.
    run = load_run(store, secret)
    request = CancelRequest(requested=time.time(), by=f"{user_name()}@{socket.gethostname()}")
    store.put_document(Store.CANCEL, request, None)
    engine = engine_of(run, backend_options)
    active = [job for job in run.jobs if job.state in ACTIVE_STATES]
    cancelled: list[str] = []
    signalled: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if secret is None:
        if engine.queryable:
            skipped = [
                {"chunk": j.chunk, "why": UNVERIFIED} for j in active if j.state != "Pending"
            ]
        elif engine.local:
            skipped = [
                {"chunk": j.chunk, "why": UNVERIFIED} for j in active if j.state == "Running"
            ]
    elif engine.queryable:
        cancelled = cancel_on_engine(engine, run, [j for j in active if j.state != "Pending"])
    elif engine.local:
        signalled, skipped = signal_local_workers(run)
    handled = {job.chunk for job in active if job.job_id and job.job_id in cancelled}
    handled |= {entry["chunk"] for entry in (*signalled, *skipped)}
    left = [job.chunk for job in active if job.chunk not in handled]
    return {
        "run": run.url,
        "cancel_marker": store.path(Store.CANCEL),
        **to_builtins(request),
        "backend": engine.name,
        "verified": run.verified,
        "active": [job.chunk for job in active],
        "cancelled_job_ids": cancelled,
        "signalled": signalled,
        "skipped": skipped,
        "left_to_client": left,
        "problems": run.problems,
    }


def cmd_cancel(args: argparse.Namespace) -> int:
    store = resolve_run(args.run, args.storage_options, exact=True)
    document = cancel_run(store, args.backend_options)
    active = document.pop("active")
    cancelled = document["cancelled_job_ids"]
    signalled, skipped = document["signalled"], document["skipped"]
    left = document["left_to_client"]
    engine_name = document["backend"]
    if args.json:
        print_json(document)
    elif not active:
        print("nothing to cancel: every job has ended")
    else:
        print(f"wrote {document['cancel_marker']}: a live client stops retrying and dispatching")
        if cancelled:
            ids = ", ".join(cancelled)
            print(f"cancelled {plural(len(cancelled), 'job')} on {engine_name}: {ids}")
        if signalled:
            pids = ", ".join(f"{s['pid']} (chunk {s['chunk']})" for s in signalled)
            print(f"sent SIGTERM to {plural(len(signalled), 'worker')}: {pids}")
        for skip in skipped:
            print(f"did not stop chunk {skip['chunk']}: {safe(skip['why'])}")
        if left:
            print(
                f"{plural(len(left), 'job')} not yet running: cancel.json tells the client "
                "not to run them"
            )
    for problem in document["problems"]:
        print(f"batchpool cancel: {safe(problem)}", file=sys.stderr)
    return EXIT_OK if active else EXIT_TROUBLE


# -- clean ------------------------------------------------------------------------------------


def busy_reason(run: RunView, options: Mapping[str, Any]) -> str | None:
    """Why deleting this run would pull the storage from under running work, if it would."""
    if run.state != "running":
        return None
    alive = client_alive(run)
    engine_problem = refine_states(run, alive, options)
    live = [job for job in run.jobs if job.state in ("Ready", "Running")]
    if live:
        why = f"it is running ({format_counts(run.counts())})"
        return f"{why}, as far as the store tells ({engine_problem})" if engine_problem else why
    if alive:
        return "its client is still running"
    return None


def not_a_run(run: RunView) -> str | None:
    """Why a folder holding a manifest.json is not a batchpool run that ``clean`` may
    delete, or None when it is one: its manifest has batchpool's format marker and
    names the folder as its run, and the folder holds a run's layout and nothing else."""
    if run.manifest is None:
        return f"it is not a batchpool run ({run.problems[0] if run.problems else 'no manifest'})"
    if run.manifest.run_id != run.folder:
        return (
            f"it is not a batchpool run: its manifest names run {run.manifest.run_id!r}, "
            f"not its folder {run.folder!r}"
        )
    problem = run.store.layout_problem()
    return None if problem is None else f"it is not a batchpool run: {problem}"


@dataclass
class CleanPlan:
    """The runs to delete, those left alone (and why), those whose deletion failed, and
    the folders that are not batchpool runs (never touched)."""

    delete: list[RunView] = field(default_factory=list)
    skipped: list[tuple[RunView, str]] = field(default_factory=list)
    failed: list[tuple[RunView, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)


def plan_clean(runs: Sequence[RunView], force: bool, options: Mapping[str, Any]) -> CleanPlan:
    plan = CleanPlan()
    for run in runs:
        reason = None if force else busy_reason(run, options)
        if reason:
            plan.skipped.append((run, f"{reason}; --force deletes it anyway"))
        else:
            plan.delete.append(run)
    return plan


def delete_runs(plan: CleanPlan) -> None:
    """Delete the planned runs; a run that cannot be deleted moves to ``plan.failed``."""
    deleted = []
    for run in plan.delete:
        try:
            run.store.delete_run()
        except StorageError as exc:
            plan.failed.append((run, str(exc)))
        else:
            forget_secret(run.url)  # this user's copy of its secret, if it made the run
            deleted.append(run)
    plan.delete = deleted


def old_runs(root: Store, older_than: float) -> tuple[list[RunView], CleanPlan]:
    """The runs under ``root`` created more than ``older_than`` seconds ago; in the plan,
    the runs whose age is unknown (skipped) and the folders that are no runs (ignored)."""
    found: list[RunView] = []
    plan = CleanPlan()
    now = time.time()
    for store in runs_in(root):
        try:
            run = read_run(store)
        except (OSError, ValueError, StorageError) as exc:
            plan.ignored.append((store.url, f"it could not be read: {exc}"))
            continue
        why = not_a_run(run)
        if why is not None:
            plan.ignored.append((store.url, why))
            continue
        created = created_time(run)
        if created is None:
            plan.skipped.append((run, "its manifest does not say when it was created"))
        elif now - created > older_than:
            found.append(run)
    return found, plan


def one_run(args: argparse.Namespace) -> RunView:
    """The one run that ``clean RUN`` deletes: named exactly, and a batchpool run."""
    store = open_root(args.target, args.storage_options)
    if not store.exists(Store.MANIFEST):
        if runs_in(store):
            raise CommandError(
                f"{args.target} is a folder of runs; give --older-than AGE ({AGE_FORMS}) "
                "to delete the old ones, or the folder of one run"
            )
        store = resolve_run(args.target, args.storage_options, exact=True)
    run = load_run(store)
    why = not_a_run(run)
    if why is not None:
        raise CommandError(
            f"{args.target} was left alone: {why}; clean deletes only batchpool runs"
        )
    return run


def cmd_clean(args: argparse.Namespace) -> int:
    if args.older_than is not None:
        older_than = parse_age(args.older_than)
        root = open_root(args.target, args.storage_options)
        if not storage_exists(root):
            raise CommandError(f"{args.target} does not exist; give the folder that holds runs")
        if root.exists(Store.MANIFEST):
            raise CommandError(
                f"{args.target} is a run, not a folder of runs; "
                f"`batchpool clean {args.target}` (without --older-than) deletes it"
            )
        candidates, found = old_runs(root, older_than)
    else:
        candidates, found = [one_run(args)], CleanPlan()
    plan = plan_clean(candidates, args.force, args.backend_options)
    plan.skipped.extend(found.skipped)
    plan.ignored = found.ignored
    if not args.dry_run:
        delete_runs(plan)
    freed = sum(run.size_bytes for run in plan.delete)
    code = EXIT_UNREACHABLE if plan.failed else EXIT_TROUBLE if plan.skipped else EXIT_OK
    if args.json:
        print_json(
            {
                "dry_run": args.dry_run,
                "deleted": [
                    {"run_id": r.run_id, "url": r.url, "size_bytes": r.size_bytes}
                    for r in plan.delete
                ],
                "skipped": [{"run_id": r.run_id, "url": r.url, "why": w} for r, w in plan.skipped],
                "failed": [{"run_id": r.run_id, "url": r.url, "error": e} for r, e in plan.failed],
                "ignored": [{"url": url, "why": why} for url, why in plan.ignored],
                "freed_bytes": freed,
            }
        )
        return code
    verb = "would delete" if args.dry_run else "deleted"
    for run in plan.delete:
        print(f"{verb} {run.url} ({format_bytes(run.size_bytes)}, created {format_created(run)})")
    for run, why in plan.skipped:
        print(f"skipped {run.url}: {safe(why)}")
    for url, why in plan.ignored:
        print(f"left alone {safe(url)}: {safe(why)}")
    for run, error in plan.failed:
        print(f"batchpool clean: could not delete {run.url}: {safe(error)}", file=sys.stderr)
    if not plan.delete and not plan.skipped and not plan.failed:
        print(f"no run in {args.target} is older than {args.older_than}")
    elif plan.delete:
        freed_verb = "would free" if args.dry_run else "freed"
        print(f"{freed_verb} {format_bytes(freed)} in {plural(len(plan.delete), 'run')}")
    return code


# -- the command line -------------------------------------------------------------------------


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: the value is JSON when it parses as JSON, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write it as KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def attempt_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: attempts are numbered from 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    def key_values(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
        """A repeatable ``--flag KEY=VALUE``, collected in ``args.<flag>`` as pairs."""
        parser.add_argument(
            flag,
            dest=flag.removeprefix("--").replace("-", "_"),
            action="append",
            default=[],
            type=key_value,
            metavar="KEY=VALUE",
            help=f"{help_text}; VALUE is JSON when it parses as JSON; repeat for more",
        )

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document instead")
    key_values(
        common, "--storage-option", "an fsspec storage option (e.g. endpoint_url=http://...)"
    )
    parser = argparse.ArgumentParser(
        prog="batchpool",
        description="List, inspect, cancel and clean batchpool runs, reading only their storage.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def run_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = command(name, help_text)
        sub.add_argument("run", metavar="RUN", help="a run's folder or URL, or its name")
        return sub

    def backend_options(sub: argparse.ArgumentParser) -> None:
        key_values(
            sub,
            "--backend-option",
            "an option of the run's backend, made here to ask or cancel its jobs (e.g. "
            "squeue=/opt/slurm/bin/squeue); the store names only which backend ran the run",
        )

    runs = command("runs", "list the runs under a storage folder or URL")
    runs.add_argument("storage", metavar="STORAGE", help="the folder or URL that holds runs")
    runs.set_defaults(handler=cmd_runs)

    status = run_command("status", "a run's state and the table of its jobs")
    backend_options(status)
    status.set_defaults(handler=cmd_status)

    logs = run_command("logs", "the captured stdout and stderr of a run's jobs")
    logs.add_argument(
        "chunk", metavar="CHUNK", nargs="?", help="a chunk id or its prefix (default: every job)"
    )
    logs.add_argument(
        "--attempt", type=attempt_number, metavar="N", help="only the output of attempt N"
    )
    logs.set_defaults(handler=cmd_logs)

    cancel = run_command("cancel", "stop a run: ask its client to stop and cancel its jobs")
    backend_options(cancel)
    cancel.set_defaults(handler=cmd_cancel)

    clean = command("clean", "delete old runs under STORAGE, or one RUN")
    clean.add_argument("target", metavar="STORAGE|RUN", help="a folder of runs, or one run")
    clean.add_argument(
        "--older-than", metavar="AGE", help=f"delete the runs created longer ago: {AGE_FORMS}"
    )
    clean.add_argument("--dry-run", action="store_true", help="say what would be deleted")
    clean.add_argument("--force", action="store_true", help="delete running runs too")
    backend_options(clean)
    clean.set_defaults(handler=cmd_clean)

    ui = command("ui", "serve a web page of every run under STORAGE (needs batchpool[ui])")
    ui.add_argument("storage", metavar="STORAGE", help="the folder or URL that holds runs")
    ui.add_argument("--port", type=int, default=8765, help="the port (default 8765; 0: any free)")
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default 127.0.0.1: this machine only)",
    )
    ui.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than a loopback address: the page, with its logs and its "
        "Cancel and Delete buttons, is then reachable from other machines (plain HTTP)",
    )
    ui.add_argument("--open", action="store_true", help="open the page in a browser too")
    backend_options(ui)
    ui.set_defaults(handler=cmd_ui)

    image = command("image", "container images for workers")
    image_commands = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = image_commands.add_parser(
        "build",
        help="build a worker image that matches this client",
        description="Build a worker image from a base image that has python3 (this client's "
        "minor version) and pip: it installs this batchpool, its serializer and storage "
        "libraries at the versions installed here, and your requirements.",
    )
    build.add_argument("--base", required=True, metavar="IMAGE", help="the base image")
    build.add_argument("-t", "--tag", required=True, metavar="TAG", help="the new image's tag")
    build.add_argument(
        "-r", "--requirements", metavar="FILE", help="a pip requirements file to install too"
    )
    build.add_argument(
        "--engine", metavar="CMD", help="docker or podman (default: the first on the PATH)"
    )
    build.add_argument(
        "--network", default="host", help="the build's network (default: host; '' for none)"
    )
    build.set_defaults(handler=cmd_image_build)
    return parser


def cmd_ui(args: argparse.Namespace) -> int:
    from batchpool.ui import UIServer, is_loopback  # Flask is imported by UIServer()

    root = open_root(args.storage, args.storage_options)
    if not storage_exists(root):
        raise CommandError(f"{args.storage} does not exist; give the folder that holds runs")
    try:
        server = UIServer(
            (root.fs, root.root),
            host=args.host,
            port=args.port,
            allow_remote=args.allow_remote,
            backend_options=dict(args.backend_options),
        )
    except ImportError as exc:
        raise CommandError(str(exc)) from exc
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise CommandError(
            f"could not listen on {args.host}:{args.port} ({exc}); "
            "give another --port (0 picks a free one)"
        ) from exc
    if not is_loopback(args.host):
        print(
            f"batchpool ui: warning: listening on {args.host}, not only on this machine: "
            "whoever has the URL below can read the runs' logs and cancel or delete runs; "
            "the traffic is plain HTTP",
            file=sys.stderr,
        )
    print(f"batchpool ui: the runs of {root.url} at", flush=True)
    print(server.url, flush=True)
    print("(the token in the URL lets its holder cancel and delete runs; Ctrl-C stops)", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return EXIT_OK


def cmd_image_build(args: argparse.Namespace) -> int:
    from batchpool import images

    try:
        tag = images.build_image(
            args.base,
            args.tag,
            args.requirements,
            engine=args.engine,
            network=args.network or None,
            quiet=False,
        )
    except (ValueError, BackendError) as exc:
        raise CommandError(str(exc)) from exc
    print(tag)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"batchpool {args.command}"
    try:
        args.storage_options = dict(args.storage_option)
        args.backend_options = dict(getattr(args, "backend_option", []))
        with escaped_terminal():  # what the store says never drives the terminal
            return int(args.handler(args))
    except CommandError as exc:
        print(f"{prefix}: {safe(str(exc))}", file=sys.stderr)
        return exc.code
    except StorageError as exc:
        print(f"{prefix}: {safe(str(exc))}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except FileNotFoundError as exc:
        print(f"{prefix}: {safe(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader of our output went away (`| head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a storage library's own error, one line rather than a traceback
        print(
            f"{prefix}: failed: {type(exc).__name__}: {safe(' '.join(str(exc).split()))}",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
