"""RayBackend against a real Ray: a ``ray start --head`` cluster on 127.0.0.1, and local Rays.

This process connects to the head once (``ray.init(address=...)``, as a user would)
and every backend of it shares that connection; the backends that start or connect
Ray themselves (``address=None``, an address with no Ray initialised) run in
subprocesses, since a process holds one Ray connection at a time.

With ``CI`` set, a Ray that is missing or cannot start fails the tests loudly;
elsewhere they skip with the reason.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from calls import Oddity, odd_fails, square
from direct_jobs import direct_spec, wait_for_events
from services.ray_head import ENV as RAY_ENV

from batchpool import BatchPoolExecutor, WorkerLostError
from batchpool.backends.base import (
    JobEvent,
    JobState,
    Resources,
    available_backends,
    backend_class,
)

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but Ray cannot be used: {why}", pytrace=False)
    pytest.skip(why)


# Read by Ray as it is imported, in this process and in every driver started from it.
os.environ.update(RAY_ENV)

try:
    import ray
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        raise RuntimeError("CI is set but ray is not installed: pip install -e '.[test]'") from None
    pytest.skip("ray is not installed (pip install 'batchpool[ray]')", allow_module_level=True)

from services import ServiceError  # noqa: E402
from services.ray_head import RayHead  # noqa: E402
from test_cli import cli, cli_json, wait_until_running  # noqa: E402

from batchpool.backends.ray import RayBackend  # noqa: E402


@pytest.fixture(scope="session")
def ray_head() -> Iterator[str]:
    """A ``ray start --head`` cluster of 2 CPUs on 127.0.0.1 (its address), stopped at the end."""
    head = RayHead()
    try:
        address = head.start()
    except ServiceError as exc:
        head.stop()
        _unavailable(str(exc))
    try:
        yield address
    finally:
        head.stop()


@pytest.fixture(scope="module")
def connected(ray_head: str) -> Iterator[str]:
    """This process's own connection to the head, as a user makes it before the backend."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head, log_to_driver=False)
    try:
        yield ray_head
    finally:
        ray.shutdown()


@pytest.fixture
def ex(connected: str, tmp_path: Path) -> Iterator[BatchPoolExecutor]:
    with BatchPoolExecutor(
        backend=RayBackend(connected), storage=str(tmp_path / "store"), max_attempts=2
    ) as ex:
        yield ex


def die_first_time(x: int, runs: str) -> int:
    """SIGKILL its own Ray worker on its first run (its mark file empty); else ``x``."""
    with open(runs, "a+") as f:
        f.seek(0)
        first = not f.read()
        f.write(f"{os.getpid()}\n")
    if first:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def die_always(x: int, runs: str) -> int:
    with open(runs, "a") as f:
        f.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def test_registered_by_name() -> None:
    assert "ray" in available_backends()
    assert backend_class("ray") is RayBackend
    RayBackend.check_job_id("c2668a65bda616c1ffffffffffffffffffffffff01000000")
    for bad in ("", "-rf", "batchpool-x", "c2668a65 bda616c1"):
        with pytest.raises(ValueError):
            RayBackend.check_job_id(bad)


def test_map_keeps_order(ex: BatchPoolExecutor) -> None:
    assert list(ex.map(square, range(200), chunksize=10)) == [x * x for x in range(200)]


def test_exceptions_keep_their_type(ex: BatchPoolExecutor) -> None:
    futures = [ex.submit(odd_fails, x) for x in range(4)]
    assert futures[0].result(timeout=60) == 0
    with pytest.raises(Oddity, match="1 is odd"):
        futures[1].result(timeout=60)
    assert futures[2].result(timeout=60) == 2


def test_env_reaches_the_job(ex: BatchPoolExecutor) -> None:
    value = 'a $b \'c\' "d" {"json": [1]}'
    job = ex.options(env={"BP_RAY_VALUE": value}, cpus=2)
    assert job.submit(getenv, "BP_RAY_VALUE").result(timeout=60) == value
    assert job.submit(getenv, "OMP_NUM_THREADS").result(timeout=60) == "2"
    assert ex.submit(getenv, "BP_RAY_VALUE").result(timeout=60) is None  # not another env's


