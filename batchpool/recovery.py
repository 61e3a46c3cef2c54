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
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import platformdirs

from batchpool import documents
from batchpool.backends.base import Backend, Resources
from batchpool.chunks import Adopted, Chunk
from batchpool.culprits import DEATHS, PIECE_OF, SPLIT_FROM, input_skips
from batchpool.documents import ClientInfo, JournalEntry, Manifest
from batchpool.errors import BatchPoolError, IntegrityError, StorageError
from batchpool.future import BatchPoolFuture, JobRecord
from batchpool.processes import same_process
from batchpool.runs import JobView, RunView, find_runs, read_run
from batchpool.serialization import (
    ERROR,
    OK,
    SECRET_ENV,
    decode_chunk,
    decode_outcome,
    unseal,
)
from batchpool.store import Store

log = logging.getLogger("batchpool")

#: How long a resume=True session that lost the race to create its run waits for the
#: winner's secret to appear in this user's secret file (seconds).
RESUME_SECRET_WAIT = 10.0

# -- the run secret, kept by the client ---------------------------------------------------------


def secret_file(run_url: str) -> Path:
    """Where this user keeps the secret of the run at ``run_url`` (mode 0600)."""
    digest = hashlib.sha256(run_url.encode()).hexdigest()[:32]
    return Path(platformdirs.user_data_dir("batchpool")) / "run-secrets" / digest


def _private_folder(folder: Path) -> None:
    """Make ``folder`` (mode 0700), or check that it is this user's and nobody else's."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise BatchPoolError(
            f"the folder of run secrets {folder} must be a folder of this user's with mode "
            f"0700 (it is {stat.filemode(info.st_mode)}, owner uid {info.st_uid}); "
            f"`chmod 700 {folder}` if it is yours, or remove it"
        )


def save_secret(run_url: str, secret: bytes) -> Path:
    """Keep the secret of a run this client has just created: a new file, mode 0600,
    created exclusively (a file left there by a deleted run at the same URL, or a
    link someone put there, is removed first, never written through)."""
    path = secret_file(run_url)
    _private_folder(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        path.unlink()  # stale: the run at this URL is new, as create_new just told
        fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return path


def forget_secret(run_url: str) -> None:
    try:
        secret_file(run_url).unlink()
    except FileNotFoundError:
        pass


def _read_secret_file(path: Path) -> str:
    """The hex text of a secret file, refused unless it is this user's and private."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise BatchPoolError(
                f"the run secret file {path} is not private: it is "
                f"{stat.filemode(info.st_mode)} and owned by uid {info.st_uid}, and must be "
                f"a file of this user's (uid {os.geteuid()}) that only it can read. Anyone "
                "who read it can sign objects of the run; `chmod 600` it if it is yours and "
                "you trust its content, or delete it"
            )
        return f.read().strip()


def find_secret(run_url: str, given: str | bytes | None = None) -> bytes | None:
    """The run's secret: ``given`` (hex text or bytes), else ``BATCHPOOL_RUN_SECRET``,
    else the file this client saved when it created the run; None when none is known.
    A secret file of the wrong mode or owner, or a link, is refused with an error."""
    if isinstance(given, bytes):
        return given
    text = given or os.environ.get(SECRET_ENV)
    if not text:
        path = secret_file(run_url)
        try:
            text = _read_secret_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # a link (O_NOFOLLOW), or unreadable
            raise BatchPoolError(
                f"the run secret file {path} cannot be read safely: {exc}"
            ) from None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BatchPoolError(
            f"the run secret given for {run_url} is not hex text (64 hex digits)"
        ) from None


def load_secret(run_url: str, given: str | bytes | None = None) -> bytes:
    """``find_secret``, or an error that says where the secret is to be found."""
    secret = find_secret(run_url, given)
    if secret is None:
        raise BatchPoolError(
            f"the secret of the run at {run_url} is not on this machine "
            f"(looked in {secret_file(run_url)}): it stays with the client that created "
            "the run. Pass secret= (the hex text in that file on the client's machine) "
            f"or set {SECRET_ENV}"
        )
    return secret


