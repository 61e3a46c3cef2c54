"""The SGE backend against a real single-node Son of Grid Engine (started by ci/sge.sh).

When ``CI`` is set, SGE must start, or every test here fails with the script's
output; elsewhere the tests skip with the reason.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from recorders import ChecksQueries
from services import read_exports

from batchpool import BatchPoolExecutor
from batchpool.backends.base import JobSpec, JobState, Resources
from batchpool.backends.sge import SGEBackend
from batchpool.errors import BackendError, WorkerLostError

pytestmark = pytest.mark.sge

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "sge.sh"


@pytest.fixture(scope="session")
def sge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    env_file = tmp_path_factory.mktemp("sge") / "sge.env"
    why = ""
    output = ""
    if os.geteuid() != 0:
        why = "ci/sge.sh installs and starts SGE as root"
    else:
        proc = subprocess.run(
            ["bash", str(SCRIPT)],
            env={**os.environ, "BATCHPOOL_SGE_ENV": str(env_file)},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 or not env_file.exists():
            why = f"`bash ci/sge.sh` exited with status {proc.returncode}"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"SGE is required when CI is set, but {why}:\n{output}", pytrace=False)
        pytest.skip(f"no SGE here: {why}")
    saved = dict(os.environ)
    os.environ.update(read_exports(env_file))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def square(x: int) -> int:
    return x * x


class Boom(ValueError):
    pass


def boom(x: int) -> int:
    print(f"boom is coming for {x}", flush=True)
    raise Boom(f"boom {x}")


def die(x: int) -> int:
    print(f"about to die with {x}", flush=True)
    os.kill(os.getpid(), 9)
    return x


class QueriesRecorded(ChecksQueries, SGEBackend):
    """SGEBackend, each of whose status queries is checked (see ``ChecksQueries``)."""


def test_map_is_one_qsub_and_keeps_order(sge: None, tmp_path: Path) -> None:
    backend = QueriesRecorded()
    start = time.monotonic()
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path)) as ex:
        results = list(ex.map(square, range(100), chunksize=10))
    elapsed = time.monotonic() - start
    assert results == [x * x for x in range(100)]
    assert backend.qsub_calls == 1
    # One status query per poll for all the jobs in flight, never one per job (however
    # many polls SGE took to run them): each query asked about every one of them.
    assert backend.status_calls > 0 and backend.missed == []
    print(f"100 calls in 10 tasks of one array: {elapsed:.1f} s, {backend.status_calls} qstat")


def test_exception_reraised_as_its_type_and_logs_in_store(sge: None, tmp_path: Path) -> None:
    with BatchPoolExecutor(backend=SGEBackend(), storage=str(tmp_path)) as ex:
        ok = ex.submit(square, 7)
        bad = ex.submit(boom, 3)
        assert ok.result(timeout=90) == 49
        with pytest.raises(Boom, match="boom 3") as info:
            bad.result(timeout=90)
        assert "boom" in str(info.value.__cause__)  # the remote traceback, chained
        # the job's output is in the run's logs/ in the store
        logs = list(Path(ex.run_url).rglob("logs/*.log"))
        assert any(b"boom is coming for 3" in p.read_bytes() for p in logs), logs


def test_killed_worker_is_retried_then_fails_with_exit_status_and_tail(
    sge: None, tmp_path: Path
) -> None:
    backend = SGEBackend()
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path), max_attempts=2) as ex:
        future = ex.submit(die, 5)
        with pytest.raises(WorkerLostError) as info:
            future.result(timeout=100)
    text = str(info.value)
    assert "2 attempts" in text, text
    assert "exit_status 137" in text, text
    # the tail of the engine's output file of the job (the calls' own output is
    # captured by the worker, and lost with it when it is killed)
    assert "last lines of its output" in text and "started on" in text, text
    assert backend.qsub_calls == 2  # one per attempt


def test_one_status_command_per_poll_and_cancel_of_tasks(sge: None, tmp_path: Path) -> None:
    backend = SGEBackend(log_dir=str(tmp_path / "logs"))
    # ``bash -c 'sleep 600' --`` swallows the worker's argv: jobs that just run, until
    # cancelled below (still running, however long the waits before took).
    sleeper = Resources(python=("bash", "-c", "sleep 600", "--"))
    specs = [
        JobSpec(
            name=f"sleep-{i}",
            args=("--chunk", str(i)),
            env={"GROUP": str(i % 2)},
            resources=sleeper,
        )
        for i in range(5)
    ]
    ids = backend.submit(specs)
    assert backend.qsub_calls == 2  # one array per environment
    assert len({i.split(".")[0] for i in ids}) == 2
    deadline = time.monotonic() + 30
    states = backend.status(ids)
    while not all(s is JobState.RUNNING for s in states.values()):
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
        states = backend.status(ids)
    calls = backend.status_calls
    backend.status(ids)
    assert backend.status_calls == calls + 1  # one qstat for all jobs
    backend.cancel(ids[:3])  # tasks of both arrays, one qdel
    deadline = time.monotonic() + 30
    while True:
        states = backend.status(ids)
        if all(states[i] is JobState.SUCCEEDED for i in ids[:3]):  # gone from qstat
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    assert all(states[i] is JobState.RUNNING for i in ids[3:]), states
    backend.cancel(ids)  # the ended ones too: not an error
    backend.close()


def test_command_failures_name_the_command(sge: None) -> None:
    backend = SGEBackend(qsub="/bin/false")
    spec = JobSpec(name="x", args=("--chunk", "x"), env={})
    with pytest.raises(BackendError, match=r"`/bin/false .*` failed with exit status 1.*SGE_ROOT"):
        backend.submit([spec])
    with pytest.raises(BackendError, match="could not start"):
        SGEBackend(qstat="/nonexistent/qstat").status(["1.1"])


def test_future_cancel_drops_a_queued_job(sge: None, tmp_path: Path) -> None:
    import concurrent.futures as cf
    import time

    backend = SGEBackend(extra_args=["-h"])  # held: queued, as on a busy cluster
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "runs")) as bpe:
        future = bpe.submit(square, 3)
        deadline = time.monotonic() + 30
        while not (future.job and future.job.job_ids):
            assert time.monotonic() < deadline, "the call was never handed to SGE"
            time.sleep(0.05)
        assert future.cancel() and future.cancelled()
        done, _ = cf.wait([future], timeout=60)  # at once: the timeout is a hang guard
        assert done == {future}
        with pytest.raises(cf.CancelledError):
            future.result()


def overrun(x: int) -> int:
    print(f"working past the walltime with {x}", flush=True)
    time.sleep(600)
    return x


def hungry(megabytes: int) -> int:
    return len(bytearray(megabytes * 1024 * 1024))


def test_walltime_kill_fails_with_exit_status_137(sge: None, tmp_path: Path) -> None:
    backend = SGEBackend()
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path), max_attempts=1) as ex:
        future = ex.options(walltime="0:0:5").submit(overrun, 1)
        with pytest.raises(WorkerLostError) as info:
            future.result(timeout=100)
    text = str(info.value)
    assert "exit_status 137" in text and "h_rt" in text, text
    assert backend.qsub_calls == 1


def test_memory_limit_is_enforced_by_sge(sge: None, tmp_path: Path) -> None:
    # h_vmem becomes the job's address-space limit: an allocation past it fails
    # inside the call, which comes back as MemoryError; the worker lives on.
    with BatchPoolExecutor(backend=SGEBackend(), storage=str(tmp_path)) as ex:
        limited = ex.options(memory="1G")
        assert limited.submit(hungry, 10).result(timeout=100) == 10 * 1024 * 1024
        with pytest.raises(MemoryError):
            limited.submit(hungry, 2048).result(timeout=100)
