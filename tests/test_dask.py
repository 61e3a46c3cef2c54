"""The Dask backend against a real ``distributed.LocalCluster`` with process workers."""

from __future__ import annotations

import glob
import os
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from calls import Oddity, odd_fails, square
from direct_jobs import direct_spec, wait_for_events

from batchpool import BatchPoolExecutor, WorkerLostError
from batchpool.backends.base import JobEvent, JobState, available_backends

pytestmark = pytest.mark.dask

try:
    import distributed
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        raise RuntimeError(
            "CI is set but distributed is not installed: pip install -e '.[test]'"
        ) from None
    pytest.skip(
        "distributed is not installed (pip install 'batchpool[dask]')", allow_module_level=True
    )

from batchpool.backends.dask import DaskBackend  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    # Default scheduler settings (allowed-failures 3): the backend must not let
    # Dask's re-runs of a task count as extra runs of the calls.
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=":0",
        processes=True,
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture
def ex(client: Any, tmp_path: Path) -> Iterator[BatchPoolExecutor]:
    with BatchPoolExecutor(
        backend=DaskBackend(client), storage=str(tmp_path / "store"), max_attempts=2
    ) as ex:
        yield ex


def die(x: int, runs: str) -> int:
    with open(runs, "a") as f:
        f.write(f"{os.getpid()}\n")
    print("last words before SIGKILL", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def loud(x: int) -> int:
    print(f"hello from dask {x}", flush=True)
    return x


def test_registered_by_name() -> None:
    assert "dask" in available_backends()


def test_map_keeps_order(ex: BatchPoolExecutor) -> None:
    assert list(ex.map(square, range(200), chunksize=10)) == [x * x for x in range(200)]


def test_exceptions_keep_their_type(ex: BatchPoolExecutor) -> None:
    futures = [ex.submit(odd_fails, x) for x in range(4)]
    assert futures[0].result(timeout=60) == 0
    with pytest.raises(Oddity, match="1 is odd"):
        futures[1].result(timeout=60)
    assert futures[2].result(timeout=60) == 2


def test_print_output_is_in_the_runs_logs(client: Any, tmp_path: Path) -> None:
    storage = tmp_path / "store"
    with BatchPoolExecutor(
        backend=DaskBackend(client), storage=str(storage), cleanup_bucket=False
    ) as ex:
        assert ex.submit(loud, 7).result(timeout=60) == 7
    logs = glob.glob(str(storage / "*" / "logs" / "*.log"))
    assert logs, "no log was written"
    assert any("hello from dask 7" in Path(p).read_text() for p in logs)


def test_code_the_workers_cannot_import_is_shipped(
    ex: BatchPoolExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "dask_only_here.py").write_text(
        textwrap.dedent(
            """
            def shout(word):
                return word.upper() + "!"
            """
        )
    )
    monkeypatch.syspath_prepend(str(folder))
    import dask_only_here  # type: ignore[import-not-found]

    try:
        assert ex.submit(dask_only_here.shout, "hi").result(timeout=60) == "HI!"
    finally:
        sys.modules.pop("dask_only_here", None)


def test_killed_worker_is_retried_then_lost_and_the_cluster_recovers(
    ex: BatchPoolExecutor, client: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    future = ex.submit(die, 1, str(runs))
    with pytest.raises(WorkerLostError) as info:
        future.result(timeout=60)  # a hang guard: the loss is noticed, not waited out
    text = str(info.value)
    assert "2 attempts" in text, text
    assert "Dask worker" in text, text
    # Once per batchpool attempt: Dask's re-runs of the task did not run the call again.
    assert len(runs.read_text().split()) == 2
    client.wait_for_workers(2, timeout=60)
    assert list(ex.map(square, range(20), chunksize=5)) == [x * x for x in range(20)]


def test_a_client_passed_in_is_not_closed(client: Any, tmp_path: Path) -> None:
    with BatchPoolExecutor(backend=DaskBackend(client), storage=str(tmp_path / "s")) as ex:
        assert ex.submit(square, 3).result(timeout=60) == 9
    assert client.status == "running"
    assert client.submit(square, 4, pure=False).result(timeout=30) == 16


def test_backend_without_arguments_closes_its_own_cluster(tmp_path: Path) -> None:
    backend = DaskBackend()
    cluster, own_client = backend._cluster, backend.client
    assert backend.max_parallel() == 2
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "s")) as ex:
        assert list(ex.map(square, range(6), chunksize=2)) == [0, 1, 4, 9, 16, 25]
    backend.close()
    assert own_client.status == "closed"
    assert cluster.status.name == "closed"


def test_backend_by_name_is_owned_and_closed_by_the_executor(tmp_path: Path) -> None:
    with BatchPoolExecutor(backend="dask", storage=str(tmp_path / "s")) as ex:
        backend = ex._backend
        assert isinstance(backend, DaskBackend)
        assert ex.submit(square, 5).result(timeout=60) == 25
    assert backend.client.status == "closed"
    assert backend._cluster.status.name == "closed"


def test_a_failing_task_is_reported_failed_with_its_exception(client: Any, tmp_path: Path) -> None:
    backend = DaskBackend(client)
    events: list[JobEvent] = []
    [job_id] = backend.submit([direct_spec(tmp_path, "missing")], events.append)
    wait_for_events(events, 1, timeout=30)
    assert events[0].job_id == job_id
    assert events[0].state is JobState.FAILED
    # Its input is missing: a retry could not help, and the event says so.
    assert events[0].fatal
    assert backend.status([job_id]) == {job_id: JobState.FAILED}
    assert "StorageError" in backend.explain(job_id) and "is missing" in backend.explain(job_id)
    backend.close()
    assert client.status == "running"


def test_cancel_of_a_task_that_cannot_start(client: Any, tmp_path: Path) -> None:
    backend = DaskBackend(client, resources={"NO-SUCH-RESOURCE": 1})
    events: list[JobEvent] = []
    [job_id] = backend.submit([direct_spec(tmp_path, "never")], events.append)
    assert backend.status([job_id]) == {job_id: JobState.PENDING}
    backend.cancel([job_id])
    wait_for_events(events, 1, timeout=30)
    assert [e.state for e in events] == [JobState.CANCELLED]
    assert backend.status([job_id]) == {job_id: JobState.CANCELLED}
    backend.close()