# -- finding the run ----------------------------------------------------------------------------


def run_slug(name: str | None) -> str:
    """A run name as it appears in run ids (safe in paths and job names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name or "run").strip("-.")[:64] or "run"


def run_folder(name: str) -> str:
    """The folder of the ``resume=True`` run called ``name``: the name itself when it is
    safe in paths, else its slug and a digest of the exact name, so that two names
    never share a folder (``exp 1`` and ``exp?1``, ``データ`` and ``模型``)."""
    slug = run_slug(name)
    if slug == name:
        return slug
    return f"{slug}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def find_runs_named(fs: Any, root: str, name: str) -> list[Store]:
    """The runs ``name`` may mean under ``root``, the likeliest first: the folder
    ``root/name`` when it is a run (a run id), else the runs whose manifests record
    exactly that name, newest first. Manifests are read unverified here: the caller
    keeps the first that carries its run's signature."""
    exact = Store(fs, f"{root}/{name}")
    if "/" not in name and exact.exists(Store.MANIFEST):
        return [exact]
    slug = run_slug(name)
    named = []
    for run in find_runs((fs, root)):  # in folder order: a name's runs oldest first
        if not run.root.rsplit("/", 1)[-1].startswith(slug):
            continue
        try:
            if run.get_document(Manifest, Store.MANIFEST).name == name:
                named.append(run)
        except (FileNotFoundError, ValueError):
            continue  # not a readable run: not the one
    if named:
        return named[::-1]
    url = Store(fs, root).url
    raise FileNotFoundError(
        f"no run named {name!r} in {url}: `batchpool runs {url}` lists the runs there "
        "(a run is kept after its executor ends only with cleanup_bucket=False)"
    )


def next_chunk_sequence(view: RunView) -> int:
    """The sequence number of the next chunk of a run."""
    return max((int(job.chunk.split("-", 1)[0]) for job in view.jobs), default=-1) + 1


def client_alive(view: RunView) -> bool:
    """Whether the run's (newest) client still runs on this machine and has not closed it."""
    assert view.manifest is not None
    client = view.manifest.client
    if view.closed is not None:  # it shut down
        return False
    if client.host != socket.gethostname():
        return False
    return same_process(client.pid, client.pid_started) is True


def check_client_gone(view: RunView, force: bool) -> None:
    """Refuse to attach while the run's client still uses it on this machine."""
    if force or not client_alive(view):
        return
    assert view.manifest is not None
    raise BatchPoolError(
        f"the client of run {view.run_id} still runs here (pid {view.manifest.client.pid}); "
        "two clients would run its jobs twice. Stop it first, or pass force=True if it no "
        "longer uses the run"
    )


# -- creating and reopening a run ---------------------------------------------------------------


def create_run(store: Store, manifest: Manifest) -> bytes | None:
    """Create a run at ``store``, exclusively: its folders, its manifest (signed with a
    new secret) and this user's copy of the secret. The secret; None when a run is
    there already (made earlier, or a moment ago by another session)."""
    secret = secrets.token_bytes(32)
    store.create()
    if not store.create_new(store.MANIFEST, documents.encode(manifest, store.MANIFEST, secret)):
        return None
    save_secret(store.url, secret)
    return secret


def reopen_resumed(store: Store, name: str) -> Reopened:
    """The run a ``resume=True`` session continues. When another session of this user
    created it a moment ago, its secret may not be in the secret file yet: waited for
    up to ``RESUME_SECRET_WAIT`` seconds."""
    deadline = time.monotonic() + RESUME_SECRET_WAIT
    while True:
        try:
            reopened = reopen(store, load_secret(store.url))
            break
        except BatchPoolError:
            if time.monotonic() >= deadline or not _just_created(store):
                raise
            time.sleep(0.05)
    if reopened.manifest.name != name:
        raise BatchPoolError(
            f"the folder {store.url} holds the run named {reopened.manifest.name!r}, not "
            f"{name!r}; give this run another name"
        )
    reopened.how = "resume"
    if client_alive(reopened.view):
        # Both sessions work: objects never collide (chunk ids are random, journal entries
        # are created exclusively), and a call neither has a result for may run in both.
        log.warning(
            "batchpool: run %s is open in another session too (pid %s): calls that neither "
            "has a result for run in each",
            store.url,
            reopened.manifest.client.pid,
        )
    return reopened


