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
how long they took. Pass ``--endpoint`` and ``--queue`` to use a server of your own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import boto3

from batchpool import BatchPoolExecutor
from batchpool.backends.aws_batch import AWSBatchBackend

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def start_moto(log_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        **CREDENTIALS,
        "AWS_DEFAULT_REGION": REGION,
        "MOTO_PORT": str(port),
        "MOTO_DOCKER_NETWORK_MODE": "host",
    }
    moto = shutil.which("moto_server") or f"{sys.executable} -m moto.server"
    with open(os.path.join(log_dir, "moto.log"), "wb") as log:
        process = subprocess.Popen(
            [*moto.split(), "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, endpoint
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit(f"moto_server did not start; see {log_dir}/moto.log") from None
            time.sleep(0.1)


def make_queue(endpoint: str) -> str:
    kw: dict[str, Any] = {"endpoint_url": endpoint, "region_name": REGION}
    name = f"bench-{uuid.uuid4().hex[:8]}"
    role = boto3.client("iam", **kw).create_role(RoleName=name, AssumeRolePolicyDocument="{}")
    batch = boto3.client("batch", **kw)
    ce = batch.create_compute_environment(
        computeEnvironmentName=name,
        type="UNMANAGED",
        state="ENABLED",
        serviceRole=role["Role"]["Arn"],
    )
    batch.create_job_queue(
        jobQueueName=name,
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce["computeEnvironmentArn"]}],
    )
    return name


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
    parser.add_argument("--endpoint", default=None, help="a moto server of your own")
    parser.add_argument("--queue", default=None, help="its job queue (with --endpoint)")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    if not args.endpoint and not os.environ.get("DOCKER_HOST"):
        raise SystemExit("export DOCKER_HOST (bash ci/docker.sh prints it): moto runs jobs there")
    process = None
    log_dir = tempfile.mkdtemp(prefix="bench-aws-")
    endpoint = args.endpoint
    if endpoint is None:
        process, endpoint = start_moto(log_dir)
    try:
        queue = args.queue or make_queue(endpoint)
        alone = boto3_alone(endpoint, queue, args.image, args.calls)
        pooled, jobs = through_batchpool(endpoint, queue, args.image, args.calls, args.chunksize)
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
    n = args.calls
    print(f"{n} calls of time.sleep(0.1) on moto's AWS Batch ({endpoint}), image {args.image}")
    print(f"boto3 alone, one submit_job per call ({n} jobs): {alone:8.2f} s")
    print(f"batchpool map ({jobs} jobs):                  {pooled:8.2f} s")
    print(f"ratio batchpool / boto3 alone: {pooled / alone:.2f}")


if __name__ == "__main__":
    main()
