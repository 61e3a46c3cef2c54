"""Opening a run again: its secret, its finished results, and the calls still to finish.

Two ways back into a run, both through ``BatchPoolExecutor``:

- ``attach``: the client that submitted the calls died. Every chunk in the store
  becomes futures again, in submission order: finished chunks give their results,
  jobs still known to the engine are watched, jobs that died with the client run
  again (a job that a worker had started only when its worker is gone, so no
  call runs twice).
- ``resume=True``: a new session of a named run. Calls whose content (function and
  arguments, pickled and hashed) already has a successful result return it.

The run secret signs chunks and outcomes and is never written to storage. This
client keeps it in a private file (``secret_file``) so that it can reopen its
own runs; from another machine, pass it (``secret=`` or ``BATCHPOOL_RUN_SECRET``).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from batchpool.backends.base import Backend, Resources
from batchpool.errors import BatchPoolError
from batchpool.future import BatchPoolFuture, JobRecord
from batchpool.runs import JobView, RunView, find_runs, process_started, read_run
from batchpool.serialization import (
    ERROR,
    OK,
    SECRET_ENV,
    decode_chunk,
    decode_outcome,
    unseal,
)
from batchpool.store import Store
from batchpool.watcher import Adopted, Chunk

# -- the run secret, kept by the client ---------------------------------------------------------


def secret_file(run_url: str) -> Path:
    """Where this user keeps the secret of the run at ``run_url`` (mode 0600)."""
    digest = hashlib.sha256(run_url.encode()).hexdigest()[:32]
    return Path(platformdirs.user_data_dir("batchpool")) / "run-secrets" / digest


def save_secret(run_url: str, secret: bytes) -> Path:
    path = secret_file(run_url)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return path


def forget_secret(run_url: str) -> None:
    try:
        secret_file(run_url).unlink()
    except FileNotFoundError:
        pass


def load_secret(run_url: str, given: str | bytes | None = None) -> bytes:
    """The run's secret: ``given`` (hex text or bytes), else ``BATCHPOOL_RUN_SECRET``,
    else the file this client saved when it created the run."""
    if isinstance(given, bytes):
        return given
    text = given or os.environ.get(SECRET_ENV)
    if not text:
        try:
            text = secret_file(run_url).read_text().strip()
        except FileNotFoundError:
            raise BatchPoolError(
                f"the secret of the run at {run_url} is not on this machine "
                f"(looked in {secret_file(run_url)}): it stays with the client that created "
                "the run. Pass secret= (the hex text in that file on the client's machine) "
                f"or set {SECRET_ENV}"
            ) from None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BatchPoolError(
            f"the run secret given for {run_url} is not hex text (64 hex digits)"
        ) from None


# -- finding the run ----------------------------------------------------------------------------


def run_slug(name: str | None) -> str:
    """A run name as it appears in run ids (safe in paths and job names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name or "run").strip("-.")[:64] or "run"


def find_run(fs: Any, root: str, name: str) -> Store:
    """The run called ``name`` under ``root``: the folder ``root/name`` when it is a run
    (a run id, or a ``resume=True`` run), else the newest run created with that name."""
    exact = Store(fs, f"{root}/{name}")
    if exact.exists(Store.MANIFEST):
        return exact
    slug = run_slug(name)
    named = [
        run
        for run in find_runs((fs, root))  # in folder order: a name's runs oldest first
        if (run_id := run.root.rsplit("/", 1)[-1]) == slug or run_id.startswith(f"{slug}-")
    ]
    if named:
        return named[-1]
    url = Store(fs, root).url
    raise FileNotFoundError(
        f"no run named {name!r} in {url}: `batchpool runs {url}` lists the runs there "
        "(a run is kept after its executor ends only with cleanup_bucket=False)"
    )


def next_sequences(view: RunView) -> tuple[int, int]:
    """The sequence numbers of the next chunk and the next journal entry of a run."""
    chunk = max((int(job.chunk.split("-", 1)[0]) for job in view.jobs), default=-1) + 1
    return chunk, view.journal_entries


def check_client_gone(view: RunView, force: bool) -> None:
    """Refuse to attach while the run's client still uses it on this machine."""
    manifest = view.manifest
    client = manifest.get("client") or {}
    pid, started = client.get("pid"), client.get("pid_started")
    if force or view.closed is not None:  # it shut down: nothing runs twice
        return
    if client.get("host") != socket.gethostname() or not pid or started is None:
        return
    if process_started(int(pid)) == started:
        raise BatchPoolError(
            f"the client of run {manifest.get('run_id')} still runs here (pid {pid}); two "
            "clients would run its jobs twice. Stop it first, or pass force=True if it no "
            "longer uses the run"
        )