def _just_created(store: Store) -> bool:
    """Whether the run at ``store`` says it was created in the last minute (unverified:
    it decides only whether to wait for its secret)."""
    try:
        created = datetime.fromisoformat(store.get_document(Manifest, store.MANIFEST).created)
    except (OSError, ValueError, StorageError):
        return False
    return abs(time.time() - created.timestamp()) < 60


def mark_reopened(reopened: Reopened, client: ClientInfo, backend: dict[str, Any]) -> None:
    """Record in the run that a new session took it over: the manifest names the new
    client and backend and lists the session, and the journal says the run is open."""
    store, secret = reopened.store, reopened.secret
    session = {"opened": datetime.now(timezone.utc).isoformat(), "how": reopened.how}
    sessions = [*documents.to_builtins(reopened.manifest).get("sessions", []), session]
    manifest = documents.replace(
        reopened.manifest,
        client=documents.to_builtins(client),
        backend=backend,
        sessions=sessions,
    )
    store.put_document(store.MANIFEST, manifest, secret)
    # The journal says the run is open again (an earlier session closed it).
    entry = documents.build(JournalEntry, {"time": time.time(), "opened": time.time()})
    reopened.next_journal = store.add_journal_entry(entry, secret, reopened.next_journal) + 1


# -- resume: results by call content ------------------------------------------------------------


def call_key(fn_digest: bytes, call: tuple[Any, ...], dumps: Callable[[Any], bytes]) -> str:
    """The content hash of one call: its function's pickle digest and its arguments."""
    return hashlib.sha256(fn_digest + dumps(call)).hexdigest()


def earlier_outcomes(
    store: Store, secret: bytes, view: RunView
) -> tuple[dict[str, bytes], dict[str, str]]:
    """``{call key: pickled result}`` of every call of the run that returned a value, and
    ``{call key: chunk id}`` of those that raised (and did not return elsewhere). A chunk
    or outcome without the run's signature is not used: its calls run again."""
    found: dict[str, bytes] = {}
    failed: dict[str, str] = {}
    for job in view.jobs:
        if not job.has_result:
            continue
        chunk_key = store.chunk_key(job.chunk)
        result_key = store.result_key(job.chunk, job.attempt)
        try:
            header, _groups = decode_chunk(unseal(secret, chunk_key, store.get(chunk_key)))
            keys = header.get("keys") or []
            if not any(keys):
                continue
            _meta, entries = decode_outcome(unseal(secret, result_key, store.get(result_key)))
        except (FileNotFoundError, IntegrityError) as exc:
            log.warning("batchpool: the results of chunk %s are not reused: %s", job.chunk, exc)
            continue
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

    @property
    def manifest(self) -> Manifest:
        assert self.view.manifest is not None  # reopen() refuses a run without one
        return self.view.manifest


