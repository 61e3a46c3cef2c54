"""The AWS Batch backend against moto's server, whose jobs run as real containers.

moto's Batch starts each job as a container of the ``container_engine`` fixture's
dockerd (host networking, so a job reaches the same moto server's S3 at 127.0.0.1,
where the run's store is). The image is the ``worker_image`` fixture's.

What moto does not do, and how the tests deal with it:

- it enforces no memory limit (it passes none to Docker), so the "killed" test ends
  the worker with ``os.kill(os.getpid(), 9)``, as the kernel's OOM killer would; and
  it ignores ``initProcessEnabled``, so the worker would be PID 1, which ignores a
  signal it sends itself: that test starts the worker under ``sh`` (``python=``);
- jobs start within a second, so the "queued" cancel slows moto's job states down
  with its state manager (``/moto-api/state-manager``).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from containers import ContainerEngine
from services import http_request
from services.aws_batch import BatchServer
from services.s3 import REGION

from batchpool import BatchPoolExecutor, WorkerLostError
from batchpool.backends.aws_batch import AWSBatchBackend, describe_exit, is_throttling
from batchpool.backends.base import JobSpec, JobState, Resources, make_backend

pytestmark = pytest.mark.aws

BUCKET = "batchpool-aws"


def square(x: int) -> int:
    return x * x


class Boom(ValueError):
    pass


def boom(x: int) -> int:
    raise Boom(f"boom {x}")


def die(x: int) -> int:
    print(f"about to die with {x}", flush=True)
    os.kill(os.getpid(), 9)
    return x


def snooze(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


#: The worker under ``sh``, so it is not PID 1 in moto's containers (see the docstring).
NOT_PID_1 = ("sh", "-c", 'python3 "$@"; exit $?', "sh")


@pytest.fixture(scope="module")
def moto(
    container_engine: ContainerEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BatchServer]:
    server = BatchServer(tmp_path_factory.mktemp("moto-batch"), container_engine.docker_host)
    with server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def queue(moto: BatchServer) -> str:
    return moto.make_queue()


@pytest.fixture
def backend(moto: BatchServer, queue: str) -> Iterator[AWSBatchBackend]:
    backend = AWSBatchBackend(queue, region=REGION, endpoint_url=moto.endpoint)
    yield backend
    backend.close()


def executor(
    backend: AWSBatchBackend, moto: BatchServer, image: str, **kwargs: Any
) -> BatchPoolExecutor:
    return BatchPoolExecutor(
        backend=backend,
        image=image,
        storage=f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}",
        storage_options=moto.storage_options(),
        **kwargs,
    )


def test_map_runs_as_batch_jobs_in_order(
    backend: AWSBatchBackend, moto: BatchServer, worker_image: str
) -> None:
    with executor(backend, moto, worker_image) as ex:
        assert list(ex.map(square, range(20), chunksize=4)) == [x * x for x in range(20)]
    assert backend.calls["submit_job"] == 5  # one job per chunk
    assert backend.calls["register_job_definition"] == 1  # one definition for the image
    described = moto.client("batch").describe_job_definitions(status="ACTIVE")
    (definition,) = [
        d for d in described["jobDefinitions"] if d["jobDefinitionName"].startswith("batchpool-")
    ]
    assert definition["containerProperties"]["image"] == worker_image
    # the manifest's description rebuilds the backend
    described_backend = backend.describe()
    rebuilt = make_backend(described_backend["name"], **described_backend["options"])
    assert isinstance(rebuilt, AWSBatchBackend)
    assert rebuilt.describe() == backend.describe()


def test_an_exception_keeps_its_type(
    backend: AWSBatchBackend, moto: BatchServer, worker_image: str
) -> None:
    with executor(backend, moto, worker_image) as ex, pytest.raises(Boom, match="boom 3"):
        ex.submit(boom, 3).result(timeout=90)


def test_a_killed_worker_gives_worker_lost_error_with_exit_code_137(
    backend: AWSBatchBackend, moto: BatchServer, worker_image: str
) -> None:
    # moto passes no memory limit to Docker: the worker kills itself as the OOM killer would.
    with executor(backend, moto, worker_image, max_attempts=1) as ex:
        future = ex.options(memory="64M", python=NOT_PID_1).submit(die, 1)
        with pytest.raises(WorkerLostError) as info:
            future.result(timeout=90)
    text = str(info.value)
    assert "exit code 137" in text and "killed by SIGKILL" in text, text
    assert "memory limit of 64 MiB" in text, text
    # The tail of its CloudWatch log stream: sh's word (the call's own output is in the store).
    assert "/aws/batch/job" in text and "Killed" in text, text


def _slow_job_states(moto: BatchServer, seconds: float | None) -> None:
    """Make moto's jobs wait ``seconds`` in each state (None: back to its default)."""
    if seconds is None:
        path, body = "unset-transition", {"model_name": "batch::job"}
    else:
        transition = {"progression": "time", "seconds": seconds}
        path, body = "set-transition", {"model_name": "batch::job", "transition": transition}
    url = f"{moto.endpoint}/moto-api/state-manager/{path}"
    status, answer = http_request("POST", url, json.dumps(body).encode())
    assert status in (200, 201), answer