# -- resume: results by call content ------------------------------------------------------------


def call_key(fn_digest: bytes, call: tuple[Any, ...], dumps: Callable[[Any], bytes]) -> str:
    """The content hash of one call: its function's pickle digest and its arguments."""
    return hashlib.sha256(fn_digest + dumps(call)).hexdigest()


def earlier_outcomes(
    store: Store, secret: bytes, view: RunView
) -> tuple[dict[str, bytes], dict[str, str]]:
    """``{call key: pickled result}`` of every call of the run that returned a value, and
    ``{call key: chunk id}`` of those that raised (and did not return elsewhere)."""
    found: dict[str, bytes] = {}
    failed: dict[str, str] = {}
    for job in view.jobs:
        if not job.has_result:
            continue
        chunk_key = store.chunk_key(job.chunk)
        header, _groups = decode_chunk(unseal(secret, chunk_key, store.get(chunk_key)))
        keys = header.get("keys") or []
        if not any(keys):
            continue
        result_key = store.result_key(job.chunk, job.attempt)
        _meta, entries = decode_outcome(unseal(secret, result_key, store.get(result_key)))
        for key, entry in zip(keys, entries, strict=False):
            if key and entry[0] == OK:
                found[key] = entry[1]
            elif key and entry[0] == ERROR:
                failed[key] = job.chunk
    return found, {key: chunk for key, chunk in failed.items() if key not in found}


# -- attach: the chunks of a run whose client died ------------------------------------------------


@dataclass
class Reopened:
    """What an executor needs to continue an existing run instead of creating one."""

    store: Store
    secret: bytes
    view: RunView
    next_chunk: int
    next_journal: int
    adopted: list[Adopted] = field(default_factory=list)
    futures: list[BatchPoolFuture] = field(default_factory=list)
    results: dict[str, bytes] = field(default_factory=dict)  # resume: call key -> result
    failures: dict[str, str] = field(default_factory=dict)  # resume: call key -> chunk id
    how: str = "resume"  # or "attach"


def adopt(reopened: Reopened, backend: Backend, resources: Resources) -> None:
    """Futures for every call in the run, in submission order, and how the executor
    takes over each chunk (see ``Watcher._adopt``)."""
    store, secret = reopened.store, reopened.secret
    here = socket.gethostname()
    for job in reopened.view.jobs:
        chunk_key = store.chunk_key(job.chunk)
        try:
            header, groups = decode_chunk(unseal(secret, chunk_key, store.get(chunk_key)))
        except FileNotFoundError:
            continue  # markers without an input: nothing to run
        chunk = Chunk(job.chunk, [], list(header.get("labels") or []), resources)
        chunk.record = JobRecord(store, job.chunk, attempt=job.attempt, job_ids=list(job.job_ids))
        chunk.attempt = job.attempt
        chunk.job_id = job.job_id or f"adopted-{job.chunk}"
        for n_calls, _payload, skip in groups:
            for i in range(n_calls):
                future = BatchPoolFuture()
                reopened.futures.append(future)
                if i in skip:
                    future.cancel()
                    chunk.futures.append(None)
                    continue
                future._start()
                future._job = chunk.record
                chunk.futures.append(future)
        reopened.adopted.append(_how(job, chunk, backend, here))


def _how(job: JobView, chunk: Chunk, backend: Backend, here: str) -> Adopted:
    if job.has_result:
        return Adopted(chunk, "done")
    if job.state in ("Error", "Cancelled") and job.reason is not None:
        chunk.reasons.append(f"before the client died: {job.reason}")
        return Adopted(chunk, "given_up")
    if job.job_ids and backend.job_ids_outlive_client:
        return Adopted(chunk, "engine")
    start = job.starts.get(job.attempt)
    if start is None:  # never started: it died queued with its client
        return Adopted(chunk, "new")
    if start.get("host") == here and start.get("pid"):
        return Adopted(chunk, "orphan", int(start["pid"]), start.get("pid_started"))
    # Started on another machine by an engine whose jobs die with the client: it is
    # gone or unreachable; run it again as a new attempt.
    chunk.attempt += 1
    return Adopted(chunk, "new")


def reopen(store: Store, secret: bytes) -> Reopened:
    view = read_run(store)
    # The secret must be right before anything else is trusted: check one signed object.
    for job in view.jobs:
        key = store.chunk_key(job.chunk)
        try:
            unseal(secret, key, store.get(key))
        except FileNotFoundError:
            continue
        break
    next_chunk, next_journal = next_sequences(view)
    return Reopened(store, secret, view, next_chunk, next_journal)