def adopt(reopened: Reopened, backend: Backend, resources: Resources, orphan_grace: float) -> None:
    """Futures for every call in the run, in submission order, and how the executor
    takes over each chunk (see ``Watcher._adopt``). A worker of this machine that still
    runs a chunk is waited for ``orphan_grace`` seconds at most."""
    store, secret = reopened.store, reopened.secret
    here = socket.gethostname()
    split = {job.chunk for job in reopened.view.jobs if job.split_into}
    # The futures of each chunk's calls (None where skipped), for the pieces of a
    # chunk that was split (culprits.py): they complete that chunk's futures.
    calls_of: dict[str, list[BatchPoolFuture | None]] = {}
    covered: set[int] = set()  # the futures of split chunks that a piece taken over has
    for job in reopened.view.jobs:
        chunk_key = store.chunk_key(job.chunk)
        try:
            header, groups = decode_chunk(unseal(secret, chunk_key, store.get(chunk_key)))
        except FileNotFoundError:
            continue  # markers without an input: nothing to run
        except IntegrityError as exc:
            # Its calls cannot be known, so they cannot become futures: say so loudly.
            log.error("batchpool: chunk %s of %s is not taken over: %s", job.chunk, store.url, exc)
            continue
        chunk = Chunk(job.chunk, [], list(header.get("labels") or []), resources)
        chunk.record = JobRecord(store, job.chunk, attempt=job.attempt, job_ids=list(job.job_ids))
        chunk.attempt = job.attempt
        chunk.job_id = job.job_id or f"adopted-{job.chunk}"
        piece_of = header.get(PIECE_OF)
        if piece_of is not None:  # a piece: its calls are those of the chunk split
            if header.get(SPLIT_FROM) not in split or piece_of not in calls_of:
                continue  # that chunk itself is taken over (the client died splitting it)
            chunk.inherited_deaths = int(header.get(DEATHS) or 0)
            skipped = input_skips(groups)
            for i, future in enumerate(calls_of[piece_of]):
                chunk.futures.append(None if i in skipped else future)
                if future is not None and i not in skipped:
                    future._job = chunk.record
                    if not job.split_into:
                        covered.add(id(future))
        else:
            calls = calls_of[job.chunk] = []
            for n_calls, _payload, skip in groups:
                for i in range(n_calls):
                    future = BatchPoolFuture()
                    reopened.futures.append(future)
                    if i in skip:
                        future.cancel()
                        chunk.futures.append(None)
                        calls.append(None)
                        continue
                    future._start()
                    future._job = chunk.record
                    chunk.futures.append(future)
                    calls.append(future)
        if job.split_into:  # its pieces complete its calls
            continue
        reopened.adopted.append(_how(job, chunk, backend, here, orphan_grace))
    for chunk_id in split & calls_of.keys():  # calls no piece runs: cancelled as it split
        for future in calls_of[chunk_id]:
            if future is not None and id(future) not in covered:
                future._cancel_queued()


def _how(job: JobView, chunk: Chunk, backend: Backend, here: str, grace: float) -> Adopted:
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
    if start.host == here:
        # A worker of this machine: waited for while it is, provably, the pool worker
        # that wrote this (signed) marker, at most ``grace`` seconds; then its result
        # is read, or the chunk runs again.
        chunk.worker = start
        chunk.orphan_deadline = time.monotonic() + grace
        return Adopted(chunk, "orphan")
    # Started on another machine by an engine whose jobs die with the client: it is
    # gone or unreachable; run it again as a new attempt.
    chunk.attempt += 1
    return Adopted(chunk, "new")


def reopen(store: Store, secret: bytes) -> Reopened:
    """Read a run to continue it: only what carries the run's signature is used."""
    view = read_run(store, secret)
    if view.manifest is None:
        why = view.problems[0] if view.problems else "its manifest.json cannot be read"
        raise IntegrityError(
            f"cannot reopen the run at {store.url}: {why}. Either the secret is not this "
            "run's, or the manifest was changed by someone without it: a run is continued "
            "only from a manifest it signed itself"
        )
    if view.manifest.run_id != view.folder:
        raise IntegrityError(
            f"the manifest in {store.url} is that of run {view.manifest.run_id!r}, not of "
            f"the folder {view.folder!r}: a run is reopened only in its own folder (move "
            "it back, or attach to the original)"
        )
    for problem in view.problems:
        log.warning("batchpool: reopening %s: %s", store.url, problem)
    return Reopened(store, secret, view, next_chunk_sequence(view), view.next_journal)