def test_a_killed_worker_is_retried_as_a_new_attempt(connected: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    storage = tmp_path / "store"
    with BatchPoolExecutor(
        backend=RayBackend(connected), storage=str(storage), max_attempts=2, cleanup_bucket=False
    ) as ex:
        assert ex.submit(die_first_time, 7, str(runs)).result(timeout=120) == 7
    assert len(runs.read_text().split()) == 2  # once per batchpool attempt, no Ray re-run
    outcomes = [Path(p).name for p in glob.glob(str(storage / "*" / "results" / "*.out"))]
    assert len(outcomes) == 1 and outcomes[0].endswith(".2.out"), outcomes


def test_a_killed_worker_with_one_attempt_fails_in_rays_words(
    connected: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    with (
        BatchPoolExecutor(
            backend=RayBackend(connected), storage=str(tmp_path / "store"), max_attempts=1
        ) as ex,
        pytest.raises(WorkerLostError) as info,
    ):
        ex.submit(die_always, 1, str(runs)).result(timeout=120)
    text = str(info.value)
    assert "1 attempt" in text, text
    assert "WorkerCrashedError" in text and "The worker died unexpectedly" in text, text
    assert len(runs.read_text().split()) == 1


def test_a_failing_task_is_failed_with_its_exception(connected: str, tmp_path: Path) -> None:
    backend = RayBackend(connected)
    events: list[JobEvent] = []
    [job_id] = backend.submit([direct_spec(tmp_path, "missing")], events.append)
    wait_for_events(events, 1, timeout=60)
    assert (events[0].job_id, events[0].state) == (job_id, JobState.FAILED)
    assert events[0].fatal  # its input is missing: a retry could not help
    assert backend.status([job_id]) == {job_id: JobState.FAILED}
    assert "StorageError" in backend.explain(job_id) and "is missing" in backend.explain(job_id)
    backend.close()
    assert ray.is_initialized()  # the connection this process made is not closed


def test_cancel_of_a_queued_job(connected: str, tmp_path: Path) -> None:
    backend = RayBackend(connected)
    events: list[JobEvent] = []
    spec = direct_spec(tmp_path, "never", Resources(cpus=64))  # more than the cluster has
    [job_id] = backend.submit([spec], events.append)
    assert backend.status([job_id]) == {job_id: JobState.PENDING}
    backend.cancel([job_id])
    wait_for_events(events, 1, timeout=60)
    assert [e.state for e in events] == [JobState.CANCELLED]
    assert backend.status([job_id]) == {job_id: JobState.CANCELLED}
    backend.close()


def test_the_users_connection_is_kept(connected: str, tmp_path: Path) -> None:
    backend = RayBackend(connected)
    assert backend.describe() == {"name": "ray", "options": {"address": connected}}
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "s")) as ex:
        assert ex.submit(square, 3).result(timeout=60) == 9
    backend.close()
    assert ray.is_initialized()
    assert ray.get(ray.remote(lambda x: x * x).remote(4), timeout=60) == 16  # by value


OWN_CONNECTIONS = """
import sys, ray
from batchpool import BatchPoolExecutor
from batchpool.backends.ray import RayBackend

def square(x):
    return x * x

address, storage = sys.argv[1], sys.argv[2]
# An address and no Ray in this process: the backend connects, and disconnects at close.
backend = RayBackend(address)
assert ray.is_initialized()
with BatchPoolExecutor(backend=backend, storage=storage + "/a") as ex:
    assert list(ex.map(square, range(6), chunksize=2)) == [0, 1, 4, 9, 16, 25]
backend.close()
print("address: initialised after close:", ray.is_initialized())
ray.init(address=address, log_to_driver=False)  # the cluster runs on
print("address: the head answers:", ray.get(ray.remote(square).remote(5), timeout=60))
ray.shutdown()
# By name, no address: a local Ray of this machine's CPUs, owned and shut down by the executor.
with BatchPoolExecutor(backend="ray", storage=storage + "/b") as ex:
    assert ray.is_initialized() and ex._backend.describe() == {"name": "ray", "options": {}}
    print("local: max_parallel", ex._backend.max_parallel())
    print("local: gcs", ray.get_runtime_context().gcs_address != address)
    assert list(ex.map(square, range(6), chunksize=2)) == [0, 1, 4, 9, 16, 25]
print("local: initialised after close:", ray.is_initialized())
"""


def test_connections_the_backend_makes_are_closed_and_the_cluster_runs_on(
    connected: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", OWN_CONNECTIONS, connected, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "address: initialised after close: False" in lines, result.stdout
    assert "address: the head answers: 25" in lines, result.stdout
    assert f"local: max_parallel {os.cpu_count()}" in lines, result.stdout
    assert "local: gcs True" in lines, result.stdout
    assert "local: initialised after close: False" in lines, result.stdout


def test_status_and_cancel_from_another_process(connected: str, tmp_path: Path) -> None:
    bpe = BatchPoolExecutor(
        backend=RayBackend(connected), storage=str(tmp_path), cleanup_bucket=False
    )
    try:
        future = bpe.submit(time.sleep, 120)
        job = wait_until_running(bpe.run_url, deadline=120)
        code, document = cli_json("status", bpe.run_url)
        assert (code, document["backend"]) == (0, "ray"), document
        assert [(j["state"], j["job_id"]) for j in document["jobs"]] == [("Running", job.job_id)]
        result = cli("cancel", bpe.run_url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "a live client stops" in result.stdout, result.stdout
        cf.wait([future], timeout=120)  # a hang guard: the client cancels the task at once
        assert future.done(), "batchpool cancel did not end the call"
        error = future.exception()
        assert isinstance(error, (cf.CancelledError, WorkerLostError)), repr(error)
    finally:
        bpe.shutdown(wait=False, cancel_futures=True)


def test_the_example_runs_unchanged_on_ray(connected: str, tmp_path: Path) -> None:
    argv = [
        sys.executable, str(REPO / "examples" / "anywhere.py"), "--backend", "ray",
        "--backend-option", f"address={connected}", "--storage", str(tmp_path / "runs"),
        "--blocks", "8",
    ]  # fmt: skip
    example = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    assert example.returncode == 0, example.stderr[-3000:]
    assert "17984 primes below 200,000 (computed on" in example.stdout
    assert "17984 primes below 200,000 in one 2-CPU job" in example.stdout
