"""A run's layout in storage, and the few operations the executor and workers need.

This module is the only place that knows where things live::

    <root>/<run-id>/
        manifest.json                  name, created, versions, backend, settings; at
                                       close, each chunk's job ids, attempts and state
        blobs/<sha256>                 content-addressed payloads
        chunks/<chunk>.in              a chunk's calls (signed)
        results/<chunk>.<attempt>.out  a chunk's outcomes, written once, atomically (signed)
        logs/<chunk>.<attempt>.log     the job's captured stdout and stderr
        events/<chunk>.<attempt>.start JSON: the worker began (host, pid, time)
        events/<chunk>.<attempt>.end   JSON: the worker ended (times, CPU, peak memory, failures)
        jobs/<seq>.json                JSON journal of the client: the engine's job id of each
                                       chunk attempt handed over, chunks given up on
                                       (Error, Cancelled), and the client's close
        cancel.json                    JSON: ``batchpool cancel`` asked the run to stop

Chunk ids start with a zero-padded sequence number, so listing ``chunks/`` gives
the calls in the order they were submitted. Only ``chunks/`` and ``results/``
hold pickles (signed frames); everything a person or the CLI reads is JSON or
text that needs no secret to read, and the JSON documents but ``cancel.json``
are signed too (``documents.py``). ``parse_key`` tells a key of this layout from
a stray object, and ``layout_problem`` a run's folder from any other.

Every write is atomic: on filesystems with rename (local disks, NFS mounts) the
bytes go to a temporary name in the same folder and are renamed into place; on
object stores one PUT (or one completed multipart upload) is all-or-nothing.
``create_new`` writes only where nothing is (a run's manifest, so that creating a
run is exclusive).

Every operation is retried with exponential backoff and jitter, within a
deadline, when it fails in a way that passes (a connection reset, a timeout,
HTTP 408, 429 or 5xx, as gcsfs, s3fs, aiohttp and botocore report them). Any
other failure is raised at once as a ``StorageError`` naming the operation and
the URL; a missing object stays a ``FileNotFoundError``, which callers expect,
except on a write, where it means the run's folder is gone.
Writes are whole-object and idempotent, so a retried write cannot corrupt one.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from batchpool import documents
from batchpool.errors import StorageError, UnsafePathError

log = logging.getLogger("batchpool")
T = TypeVar("T")

_FOLDERS = ("chunks", "results", "logs", "events", "blobs", "jobs")
#: Everything a run's folder may hold at its top level.
RUN_ENTRIES = frozenset({*_FOLDERS, "manifest.json", "cancel.json"})
#: The keys of a chunk's objects: its input, and per attempt its outcome, log and markers.
_CHUNK = r"[0-9]{8}-[0-9a-f]{12}"
_INPUT_KEY = re.compile(rf"chunks/({_CHUNK})\.in")
_ATTEMPT_KEY = re.compile(rf"(results|logs|events)/({_CHUNK})\.([1-9][0-9]{{0,6}})\.([a-z]+)")
_SUFFIXES = {"results": ("out",), "logs": ("log",), "events": ("start", "end")}
_JOURNAL_KEY = re.compile(r"jobs/([0-9]{8,})\.json")
_BLOB_KEY = re.compile(r"blobs/[0-9a-f]{64}")

#: How many taken journal keys a new entry skips at most (``add_journal_entry``).
MAX_JOURNAL_PROBES = 10_000

#: The job environment variable through which a worker finds the run (``Store.spec()``).
STORE_ENV = "BATCHPOOL_STORE"


#: HTTP statuses that mean "try again": timeout, too many requests, server errors.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNO = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.EPIPE,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)
#: Network errors of aiohttp, botocore and urllib3, known by name so none must be imported.
_TRANSIENT_NAMES = frozenset(
    {
        "ClientConnectionError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProtocolError",
    }
)


def _http_status(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, int) and 100 <= code < 600:
        return code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error passes by itself, so the operation is worth retrying.

    The exception and its causes are read as gcsfs, s3fs (which wraps botocore's
    ClientError in an OSError), aiohttp and plain sockets report them.
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        status = _http_status(current)
        if status is not None:
            return status in _TRANSIENT_STATUS
        if isinstance(current, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNO:
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


_RETRY_TRANSIENT = retry_if_exception(is_transient)


def default_storage_root() -> str:
    """Where runs go when no ``storage=`` is given: a folder in the user's cache dir."""
    import platformdirs

    return os.path.join(platformdirs.user_cache_dir("batchpool"), "runs")