def test_future_cancel_of_a_queued_job_terminates_it(
    backend: AWSBatchBackend, moto: BatchServer, worker_image: str
) -> None:
    with executor(backend, moto, worker_image) as ex:
        _slow_job_states(moto, 30)  # the job stays SUBMITTED: queued, as on a busy queue
        try:
            future = ex.submit(snooze, 30)
            deadline = time.monotonic() + 30
            while not (future.job and future.job.job_ids):
                assert time.monotonic() < deadline, "the call was never handed to AWS Batch"
                time.sleep(0.05)
            assert future.cancel() and future.cancelled()
        finally:
            _slow_job_states(moto, None)
        (job_id,) = future.job.job_ids
        assert backend.calls["terminate_job"] == 1
        deadline = time.monotonic() + 60
        while backend.status([job_id])[job_id] is not JobState.CANCELLED:
            assert time.monotonic() < deadline, "the terminated job never ended"
            time.sleep(0.3)
    assert "cancelled by batchpool" in backend.explain(job_id)


def test_a_running_job_is_terminated_and_status_batches_describe_jobs(
    backend: AWSBatchBackend, worker_image: str
) -> None:
    # A bare job (no executor): `sh -c 'sleep 600'` as the worker's "python", terminated
    # below (still running, however long the wait for it to start took).
    spec = JobSpec(
        "sleeper",
        ("ignored",),
        resources=Resources(image=worker_image, python=("sh", "-c", "sleep 600", "sh")),
    )
    (job_id,) = backend.submit([spec])
    AWSBatchBackend.check_job_id(job_id)
    deadline = time.monotonic() + 60
    while backend.status([job_id])[job_id] is not JobState.RUNNING:
        assert time.monotonic() < deadline, "the job never ran"
        time.sleep(0.3)
    backend.cancel([job_id])
    deadline = time.monotonic() + 60
    while backend.status([job_id])[job_id] is not JobState.CANCELLED:
        assert time.monotonic() < deadline, "the terminated job never ended"
        time.sleep(0.3)
    assert "cancelled by batchpool" in backend.explain(job_id)
    # A fresh client (another process would do the same) tells it from the reason.
    other = AWSBatchBackend(**backend.describe()["options"])
    assert other.status([job_id]) == {job_id: JobState.CANCELLED}

    # 250 ids: at most 100 a describe_jobs call. Ids AWS does not know count as ended.
    ids = [job_id, *(str(uuid.uuid4()) for _ in range(249))]
    before = backend.calls["describe_jobs"]
    states = backend.status(ids)
    assert backend.calls["describe_jobs"] - before == math.ceil(len(ids) / 100) == 3
    assert states[job_id] is JobState.CANCELLED
    assert set(states) == set(ids)


def test_checks_without_aws(tmp_path: Path) -> None:
    backend = AWSBatchBackend("q", region=REGION, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="AWS Batch runs containers: give image="):
        backend.submit([JobSpec("x", ("a",))])
    with pytest.raises(ValueError, match="s3://"):
        BatchPoolExecutor(backend=backend, image="img", storage=str(tmp_path))
    for bad in ("1.1", "-x", "../etc", "12345678-1234-1234-1234-1234567890ab; rm"):
        with pytest.raises(ValueError):
            AWSBatchBackend.check_job_id(bad)
    assert backend.max_parallel() == 64
    # What AWS (not moto, which sets no limit) says of a container past its memory limit:
    reason = "OutOfMemoryError: Container killed due to memory usage"
    assert "exit code 137 (killed: memory limit of 64 MiB;" in describe_exit(137, 64, reason)
    assert describe_exit(143, None, "") == "exit code 143 (killed by SIGTERM)"
    assert AWSBatchBackend("q", region=REGION, parallel=3).max_parallel() == 3


def test_throttling_is_told_from_other_errors() -> None:
    from botocore.exceptions import ClientError

    def error(code: str, status: int) -> ClientError:
        answer: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(answer, "SubmitJob")

    assert is_throttling(error("TooManyRequestsException", 400))
    assert is_throttling(error("ThrottlingException", 400))
    assert is_throttling(error("Whatever", 429))
    assert not is_throttling(error("ClientException", 400))
    assert not is_throttling(ValueError("no response"))


def test_the_example_runs_unchanged_on_aws_batch(
    moto: BatchServer, queue: str, worker_image: str
) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    options = moto.storage_options()
    argv = [
        sys.executable, str(root / "examples" / "anywhere.py"), "--backend", "aws-batch",
        "--backend-option", f"job_queue={queue}", "--backend-option", f"region={REGION}",
        "--backend-option", f"endpoint_url={moto.endpoint}", "--image", worker_image,
        "--storage", f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", "--blocks", "4",
        *(arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")),
    ]  # fmt: skip
    example = subprocess.run(argv, capture_output=True, text=True, timeout=200, check=False)
    assert example.returncode == 0, example.stderr[-3000:]
    assert "primes below" in example.stdout
