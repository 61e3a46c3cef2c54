"""AWS Batch for the tests: moto's server, which runs each job as a real container.

moto's Batch needs a Docker API (``docker.from_env()``): the server gets the
``DOCKER_HOST`` of the ``container_engine`` fixture, and
``MOTO_DOCKER_NETWORK_MODE=host``, so that jobs reach the server (their S3 store)
at 127.0.0.1. ``make_queue`` creates what a queue needs in moto: an IAM role, an
UNMANAGED compute environment and the job queue. The same server serves S3.
"""

from __future__ import annotations

import uuid
from typing import Any

from services.s3 import REGION, MotoServer

__all__ = ["BatchServer"]


class BatchServer(MotoServer):
    """moto_server whose Batch jobs run as containers of the engine at ``docker_host``."""

    name = "moto_batch_server"

    def __init__(self, log_dir: Any, docker_host: str) -> None:
        super().__init__(log_dir)
        self.docker_host = docker_host

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["DOCKER_HOST"] = self.docker_host
        env["MOTO_DOCKER_NETWORK_MODE"] = "host"
        return env

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION)

    def make_queue(self, name: str | None = None) -> str:
        """Create an IAM role, an UNMANAGED compute environment and a queue; its name."""
        name = name or f"bp-{uuid.uuid4().hex[:10]}"
        iam = self.client("iam")
        batch = self.client("batch")
        role = iam.create_role(RoleName=f"{name}-role", AssumeRolePolicyDocument="{}")
        environment = batch.create_compute_environment(
            computeEnvironmentName=f"{name}-ce",
            type="UNMANAGED",
            state="ENABLED",
            serviceRole=role["Role"]["Arn"],
        )
        batch.create_job_queue(
            jobQueueName=name,
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[
                {"order": 1, "computeEnvironment": environment["computeEnvironmentArn"]}
            ],
        )
        return name