def open_storage(
    storage: Any, storage_options: dict[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and root folder named by a ``storage=`` argument."""
    options = dict(storage_options or {})
    if storage is None:
        storage = default_storage_root()
    if isinstance(storage, tuple):
        if len(storage) != 2 or not isinstance(storage[0], AbstractFileSystem):
            raise TypeError(
                f"storage={storage!r}: a tuple must be (fsspec filesystem, root folder)"
            )
        fs, root = storage
        return fs, fs._strip_protocol(str(root)).rstrip("/")
    if isinstance(storage, AbstractFileSystem):
        return storage, storage._strip_protocol("batchpool").rstrip("/")
    if isinstance(storage, os.PathLike):
        storage = os.fspath(storage)
    if not isinstance(storage, str):
        raise TypeError(
            f"storage= takes a path, an fsspec URL or an fsspec filesystem; "
            f"got {storage!r} ({type(storage).__name__})"
        )
    if not storage:
        raise ValueError("storage='' names no place; give a folder or an fsspec URL")
    try:
        fs, root = fsspec.core.url_to_fs(storage, **options)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"storage={storage!r} cannot be opened with fsspec: {exc}") from exc
    if isinstance(fs, LocalFileSystem):
        root = os.path.abspath(os.path.expanduser(root))
    return fs, root.rstrip("/")


class Store:
    """One run's folder: where each object lives, and atomic, retried reads and writes.

    ``retry_deadline`` bounds how long one operation keeps retrying transient
    failures (seconds); ``retry_wait`` is the first backoff, doubling up to 5 s.
    """

    def __init__(
        self,
        fs: AbstractFileSystem,
        run_root: str,
        *,
        retry_deadline: float = 120.0,
        retry_wait: float = 0.05,
    ) -> None:
        self.fs = fs
        self.root = run_root.rstrip("/")
        self._renames = isinstance(fs, LocalFileSystem)
        # fsspec's own local filesystem (not a subclass, which may add behaviour: the
        # tests' fault injection does): plain system calls, a fraction of the cost.
        self._plain = type(fs) is LocalFileSystem and not getattr(fs, "auto_mkdir", False)
        self.retry_deadline = retry_deadline
        self.retry_wait = retry_wait
        # Exponential backoff from retry_wait up to 5 s, plus jitter, within the deadline.
        self._wait = wait_exponential(multiplier=retry_wait, max=5.0) + wait_random(0, retry_wait)
        self._stop = stop_after_delay(retry_deadline)

    # -- for workers: a store travels as a small JSON text --------------------------------

    def spec(self) -> str:
        """A text from which a worker builds this same store (see ``from_spec``)."""
        return json.dumps(
            {
                "fs": self.fs.to_json(),
                "root": self.root,
                "retry": [self.retry_deadline, self.retry_wait],
            }
        )

    @classmethod
    def from_spec(cls, spec: str) -> Store:
        data = json.loads(spec)
        deadline, wait = data.get("retry", (120.0, 0.05))
        fs = AbstractFileSystem.from_json(data["fs"])
        return cls(fs, data["root"], retry_deadline=deadline, retry_wait=wait)

    @property
    def url(self) -> str:
        """The run's location as a user would type it: a path for local folders."""
        return self.root if self._renames else self.fs.unstrip_protocol(self.root)

    # -- keys --------------------------------------------------------------------------

    MANIFEST = "manifest.json"

    @staticmethod
    def chunk_key(chunk_id: str) -> str:
        return f"chunks/{chunk_id}.in"

    @staticmethod
    def result_key(chunk_id: str, attempt: int) -> str:
        return f"results/{chunk_id}.{attempt}.out"

    @staticmethod
    def log_key(chunk_id: str, attempt: int) -> str:
        return f"logs/{chunk_id}.{attempt}.log"

    CANCEL = "cancel.json"

    @staticmethod
    def start_key(chunk_id: str, attempt: int) -> str:
        return f"events/{chunk_id}.{attempt}.start"

    @staticmethod
    def end_key(chunk_id: str, attempt: int) -> str:
        return f"events/{chunk_id}.{attempt}.end"

    @staticmethod
    def journal_key(seq: int) -> str:
        return f"jobs/{seq:08d}.json"

    @staticmethod
    def chunk_id(seq: int) -> str:
        """A new chunk's id: its sequence number in the run, then randomness."""
        return f"{seq:08d}-{uuid.uuid4().hex[:12]}"

    @staticmethod
    def parse_key(key: str) -> tuple[str, str, int] | None:
        """``(folder, chunk id, attempt)`` of a chunk's object key (attempt 0 for inputs);
        None for a key that is not one batchpool writes (a stray file)."""
        match = _INPUT_KEY.fullmatch(key)
        if match is not None:
            return "chunks", match.group(1), 0
        match = _ATTEMPT_KEY.fullmatch(key)
        if match is None or match.group(4) not in _SUFFIXES[match.group(1)]:
            return None
        return match.group(1), match.group(2), int(match.group(3))

    @staticmethod
    def journal_seq(key: str) -> int | None:
        """The sequence number of a journal entry's key; None for any other key."""
        match = _JOURNAL_KEY.fullmatch(key)
        return int(match.group(1)) if match else None

    @staticmethod
    def blob_key(digest: str) -> str:
        return f"blobs/{digest}"

    @staticmethod
    def is_blob_key(key: str) -> bool:
        return _BLOB_KEY.fullmatch(key) is not None

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    # -- operations ----------------------------------------------------------------------

    def _retry(self, operation: str, key: str, call: Callable[[], T]) -> T:
        """``call()``, retried while it fails transiently; a clear error otherwise."""
        try:  # the first try without tenacity's machinery: most operations succeed
            return call()
        except (FileNotFoundError, UnsafePathError):
            raise
        except Exception as exc:
            if not is_transient(exc):
                return self._fail(operation, key, exc)
        retrying = Retrying(
            retry=_RETRY_TRANSIENT,
            wait=self._wait,
            stop=self._stop,
            reraise=True,
            before_sleep=lambda state: log.debug(
                "batchpool: %s %s failed (%s); retrying", operation, key, state.outcome
            ),
        )
        try:
            return retrying(call)
        except (FileNotFoundError, UnsafePathError):
            raise
        except Exception as exc:
            return self._fail(operation, key, exc)

    def _fail(self, operation: str, key: str, exc: Exception) -> NoReturn:
        where = self.fs.unstrip_protocol(self.path(key)) if key else self.url
        transient = is_transient(exc)
        again = " (and kept failing until the retry deadline)" if transient else ""
        raise StorageError(
            f"could not {operation} {where}{again}: {type(exc).__name__}: {exc}",
            transient=transient,
        ) from exc

    def create(self) -> None:
        """Make the run's folders where the filesystem has folders."""
        if self._renames:
            for folder in _FOLDERS:
                self._retry("create", folder, functools.partial(self._makedirs, folder))

    def _makedirs(self, folder: str) -> None:
        self.fs.makedirs(self.path(folder), exist_ok=True)

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` so that a reader sees all of it or nothing."""
        try:
            self._retry("write", key, lambda: self._put_once(self.path(key), data))
        except FileNotFoundError as exc:  # a folder of the run is gone
            raise StorageError(
                f"could not write {self.fs.unstrip_protocol(self.path(key))}: its folder is "
                f"missing, so the run at {self.url} was deleted: {exc}"
            ) from exc

    def _why_unsafe(self, path: str, *, itself: bool) -> str | None:
        """On a local disk, why a read (``itself``: of the object too) or a write of
        ``path`` must not happen, if it must not: the run's folder or the object's folder
        is a symbolic link, or the object is not a regular file (a link, a pipe that
        would block the reader forever, a device). Whoever can write the storage folder
        could otherwise lead batchpool outside the run. A write replaces whatever is at
        its own name, never follows it. The check comes before the open: a link swapped
        in between is not caught (opening relative to a held folder descriptor would)."""
        for folder in (self.root, os.path.dirname(path)):
            if os.path.islink(folder):
                return f"{folder} is a symbolic link"
        if itself:
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                return None  # missing: the read says so
            if not stat.S_ISREG(mode):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                return f"{path} is {kind}"
        return None

    def _no_links(self, path: str, *, itself: bool) -> None:
        why = self._why_unsafe(path, itself=itself)
        if why is not None:
            raise UnsafePathError(
                f"{why}: batchpool reads and writes a run's objects only as regular files "
                "inside its folder, never through links"
            )

    def _put_once(self, path: str, data: bytes) -> None:
        if not self._renames:
            self.fs.pipe_file(path, data)  # one PUT: all or nothing
            return
        self._no_links(path, itself=False)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # a new name each try
        try:
            if self._plain:
                _write_new_file(tmp, data)
                os.replace(tmp, path)
                return
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except OSError:
                pass
            raise

    def create_new(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if nothing is there: True if this call wrote it,
        False if something was there already (maybe written a moment ago by another
        process). Exclusive on local disks and NFS (a hard link, which fails if the name
        exists), S3 (``If-None-Match: *``) and GCS (``ifGenerationMatch=0``); on other
        filesystems a check before and a read after the write catch all but a narrow race.
        """
        path = self.path(key)
        if self._renames:
            return self._retry("create", key, lambda: self._link_new(path, data))
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        if set(protocols) & {"s3", "s3a", "gs", "gcs"}:

            def conditional() -> bool:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    return False
                return True

            return self._retry("create", key, conditional)
        if self.exists(key):
            return False
        self.put(key, data)
        return self.get(key) == data

    def _link_new(self, path: str, data: bytes) -> bool:
        self._no_links(path, itself=False)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        if self._plain:
            _write_new_file(tmp, data)
        else:
            self.fs.pipe_file(tmp, data)
        try:
            os.link(tmp, path)  # atomic, and refused when the name exists
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def add_journal_entry(self, entry: documents.JournalEntry, secret: bytes, seq: int) -> int:
        """Write ``entry`` at the first free journal key from ``seq`` on, and return the
        sequence number it took: another session of the run (``resume=True``) may write
        the journal at the same time, and an entry never overwrites another."""
        for taken in range(seq, seq + MAX_JOURNAL_PROBES):
            key = self.journal_key(taken)
            if self.create_new(key, documents.encode(entry, key, secret)):
                return taken
        raise StorageError(
            f"could not add to the journal of {self.url}: jobs/ has no free entry from "
            f"{self.journal_key(seq)} on (in {MAX_JOURNAL_PROBES} tries)"
        )

    def put_document(self, key: str, doc: documents.Document, secret: bytes | None) -> None:
        """Write a JSON document (``documents.py``), signed with the run secret if given."""
        self.put(key, documents.encode(doc, key, secret))

    def get_document(
        self, kind: type[documents.D], key: str, secret: bytes | None = None
    ) -> documents.D:
        """The document at ``key``, checked (``documents.decode``); FileNotFoundError when
        there is none, ``DocumentError`` when it is not what it should be."""
        return documents.decode(kind, key, self.get(key), secret)

    def get(self, key: str) -> bytes:
        """The bytes at ``key``; FileNotFoundError when there are none."""
        path = self.path(key)

        def read() -> bytes:
            if self._renames:
                self._no_links(path, itself=True)
            if self._plain:
                with open(path, "rb") as file:
                    return file.read()
            # fsspec shares one cached filesystem per process: a listing made by anyone
            # (s3fs consults it in cat_file) must not make a new object look missing.
            self.fs.invalidate_cache(path)
            return bytes(self.fs.cat_file(path))

        return self._retry("read", key, read)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The bytes of each of ``keys`` that exists: one batched read, which fsspec
        runs concurrently on object stores."""
        if not keys:
            return {}
        by_path = {self.fs._strip_protocol(self.path(key)): key for key in keys}
        if self._renames:  # objects reached through a link are left out, as missing ones
            by_path = {
                path: key
                for path, key in by_path.items()
                if self._why_unsafe(path, itself=True) is None
            }
            if not by_path:
                return {}

        def read() -> dict[str, bytes]:
            found = self.fs.cat(list(by_path), on_error="omit")
            if not isinstance(found, dict):  # one path: fsspec returns its bytes alone
                found = {next(iter(by_path)): found}
            return {
                by_path[self.fs._strip_protocol(path)]: bytes(data) for path, data in found.items()
            }

        return self._retry("read", keys[0].partition("/")[0], read)

    def exists(self, key: str) -> bool:
        path = self.path(key)

        def check() -> bool:
            if self._plain:
                return os.path.exists(path)
            self.fs.invalidate_cache(path)  # a cached listing must not hide a new object
            return bool(self.fs.exists(path))

        return self._retry("look for", key, check)

    def list(self, folder: str) -> dict[str, int]:
        """``{key: size}`` of the objects in one of the run's folders (one listing)."""
        path = self.path(folder)

        def listing() -> dict[str, int]:
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return {}
            found: dict[str, int] = {}
            for entry in entries:
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                if entry.get("type") == "file" and ".tmp-" not in name:
                    found[f"{folder}/{name}"] = int(entry.get("size") or 0)
            return found

        return self._retry("list", folder, listing)

    def delete(self, key: str) -> None:
        def remove() -> None:
            try:
                self.fs.rm_file(self.path(key))
            except FileNotFoundError:
                pass

        self._retry("delete", key, remove)

    def layout_problem(self) -> str | None:
        """Why this folder does not have a run's layout, or None when it does: a run's
        folder holds ``manifest.json``, maybe ``cancel.json``, and the run's own folders,
        nothing else; on a local disk none of them is a symbolic link."""
        if self._renames and os.path.islink(self.root):
            return f"{self.root} is a symbolic link"

        def listing() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(self.root)
            return list(self.fs.ls(self.root, detail=True))

        foreign = []
        for entry in self._retry("list", "", listing):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            folder = name in _FOLDERS and entry.get("type") == "directory"
            document = name in (self.MANIFEST, self.CANCEL) and entry.get("type") == "file"
            if ".tmp-" in name and name.split(".tmp-", 1)[0] in RUN_ENTRIES:
                document = True  # a write that did not finish
            if self._renames and os.path.islink(self.path(name)):
                foreign.append(f"{name} (a symbolic link)")
            elif not (folder or document):
                foreign.append(name)
        if foreign:
            shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
            return f"it holds what a batchpool run never does: {shown}"
        return None

    def delete_run(self) -> None:
        """Remove the whole run (in batched deletes on object stores), nothing outside it."""

        def delete() -> None:
            self.fs.invalidate_cache(self.root)
            if self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)

        self._retry("delete", "", delete)


def _write_new_file(path: str, data: bytes) -> None:
    """Write ``data`` to a file that must not exist yet (a temporary name)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
