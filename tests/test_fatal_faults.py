"""Fatal outcomes are not retried: a storage error that does not pass, or a chunk refused
for its signature, fails the chunk's calls at once, as itself, and no call runs twice.

Every fault here is real: a tmpfs that fills up or is remounted read-only (mounted by the
test, which needs root), a run folder deleted while its job runs, a chunk input forged
in storage by someone without the run secret, a filesystem that denies the workers
every operation. Each call leaves one mark file per run outside the store, so a retry
(``max_attempts=3``, the default) would show as a second mark.

The storage faults are caused by the call itself, which then either returns (its worker
fails to write the outcome, and reports the error as fatal) or kills its own worker
process (the job is lost, and the client finds out from the store that a retry cannot
help). Both must end the call at once.

The calls are module-level functions: the local workers import this module by reference.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn
from uuid import uuid4

import pytest
from faults import FaultyLocal

from batchpool import (
    BatchPoolError,
    BatchPoolExecutor,
    BatchPoolFuture,
    IntegrityError,
    JobSpec,
    LocalBackend,
    StorageError,
    WorkerLostError,
)
from batchpool.backends.base import Notify
from batchpool.serialization import MAGIC
from batchpool.store import STORE_ENV, Store

pytestmark = pytest.mark.timeout(120)

#: A tmpfs this small fills in a moment, and holds a run's few small objects.
TMPFS_SIZE = "2m"
#: How long a call keeps trying a remount the kernel refuses as busy, or a removal of a
#: folder the client writes into meanwhile (seconds).
PATIENCE = 10.0
#: How long a call that filled its filesystem keeps it full (seconds).
SETTLE = 0.3


# -- the calls, run by the workers ----------------------------------------------------------


def _mark(marks: str, i: int) -> None:
    """One new file per run of call ``i``, outside the store."""
    Path(marks, f"{i}.{uuid4().hex}").touch()


def mark_and_return(marks: str, i: int) -> int:
    _mark(marks, i)
    return 10 * i


def _end(then: str, i: int) -> int:
    """Return normally (``then="return"``), or kill this worker process (``"die"``)."""
    if then == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return 10 * i


def fill_filesystem(filler: str, marks: str, i: int, then: str) -> int:
    """Write ``filler`` until its filesystem has no space left."""
    _mark(marks, i)
    block = b"\0" * (1 << 16)
    full_until: float | None = None
    with open(filler, "ab", buffering=0) as f:
        while full_until is None or time.monotonic() < full_until:
            try:
                f.write(block)  # a short write when almost full, then ENOSPC
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # Full. Keep it full a moment: a write the client began (a journal
                # entry) may fail meanwhile and free its space.
                if full_until is None:
                    full_until = time.monotonic() + SETTLE
                time.sleep(0.01)
    return _end(then, i)


def remount_read_only(mountpoint: str, marks: str, i: int, then: str) -> int:
    """Make the filesystem at ``mountpoint`` read-only."""
    _mark(marks, i)
    deadline = time.monotonic() + PATIENCE
    while True:
        # Refused (busy) while someone has a file there open for writing, e.g. the
        # client writing a journal entry at this very moment: try again shortly.
        done = subprocess.run(
            ["mount", "-o", "remount,ro", mountpoint], capture_output=True, text=True
        )
        if done.returncode == 0:
            return _end(then, i)
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not remount {mountpoint} read-only: {done.stderr}")
        time.sleep(0.05)


def delete_run(run_url: str, marks: str, i: int, then: str) -> int:
    """Delete the run's whole folder from storage while its job runs."""
    _mark(marks, i)
    deadline = time.monotonic() + PATIENCE
    while os.path.exists(run_url):
        try:
            shutil.rmtree(run_url)
        except OSError:  # the client wrote a file into a folder as it was being removed
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    return _end(then, i)


# -- helpers ---------------------------------------------------------------------------------


def _runs(marks: Path, i: int) -> int:
    """How many times call ``i`` ran."""
    return len(list(marks.glob(f"{i}.*")))


def _failure(future: BatchPoolFuture, expected: type[BatchPoolError]) -> BatchPoolError:
    """The error ``future`` failed with, checked to be ``expected`` itself: not the
    ``WorkerLostError`` of a chunk retried ``max_attempts`` times."""
    with pytest.raises(BatchPoolError) as info:
        future.result(timeout=60)
    error = info.value
    assert not isinstance(error, WorkerLostError), f"the chunk was retried until lost: {error}"
    assert type(error) is expected, f"{type(error).__name__}: {error}"
    return error


def _ran_one_attempt(future: BatchPoolFuture) -> None:
    job = future.job
    assert job is not None
    assert job.attempt == 1, f"the job was run {job.attempt} times: {job.exit}"


def _unavailable(reason: str) -> NoReturn:
    """Skip a test this machine cannot run; in CI (``CI`` set), fail it instead, so that a
    runner that lost the rights to mount does not pass by running nothing."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: this test must run here)")
    pytest.skip(reason)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of ``TMPFS_SIZE``, mounted for the test; unmounted after it (made
    writable again first, should the test have made it read-only)."""
    if os.geteuid() != 0:
        _unavailable("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        _unavailable("mount and umount are not installed")
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    mounted = _run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mountpoint)])
    if mounted.returncode != 0:
        why = (mounted.stderr.strip().splitlines() or [f"status {mounted.returncode}"])[0]
        _unavailable(f"cannot mount a tmpfs here: {why}")
    try:
        yield mountpoint
    finally:
        _run(["mount", "-o", "remount,rw", str(mountpoint)])
        if _run(["umount", str(mountpoint)]).returncode != 0:
            _run(["umount", "-l", str(mountpoint)])  # busy: detach it now, free it later


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    """Where the calls leave their marks: outside every store."""
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder


