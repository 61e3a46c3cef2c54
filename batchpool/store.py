"""A run's layout in storage, and the few operations the executor and workers need.

This module is the only place that knows where things live::

    <root>/<run-id>/
        manifest.json                  name, created, versions, backend, settings
        blobs/<sha256>                 content-addressed payloads
        chunks/<chunk>.in              a chunk's calls
        results/<chunk>.<attempt>.out  a chunk's outcomes, written once, atomically
        logs/<chunk>.<attempt>.log     the job's captured stdout and stderr
        events/<chunk>.<attempt>.json  started/ended markers

Every write is atomic: on filesystems with rename (local disks, NFS mounts) the
bytes go to a temporary name in the same folder and are renamed into place; on
object stores one PUT is already all-or-nothing.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

_FOLDERS = ("chunks", "results", "logs", "events", "blobs")

#: The job environment variable through which a worker finds the run (``Store.spec()``).
STORE_ENV = "BATCHPOOL_STORE"


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
    """One run's folder: where each object lives, and atomic reads and writes."""

    def __init__(self, fs: AbstractFileSystem, run_root: str) -> None:
        self.fs = fs
        self.root = run_root.rstrip("/")
        self._renames = isinstance(fs, LocalFileSystem)

    # -- for workers: a store travels as a small JSON text --------------------------------

    def spec(self) -> str:
        """A text from which a worker builds this same store (see ``from_spec``)."""
        return json.dumps({"fs": self.fs.to_json(), "root": self.root})

    @classmethod
    def from_spec(cls, spec: str) -> Store:
        data = json.loads(spec)
        return cls(AbstractFileSystem.from_json(data["fs"]), data["root"])

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

    @staticmethod
    def event_key(chunk_id: str, attempt: int) -> str:
        return f"events/{chunk_id}.{attempt}.json"

    @staticmethod
    def blob_key(digest: str) -> str:
        return f"blobs/{digest}"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    # -- operations ----------------------------------------------------------------------

    def create(self) -> None:
        """Make the run's folders where the filesystem has folders."""
        if self._renames:
            for folder in _FOLDERS:
                self.fs.makedirs(self.path(folder), exist_ok=True)

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` so that a reader sees all of it or nothing."""
        path = self.path(key)
        if self._renames:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            except BaseException:
                self.fs.rm_file(tmp) if self.fs.exists(tmp) else None
                raise
        else:
            self.fs.pipe_file(path, data)

    def get(self, key: str) -> bytes:
        """The bytes at ``key``; FileNotFoundError when there are none."""
        return bytes(self.fs.cat_file(self.path(key)))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def delete_run(self) -> None:
        """Remove the whole run, and nothing outside it."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
