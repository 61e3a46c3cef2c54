"""batchpool's AWS Batch backend side by side with boto3 alone, on moto's server.

Run from the repository root, with a Docker daemon reachable (``bash ci/docker.sh``
starts one; export the DOCKER_HOST it prints) and a worker image (the tests'
``localhost/batchpool-worker:TAG``, or one from ``batchpool image build``)::

    python benchmarks/bench_aws_batch.py --image localhost/batchpool-worker:TAG [--calls 200]

It starts ``moto_server`` (jobs as containers of that daemon, host networking), makes
an IAM role, an UNMANAGED compute environment, a job queue and an S3 bucket, then:

- boto3 alone: one ``submit_job`` per call, each job ``python3 -c 'time.sleep(0.1)'``,
  then ``describe_jobs`` (100 ids a call) every 0.5 s until all have ended;
- batchpool: ``map(time.sleep, [0.1] * calls)`` through ``AWSBatchBackend``, the store
  on the same server's S3; chunks as the executor sizes them (``--chunksize`` to fix).

It prints both times and their ratio. A script, not a test: it checks results, never
how long they took.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from typing import Any

import boto3

from batchpool import BatchPoolExecutor
from batchpool.backends.aws_batch import AWSBatchBackend

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)  # the tests' moto server: the same set-up as tests/test_aws_batch.py

from services.aws_batch import BatchServer  # noqa: E402
from services.s3 import REGION  # noqa: E402  (importing it sets fake AWS credentials)


def boto3_alone(endpoint: str, queue: str, image: str, calls: int) -> float:
    batch = boto3.client("batch", endpoint_url=endpoint, region_name=REGION)
    definition = batch.register_job_definition(
        jobDefinitionName=f"bench-{uuid.uuid4().hex[:8]}",
        type="container",
        containerProperties={
            "image": image,
            "command": ["python3", "-c", "pass"],
            "resourceRequirements": [
                {"type": "VCPU", "value": "1"},
                {"type": "MEMORY", "value": "512"},
            ],
        },
    )["jobDefinitionArn"]
    start = time.perf_counter()
    ids = [
        batch.submit_job(
            jobName=f"sleep-{i}",
            jobQueue=queue,
            jobDefinition=definition,
            containerOverrides={"command": ["python3", "-c", "import time; time.sleep(0.1)"]},
        )["jobId"]
        for i in range(calls)
    ]
    pending = set(ids)
    while pending:
        time.sleep(0.5)
        batch_ids = list(pending)
        for first in range(0, len(batch_ids), 100):
            for job in batch.describe_jobs(jobs=batch_ids[first : first + 100])["jobs"]:
                if job["status"] == "FAILED":
                    raise SystemExit(f"job {job['jobId']} failed: {job.get('statusReason')}")
                if job["status"] == "SUCCEEDED":
                    pending.discard(job["jobId"])
    return time.perf_counter() - start


def through_batchpool(
    endpoint: str, queue: str, image: str, calls: int, chunksize: int | None
) -> tuple[float, int]:
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=bucket)
    backend = AWSBatchBackend(queue, region=REGION, endpoint_url=endpoint)
    start = time.perf_counter()
    with BatchPoolExecutor(
        backend=backend,
        image=image,
        storage=f"s3://{bucket}/runs",
        storage_options={"key": "testing", "secret": "testing", "endpoint_url": endpoint},
    ) as ex:
        kwargs: dict[str, Any] = {} if chunksize is None else {"chunksize": chunksize}
        results = list(ex.map(time.sleep, [0.1] * calls, **kwargs))
    seconds = time.perf_counter() - start
    assert results == [None] * calls
    backend.close()
    return seconds, backend.calls.get("submit_job", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--chunksize", type=int, default=None)
    args = parser.parse_args()
    docker_host = os.environ.get("DOCKER_HOST")
    if not docker_host:
        raise SystemExit("export DOCKER_HOST (bash ci/docker.sh prints it): moto runs jobs there")
    with BatchServer(tempfile.mkdtemp(prefix="bench-aws-"), docker_host) as server:
        endpoint = server.endpoint
        queue = server.make_queue()
        alone = boto3_alone(endpoint, queue, args.image, args.calls)
        pooled, jobs = through_batchpool(endpoint, queue, args.image, args.calls, args.chunksize)
    n = args.calls
    print(f"{n} calls of time.sleep(0.1) on moto's AWS Batch ({endpoint}), image {args.image}")
    print(f"boto3 alone, one submit_job per call ({n} jobs): {alone:8.2f} s")
    print(f"batchpool map ({jobs} jobs):                  {pooled:8.2f} s")
    print(f"ratio batchpool / boto3 alone: {pooled / alone:.2f}")


if __name__ == "__main__":
    main()