# -- storage that will not take the outcome --------------------------------------------------


#: How a call that broke the storage ends: it returns (its worker cannot write the outcome,
#: and says the error is fatal), or it kills its worker (the client probes the store).
THEN = pytest.mark.parametrize("then", ["return", "die"])


@THEN
def test_a_full_filesystem_fails_the_call_at_once(tmpfs: Path, marks: Path, then: str) -> None:
    filler = tmpfs / "filler"  # beside the run, on the same filesystem
    filler.mkdir()
    with BatchPoolExecutor(max_workers=1, storage=str(tmpfs / "store"), max_attempts=3) as ex:
        run_url = ex.run_url
        future = ex.submit(fill_filesystem, str(filler / "big"), str(marks), 1, then)
        error = _failure(future, StorageError)
        assert os.statvfs(tmpfs).f_bavail == 0  # the call did fill it
    assert "No space left on device" in str(error)
    assert run_url in str(error)  # it names what could not be written
    assert _runs(marks, 1) == 1
    _ran_one_attempt(future)


@THEN
def test_a_read_only_filesystem_fails_the_call_at_once(tmpfs: Path, marks: Path, then: str) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmpfs / "store"), max_attempts=3) as ex:
        run_url = ex.run_url
        future = ex.submit(remount_read_only, str(tmpfs), str(marks), 1, then)
        error = _failure(future, StorageError)
    assert "Read-only file system" in str(error)
    assert run_url in str(error)
    assert _runs(marks, 1) == 1
    _ran_one_attempt(future)


@THEN
def test_a_run_deleted_while_its_job_runs_fails_the_call_at_once(
    tmp_path: Path, marks: Path, then: str
) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path / "store"), max_attempts=3) as ex:
        run_url = ex.run_url
        future = ex.submit(delete_run, run_url, str(marks), 1, then)
        error = _failure(future, StorageError)
    assert f"the run at {run_url} was deleted" in str(error)
    # The worker found a folder missing as it wrote the outcome; or the client found
    # the chunk's input gone when the job was lost.
    why = "its folder is missing" if then == "return" else "is gone from storage"
    assert why in str(error)
    assert not os.path.exists(run_url)  # and the executor did not make it again
    assert _runs(marks, 1) == 1
    _ran_one_attempt(future)


def test_workers_denied_every_storage_operation_never_run_the_call(
    tmp_path: Path, marks: Path
) -> None:
    # Every storage operation of the workers fails with PermissionError; the client's
    # (this process) succeed.
    fs = FaultyLocal(rate=1.0, kind="permanent", spare=os.getpid())
    with BatchPoolExecutor(
        max_workers=1, storage=(fs, str(tmp_path / "store")), max_attempts=3
    ) as ex:
        future = ex.submit(mark_and_return, str(marks), 1)
        error = _failure(future, StorageError)
    assert "Permission denied" in str(error)
    assert "could not read" in str(error) and "chunks/" in str(error)
    assert _runs(marks, 1) == 0  # its input was never read, so the call never ran
    _ran_one_attempt(future)


# -- a chunk forged in storage ---------------------------------------------------------------


class MakesFolder:
    """A pickle that makes a folder when it is loaded: what a forged chunk could run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (self.path,))


class ForgingBackend(LocalBackend):
    """Real local workers, and an attacker who can write to the storage but has not the
    run secret: each chunk input is overwritten, after the executor wrote it and before
    its job starts, with an unsigned pickle that makes ``unpickled`` when loaded."""

    def __init__(self, unpickled: str) -> None:
        super().__init__(1, echo_output=False)
        self.unpickled = unpickled
        self.forged: list[str] = []  # one key per job handed over

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        for spec in jobs:
            store = Store.from_spec(spec.env[STORE_ENV])
            key = store.chunk_key(spec.args[spec.args.index("--chunk") + 1])
            store.put(key, MAGIC + bytes(32) + pickle.dumps(MakesFolder(self.unpickled)))
            self.forged.append(key)
        return super().submit(jobs, notify)


def test_a_forged_chunk_is_refused_at_once_and_never_unpickled(tmp_path: Path, marks: Path) -> None:
    unpickled = tmp_path / "unpickled"
    backend = ForgingBackend(str(unpickled))
    try:
        with BatchPoolExecutor(
            storage=str(tmp_path / "store"), backend=backend, max_attempts=3
        ) as ex:
            future = ex.submit(mark_and_return, str(marks), 1)
            error = _failure(future, IntegrityError)
    finally:
        backend.close()
    assert "signature" in str(error)
    assert len(backend.forged) == 1, f"the chunk was handed over again: {backend.forged}"
    assert backend.forged[0] in str(error)  # names the object refused
    assert not unpickled.exists()  # the forged pickle was never loaded
    assert _runs(marks, 1) == 0  # and the call never ran
    _ran_one_attempt(future)


def exit_78_first(marks: str, i: int) -> int:
    """Ends its worker with the status a one-job worker uses for fatal errors, once."""
    _mark(marks, i)
    if len(list(Path(marks).iterdir())) == 1:
        os._exit(78)
    return 10 * i


def test_a_pool_worker_that_exits_78_is_a_dead_worker_and_retried(tmp_path: Path) -> None:
    """Only the worker's own report makes a job fatal: a call that ends its pool worker
    with status 78 is a lost job like any other, and runs again."""
    marks = tmp_path / "marks"
    marks.mkdir()
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path / "runs")) as bpe:
        future = bpe.submit(exit_78_first, str(marks), 3)
        assert future.result(timeout=60) == 30
        assert future.job is not None and future.job.attempt == 2
