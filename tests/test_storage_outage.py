"""The store rides out an outage of S3 itself: moto's server stops listening in the
middle of a map for longer than the store's longest backoff (5 s), then listens again
on the same port with every bucket and object it had.

The server is ``MotoServer(restartable=True)`` (``tests/services/s3.py``): moto's
application in a process of ours whose HTTP listener closes (every open connection
too) and opens again, while moto's state, in that process's memory, lives on. The
calls run on the local backend; each appends a line to its own mark file on the local
disk, so the test counts how often each call ran. No wall-clock time is asserted: the
outage lasts OUTAGE_SECONDS because that is what is being survived.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from outages import count, map_in_thread, mark_and_sleep, wait_until
from services import ServiceError, ServiceMissing
from services.s3 import MotoServer, make_s3fs
from stores import BUCKET, in_ci

from batchpool import BatchPoolExecutor

pytestmark = pytest.mark.s3

#: Longer than the store's backoff ever gets (5 s): several retries of one operation
#: fail in a row, and the retry deadline (120 s) is not reached.
OUTAGE_SECONDS = 15.0
CALLS = 8
#: Calls submitted while S3 is away: the client's writes of their input wait too.
EXTRA = (100, 101)
CALL_SECONDS = 1.5
WAIT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def restartable_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto server of this module's own (the session's is shared by other tests)."""
    server = MotoServer(tmp_path_factory.mktemp("moto-restartable"), restartable=True)
    reason = server.missing()
    if reason:
        if in_ci():
            pytest.fail(f"CI is set, and {server.name} cannot start: {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        server.start()
        server.create_bucket(BUCKET)
    except (ServiceError, ServiceMissing, OSError) as exc:
        server.stop()
        pytest.fail(f"{server.name} could not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_s3_stops_listening_mid_map_and_comes_back(
    restartable_s3: MotoServer, tmp_path: Path
) -> None:
    server = restartable_s3
    folder = tmp_path / "marks"
    folder.mkdir()
    prefix = f"outage-{uuid.uuid4().hex[:10]}"
    with BatchPoolExecutor(
        max_workers=2,
        storage=f"s3://{BUCKET}/{prefix}",
        storage_options=server.storage_options(),
        cleanup_bucket=False,
    ) as ex:
        thread, out = map_in_thread(ex, folder, CALLS, CALL_SECONDS)
        # Two calls run (one per worker): their outcomes will be written into the outage.
        wait_until("two calls run", lambda: len(count(folder, "start")) >= 2)
        ended_before = {x for x, n in count(folder, "end").items() if n}
        server.stop_listening()

        def submit_more() -> None:  # the client's own writes meet the outage too
            try:
                futures = [ex.submit(mark_and_sleep, x, str(folder), 0.1) for x in EXTRA]
                out["extra"] = [f.result(timeout=240) for f in futures]
            except BaseException as exc:
                out["extra error"] = exc

        more = threading.Thread(target=submit_more, name="submit", daemon=True)
        more.start()
        try:
            time.sleep(OUTAGE_SECONDS)
            # The calls that returned while S3 was away: their outcomes wait in retries.
            ended_during = {x for x, n in count(folder, "end").items() if n} - ended_before
        finally:
            server.start_listening()  # the same port, the same buckets and objects
        thread.join(240)
        more.join(240)
        assert not (thread.is_alive() or more.is_alive()), "the calls still wait"
        assert "error" not in out, repr(out.get("error"))
        assert "extra error" not in out, repr(out.get("extra error"))
    assert out["results"] == [x * 10 for x in range(CALLS)]
    assert out["extra"] == [x * 10 for x in EXTRA]
    assert ended_during, "no call returned during the outage: the test proved nothing"
    # Nothing ran twice, nothing was lost: one run per call, every outcome of attempt 1.
    everyone = [*range(CALLS), *EXTRA]
    assert count(folder, "start") == dict.fromkeys(everyone, 1)
    assert count(folder, "end") == dict.fromkeys(everyone, 1)
    fs = make_s3fs(server.endpoint)
    outcomes = fs.find(f"{BUCKET}/{prefix}")
    results = [key for key in outcomes if "/results/" in key]
    assert len(results) == len(everyone), results
    assert all(key.endswith(".1.out") for key in results), results
    assert server.outages == 1
