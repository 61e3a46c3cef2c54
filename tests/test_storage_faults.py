"""The store survives transient faults, fails fast on permanent ones, and costs a bounded
number of operations per chunk. Faults are injected in front of a real filesystem."""

from __future__ import annotations

import collections
import errno
from pathlib import Path

import pytest
from faults import FaultyLocal, read_log

from batchpool import BatchPoolExecutor
from batchpool.store import StorageError, Store, is_transient


def triple(x: int) -> int:
    return 3 * x


def test_transient_errors_are_told_from_permanent_ones() -> None:
    from botocore.exceptions import ClientError
    from gcsfs.retry import HttpError
    from s3fs.errors import translate_boto_error

    def s3(code: str, status: int) -> BaseException:
        meta = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {}}
        meta["ResponseMetadata"]["HTTPStatusCode"] = status
        return translate_boto_error(ClientError(meta, "GetObject"))

    transient = [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
        OSError(errno.ETIMEDOUT, "timed out"),
        HttpError({"code": 503, "message": "Backend Error"}),
        HttpError({"code": 429, "message": "Too Many Requests"}),
        s3("SlowDown", 503),
        s3("InternalError", 500),
    ]
    permanent = [
        PermissionError(errno.EACCES, "denied"),
        FileNotFoundError("missing"),
        HttpError({"code": 403, "message": "Forbidden"}),
        HttpError({"code": 404, "message": "No such bucket"}),
        s3("AccessDenied", 403),
        s3("NoSuchBucket", 404),
        ValueError("bad bucket name"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_1000_calls_with_10_percent_of_store_operations_failing(tmp_path: Path) -> None:
    log = str(tmp_path / "ops.log")
    fs = FaultyLocal(rate=0.1, log=log)  # the workers rebuild it, faults and all
    with BatchPoolExecutor(max_workers=2, storage=(fs, str(tmp_path / "runs"))) as ex:
        # 50 chunks: about 250 store operations, about 25 of them failing.
        assert list(ex.map(triple, range(1000), chunksize=20)) == [3 * i for i in range(1000)]
        assert [ex.submit(triple, i).result() for i in range(20)] == [3 * i for i in range(20)]
    faults = [line for line in read_log(log) if line.startswith("FAULT")]
    assert len(faults) >= 5, "too few faults were injected for the test to mean anything"


def test_a_permanent_error_fails_fast_naming_the_url_and_operation(tmp_path: Path) -> None:
    fs = FaultyLocal(rate=1.0, kind="permanent")
    with pytest.raises(StorageError, match=r"could not create .*manifest\.json: PermissionError"):
        BatchPoolExecutor(storage=(fs, str(tmp_path / "runs")))


def test_a_store_that_keeps_failing_gives_up_at_its_deadline(tmp_path: Path) -> None:
    store = Store(FaultyLocal(rate=1.0), str(tmp_path / "run"), retry_deadline=0.3)
    with pytest.raises(StorageError, match="kept failing until the retry deadline"):
        store.put("manifest.json", b"{}")


def test_workers_that_cannot_read_their_chunk_fail_the_calls_clearly(tmp_path: Path) -> None:
    import os

    fs = FaultyLocal(rate=1.0, kind="permanent", spare=os.getpid())  # only workers fail
    with BatchPoolExecutor(max_workers=1, storage=(fs, str(tmp_path)), max_attempts=2) as ex:
        future = ex.submit(triple, 1)
        with pytest.raises(StorageError, match=r"could not read .*PermissionError"):
            future.result(timeout=60)
    # A permission that is denied stays denied: the job is not run again.
    assert future.job is not None and future.job.attempt == 1


def test_operation_counts_per_chunk(tmp_path: Path) -> None:
    """A map of 1,000 calls in 50 chunks: per chunk one input write and read, one outcome
    write and read, two small markers, no log for silent calls, no listing; the run
    deleted at the end."""
    log = str(tmp_path / "ops.log")
    fs = FaultyLocal(log=log)
    with BatchPoolExecutor(max_workers=2, storage=(fs, str(tmp_path / "runs"))) as ex:
        assert list(ex.map(triple, range(1000), chunksize=20)) == [3 * i for i in range(1000)]
    ops = collections.Counter()
    for line in read_log(log):
        kind, path = line.split(" ", 1)
        folder = path.rsplit("/", 2)[-2] if "/" in path else ""
        ops[kind, folder if kind in ("put", "get", "move") else ""] += 1
    # On a filesystem with rename, a write is a put of a temporary name and one move.
    assert ops["put", "chunks"] == ops["move", "chunks"] == 50
    assert ops["get", "chunks"] == 50
    assert ops["put", "results"] == ops["move", "results"] == 50
    assert ops["get", "results"] == 50
    assert ops["put", "logs"] == 0
    # A start and an end marker per job, and one journal entry per hand-over to the
    # backend (a batch of jobs); nothing the client polls.
    assert ops["put", "events"] == 100
    assert 1 <= ops["put", "jobs"] <= 50
    assert ops["get", "events"] == ops["get", "jobs"] == 0
    assert ops["list", ""] == 0
    assert ops["delete", ""] == 1  # cleanup_bucket: one recursive delete of the run


# -- the same on the emulators, through gcsfs and s3fs ----------------------------------------


def faulty_remote(
    which: str, service: object, log: str, rate: float = 0.0, kind: str = "transient"
) -> object:
    from faults import FaultyGCS, FaultyS3

    cls = FaultyGCS if which == "gcs" else FaultyS3
    return cls(rate=rate, kind=kind, log=log, **service.storage_options())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "which", [pytest.param("gcs", marks=pytest.mark.gcs), pytest.param("s3", marks=pytest.mark.s3)]
)
def test_remote_stores_survive_transient_faults_and_count_their_operations(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import uuid

    service = request.getfixturevalue(f"{which}_service")
    root = f"batchpool-test/faults-{uuid.uuid4().hex[:8]}"

    # 10% of operations fail with the library's own transient errors: every result is right.
    log = str(tmp_path / "faults.log")
    fs = faulty_remote(which, service, log, rate=0.1)
    with BatchPoolExecutor(max_workers=2, storage=(fs, root)) as ex:  # ~200 operations
        assert list(ex.map(triple, range(1000), chunksize=20)) == [3 * i for i in range(1000)]
    assert sum(line.startswith("FAULT") for line in read_log(log)) >= 5

    # Without faults: per chunk exactly one PUT and one GET of input and outcome, no listing.
    log = str(tmp_path / "ops.log")
    fs = faulty_remote(which, service, log)
    with BatchPoolExecutor(max_workers=2, storage=(fs, root + "-count")) as ex:
        assert list(ex.map(triple, range(1000), chunksize=20)) == [3 * i for i in range(1000)]
    ops = collections.Counter()
    for line in read_log(log):
        kind, path = line.split(" ", 1)
        folder = path.rsplit("/", 2)[-2] if kind in ("put", "get") else ""
        ops[kind, folder] += 1
    assert ops["put", "chunks"] == ops["get", "chunks"] == 50
    assert ops["put", "results"] == ops["get", "results"] == 50
    assert ops["move", ""] == 0  # one PUT is atomic on an object store: no rename
    assert ops["list", ""] == 0
    assert ops["put", "logs"] == 0

    # A permanent error (403 / AccessDenied) fails fast, naming the URL and the operation.
    fs = faulty_remote(which, service, str(tmp_path / "denied.log"), rate=1.0, kind="permanent")
    with pytest.raises(StorageError, match=r"could not create .*manifest\.json"):
        BatchPoolExecutor(storage=(fs, root + "-denied"))
