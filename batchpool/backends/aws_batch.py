"""AWS Batch: each chunk is one container job of a job queue, through boto3.

A job runs ``python3 -m batchpool.worker <args>`` (or ``Resources.python``) as the
command of a container of ``Resources.image``, with the job's environment (the
store's description, the run's secret) as ``containerOverrides`` environment. The
container needs nothing else: the store is ``s3://`` (``check_store`` refuses any
other at the executor's construction), reached over the network like any client.

Job definitions: unless one is given (``job_definition=``, a name, ``name:revision``
or ARN, whose image then applies), the backend registers one container job
definition per distinct ``(image, cpus, memory, gpus)``, named
``batchpool-<digest>``, and reuses an ACTIVE one of that name that exists already
(so a run does not add a revision per client). They set ``initProcessEnabled``, so
the worker is not PID 1 on AWS (PID 1 ignores signals it has no handler for).

One ``submit_job`` per chunk: array jobs would cut the calls to AWS, but moto runs
array children without ``AWS_BATCH_JOB_ARRAY_INDEX``, so they cannot be tested
here; a job's id is its AWS ``jobId`` (a UUID), which any process may query and
terminate (``job_ids_outlive_client``).

``status`` asks ``describe_jobs`` for at most 100 ids a call (AWS's limit):
SUBMITTED, PENDING, RUNNABLE and STARTING are PENDING; a FAILED job that this
backend (or one with the same reason text, ``batchpool cancel``) terminated is
CANCELLED; an id AWS no longer knows (jobs are forgotten ~24 h after they end)
is SUCCEEDED, so the executor reads its outcome, or finds none and explains it.
``explain`` gives the job's ``statusReason``, its container's exit code and
reason (moto leaves the exit code out of ``describe_jobs``; ``list_jobs`` has it)
and the tail of its CloudWatch log stream (group ``/aws/batch/job``). Exit code 137
is SIGKILL: with a reason that says ``OutOfMemoryError`` it is explained as
"killed: memory limit".

Throttling (``ThrottlingException``, ``TooManyRequestsException``, HTTP 429) is
retried with exponential backoff (tenacity) on top of botocore's own retries;
any other AWS error raises ``BackendError`` naming the call.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from batchpool.backends.base import (
    Backend,
    JobSpec,
    JobState,
    Notify,
    amount_mib,
    duration_seconds,
    signal_name,
)
from batchpool.errors import BackendError

T = TypeVar("T")

#: The worker's Python in an image, unless ``Resources.python`` names another.
IMAGE_PYTHON = "python3"
#: ``describe_jobs`` takes at most this many ids a call.
DESCRIBE_LIMIT = 100
#: MiB of a job whose options give no ``memory`` (AWS Batch requires an amount).
DEFAULT_MEMORY_MIB = 2048
LOG_GROUP = "/aws/batch/job"
LOG_TAIL_LINES = 20
#: The reason ``cancel`` gives ``terminate_job``; a FAILED job with it is CANCELLED.
CANCEL_REASON = "cancelled by batchpool"
#: Tries and seconds a throttled call is retried for before it counts as failed.
THROTTLE_ATTEMPTS = 8
THROTTLE_SECONDS = 120.0
_THROTTLING = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
    }
)
_STATES = {
    "SUBMITTED": JobState.PENDING,
    "PENDING": JobState.PENDING,
    "RUNNABLE": JobState.PENDING,
    "STARTING": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
}
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NETWORK_PROTOCOLS = frozenset({"s3", "s3a"})


def is_throttling(exc: BaseException) -> bool:
    """True for an AWS error that means "slow down": retried with backoff."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _THROTTLING or status == 429


def memory_mib(memory: str | int | None) -> int:
    """MiB of a job option ``memory`` (``"512M"``, ``"8G"``, ``"2GiB"``, bytes as an int)."""
    if memory is None:
        return DEFAULT_MEMORY_MIB
    return amount_mib(memory, engine="AWS Batch")


def walltime_seconds(walltime: str) -> int:
    """Seconds of a job option ``walltime``; AWS Batch refuses attempt durations under a minute."""
    return max(60, duration_seconds(walltime))


def _job_name(spec: JobSpec) -> str:
    name = _NAME_UNSAFE.sub("_", spec.name)[:128] or "batchpool"
    if not name[0].isalnum():
        name = f"bp{name}"[:128]
    return name if len(name) >= 2 else f"{name}_job"


def _cpus(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{cpus:g}"


def describe_exit(exit_code: int, memory: int | None, reason: str) -> str:
    """Words for a container's exit code: the signal, and for SIGKILL the memory limit.

    AWS Batch names the cause in the container's ``reason``
    (``OutOfMemoryError: Container killed due to memory usage``)."""
    if exit_code <= 128:
        return f"exit code {exit_code}"
    signum = exit_code - 128
    if signum != 9:
        return f"exit code {exit_code} (killed by {signal_name(signum)})"
    limit = f"memory limit of {memory} MiB" if memory else "memory limit"
    if "memory" in reason.lower():
        return f"exit code {exit_code} (killed: {limit}; {reason})"
    return (
        f"exit code {exit_code} (killed by SIGKILL: by the {limit}, a timeout, "
        "terminate_job or `kill -9`; AWS says OutOfMemoryError in the container's reason "
        "when it was the memory limit)"
    )


class AWSBatchBackend(Backend):
    """Run each chunk as a container job of the AWS Batch queue ``job_queue``.

    ``job_definition`` is a container job definition to use for every job (its image
    is then the jobs' image; cpus and memory given as job options are passed as
    overrides); without it one is registered per distinct image and resources.
    ``region``, ``endpoint_url`` (moto, LocalStack, a VPC endpoint), ``profile_name``
    and the ``aws_*`` keys make the boto3 session, unless ``session`` (a
    ``boto3.Session``) is given; ``client_config`` is a ``botocore.config.Config``.
    ``job_role_arn`` and ``execution_role_arn`` go into registered job definitions,
    ``platform`` is ``"EC2"`` or ``"FARGATE"`` (their platform capability), and
    ``tags`` go on every job. ``parallel`` is how many jobs run at once, for sizing
    ``map``'s chunks when the executor gets no ``max_workers`` (default 64).
    """

    name = "aws-batch"
    notifies = False
    bounded = False
    shares_client_code = False
    job_ids_outlive_client = True

    def __init__(
        self,
        job_queue: str,
        job_definition: str | None = None,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        session: Any = None,
        client_config: Any = None,
        job_role_arn: str | None = None,
        execution_role_arn: str | None = None,
        platform: str | None = None,
        tags: dict[str, str] | None = None,
        parallel: int | None = None,
    ) -> None:
        if not isinstance(job_queue, str) or not job_queue:
            raise ValueError(f"job_queue must be the name or ARN of a job queue, not {job_queue!r}")
        if parallel is not None and (not isinstance(parallel, int) or parallel <= 0):
            raise ValueError(f"parallel must be a positive int, not {parallel!r}")
        if platform is not None and platform not in ("EC2", "FARGATE"):
            raise ValueError(f"platform must be 'EC2' or 'FARGATE', not {platform!r}")
        import boto3

        if session is None:
            session = boto3.Session(
                profile_name=profile_name,
                aws_access_key_id=aws_access_key_id,
                aws_secret_access_key=aws_secret_access_key,
                aws_session_token=aws_session_token,
                region_name=region,
            )
        self.job_queue = job_queue
        self.job_definition = job_definition
        self.region = region or session.region_name
        self.endpoint_url = endpoint_url
        self.job_role_arn = job_role_arn
        self.execution_role_arn = execution_role_arn
        self.platform = platform
        self.tags = dict(tags or {})
        self._parallel = parallel
        options: dict[str, Any] = {"region_name": self.region, "endpoint_url": endpoint_url}
        if client_config is not None:
            options["config"] = client_config
        self._batch = session.client("batch", **options)
        self._logs = session.client("logs", **options)
        self._lock = threading.Lock()
        self._definitions: dict[tuple[str, str, int, int], str] = {}
        self._cancelled: set[str] = set()
        self._closed = False
        #: How many times each AWS call was made (batching is the point of ``status``).
        self.calls: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"AWSBatchBackend(job_queue={self.job_queue!r}, region={self.region!r})"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": {
                "job_queue": self.job_queue,
                "region": self.region,
                "endpoint_url": self.endpoint_url,
            },
        }

    @classmethod
    def check_job_id(cls, job_id: str) -> None:
        if not isinstance(job_id, str) or _JOB_ID.fullmatch(job_id) is None:
            raise ValueError(f"{job_id!r} is not an AWS Batch job id (a UUID)")

    def check_store(self, protocol: str, root: str) -> None:
        if protocol not in _NETWORK_PROTOCOLS:
            raise ValueError(
                f"a {protocol}:// store cannot be reached from an AWS Batch job: give "
                "storage= an s3:// location (with storage_options that the jobs can use "
                "too: they travel in each job's environment)"
            )

    def max_parallel(self) -> int:
        return self._parallel or 64

    # -- AWS calls ---------------------------------------------------------------------

    def _call(self, client: Any, operation: str, **kwargs: Any) -> Any:
        """``client.<operation>(**kwargs)``, retried while AWS throttles; counted."""
        method: Callable[..., Any] = getattr(client, operation)
        with self._lock:
            self.calls[operation] = self.calls.get(operation, 0) + 1

        @retry(
            retry=retry_if_exception(is_throttling),
            wait=wait_random_exponential(multiplier=0.5, max=20),
            stop=stop_after_attempt(THROTTLE_ATTEMPTS) | stop_after_delay(THROTTLE_SECONDS),
            reraise=True,
        )
        def attempt() -> Any:
            return method(**kwargs)

        try:
            return attempt()
        except Exception as exc:
            if isinstance(exc, BackendError):
                raise
            from botocore.exceptions import (
                BotoCoreError,
                ClientError,
                ConnectionError,
                HTTPClientError,
            )

            if isinstance(exc, (ClientError, BotoCoreError)):
                # No answer (endpoint unreachable, timed out), or a 5xx: it may pass.
                status = getattr(exc, "response", {}).get("ResponseMetadata", {})
                unreachable = isinstance(exc, (ConnectionError, HTTPClientError)) or (
                    int(status.get("HTTPStatusCode") or 0) >= 500
                )
                raise BackendError(
                    f"AWS Batch {operation} failed: {exc} (queue {self.job_queue!r}, region "
                    f"{self.region!r}, endpoint {self.endpoint_url or 'AWS'})",
                    transient=unreachable,
                ) from exc
            raise

    # -- the contract ------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        if self._closed:
            raise BackendError("this AWSBatchBackend is closed")
        ids: list[str] = []
        for spec in jobs:
            answer = self._call(self._batch, "submit_job", **self._submit_args(spec))
            ids.append(str(answer["jobId"]))
        return ids

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        for job_id in job_ids:
            self.check_job_id(job_id)
        unique = list(dict.fromkeys(job_ids))
        for start in range(0, len(unique), DESCRIBE_LIMIT):
            part = unique[start : start + DESCRIBE_LIMIT]
            for job in self._call(self._batch, "describe_jobs", jobs=part).get("jobs", []):
                states[job["jobId"]] = self._state(job)
        for job_id in unique:
            # AWS forgets a job a day or so after it ended: the store tells how it went.
            states.setdefault(job_id, JobState.SUCCEEDED)
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            self.check_job_id(job_id)
            with self._lock:
                self._cancelled.add(job_id)
            try:
                self._call(self._batch, "terminate_job", jobId=job_id, reason=CANCEL_REASON)
            except BackendError as exc:
                # A job that ended, or that AWS forgot, needs no stopping.
                if "ClientException" not in str(exc):
                    raise

    def close(self) -> None:
        self._closed = True

    def explain(self, job_id: str) -> str:
        self.check_job_id(job_id)
        jobs = self._call(self._batch, "describe_jobs", jobs=[job_id]).get("jobs", [])
        if not jobs:
            return f"AWS Batch no longer knows job {job_id} (it forgets jobs a day after they end)"
        job = jobs[0]
        container = dict(job.get("container") or {})
        attempts = job.get("attempts") or []
        last = dict((attempts[-1] or {}).get("container") or {}) if attempts else {}
        exit_code = container.get("exitCode", last.get("exitCode"))
        if exit_code is None and job.get("status") in ("SUCCEEDED", "FAILED"):
            exit_code = self._listed_exit_code(job)
        reason = str(container.get("reason") or last.get("reason") or "")
        words = [f"AWS Batch job {job_id} ({job.get('jobName', '?')}) is {job.get('status')}"]
        if job.get("statusReason"):
            words.append(f"statusReason: {job['statusReason']}")
        if exit_code is not None:
            memory = container.get("memory")
            words.append(describe_exit(int(exit_code), int(memory) if memory else None, reason))
        elif reason:
            words.append(f"container reason: {reason}")
        text = "; ".join(words)
        stream = container.get("logStreamName") or last.get("logStreamName")
        tail = self._log_tail(str(stream)) if stream else ""
        if tail:
            text += f"; last lines of its log ({LOG_GROUP} {stream}):\n{tail}"
        elif stream:
            text += f"; its log stream {LOG_GROUP} {stream} is empty or missing"
        return text

    # -- helpers -----------------------------------------------------------------------

    def _state(self, job: dict[str, Any]) -> JobState:
        state = _STATES.get(str(job.get("status")), JobState.PENDING)
        if state is JobState.FAILED:
            with self._lock:
                ours = job["jobId"] in self._cancelled
            if ours or job.get("statusReason") == CANCEL_REASON:
                return JobState.CANCELLED
        return state

    def _submit_args(self, spec: JobSpec) -> dict[str, Any]:
        res = spec.resources
        python = res.python or IMAGE_PYTHON
        argv = [python] if isinstance(python, str) else list(python)
        command = [*argv, "-m", "batchpool.worker", *spec.args]
        overrides: dict[str, Any] = {
            "command": command,
            "environment": [{"name": k, "value": v} for k, v in spec.environment().items()],
        }
        if self.job_definition is not None:
            definition = self.job_definition
            requirements = [{"type": "VCPU", "value": _cpus(res.cpus)}]
            if res.memory:
                requirements.append({"type": "MEMORY", "value": str(memory_mib(res.memory))})
            if res.gpus:
                requirements.append({"type": "GPU", "value": str(res.gpus)})
            overrides["resourceRequirements"] = requirements
        else:
            definition = self._definition_for(spec)
        args: dict[str, Any] = {
            "jobName": _job_name(spec),
            "jobQueue": res.queue or self.job_queue,
            "jobDefinition": definition,
            "containerOverrides": overrides,
        }
        if res.walltime:
            args["timeout"] = {"attemptDurationSeconds": walltime_seconds(res.walltime)}
        if self.tags:
            args["tags"] = self.tags
        return args

    def _definition_for(self, spec: JobSpec) -> str:
        res = spec.resources
        if not res.image:
            raise ValueError(
                "AWS Batch runs containers: give image=... (to the executor, or in "
                "options(image=...)), an image with batchpool and the store's fsspec "
                "package (s3fs) installed, e.g. one built with `batchpool image build`"
            )
        key = (res.image, _cpus(res.cpus), memory_mib(res.memory), int(res.gpus))
        with self._lock:
            known = self._definitions.get(key)
        if known:
            return known
        properties: dict[str, Any] = {
            "image": res.image,
            "command": [IMAGE_PYTHON, "-m", "batchpool.worker"],
            "resourceRequirements": [
                {"type": "VCPU", "value": key[1]},
                {"type": "MEMORY", "value": str(key[2])},
                *([{"type": "GPU", "value": str(key[3])}] if key[3] else []),
            ],
            "linuxParameters": {"initProcessEnabled": True},
        }
        if self.job_role_arn:
            properties["jobRoleArn"] = self.job_role_arn
        if self.execution_role_arn:
            properties["executionRoleArn"] = self.execution_role_arn
        digest = hashlib.sha256(
            json.dumps([properties, self.platform], sort_keys=True).encode()
        ).hexdigest()[:16]
        name = f"batchpool-{digest}"
        arn = self._active_definition(name)
        if arn is None:
            args: dict[str, Any] = {
                "jobDefinitionName": name,
                "type": "container",
                "containerProperties": properties,
            }
            if self.platform:
                args["platformCapabilities"] = [self.platform]
            arn = str(
                self._call(self._batch, "register_job_definition", **args)["jobDefinitionArn"]
            )
        with self._lock:
            self._definitions[key] = arn
        return arn

    def _active_definition(self, name: str) -> str | None:
        answer = self._call(
            self._batch, "describe_job_definitions", jobDefinitionName=name, status="ACTIVE"
        )
        found = [d for d in answer.get("jobDefinitions", []) if d.get("status") == "ACTIVE"]
        if not found:
            return None
        return str(max(found, key=lambda d: int(d.get("revision", 0)))["jobDefinitionArn"])

    def _listed_exit_code(self, job: dict[str, Any]) -> int | None:
        """The exit code from ``list_jobs`` (moto leaves it out of ``describe_jobs``)."""
        queue = job.get("jobQueue") or self.job_queue
        token: str | None = None
        for _ in range(20):  # pages of 100: the job ended recently, it is near the top
            args: dict[str, Any] = {"jobQueue": queue, "jobStatus": job["status"]}
            if token:
                args["nextToken"] = token
            answer = self._call(self._batch, "list_jobs", **args)
            for summary in answer.get("jobSummaryList", []):
                if summary.get("jobId") == job["jobId"]:
                    code = (summary.get("container") or {}).get("exitCode")
                    return None if code is None else int(code)
            token = answer.get("nextToken")
            if not token:
                break
        return None

    def _log_tail(self, stream: str) -> str:
        try:
            answer = self._call(
                self._logs,
                "get_log_events",
                logGroupName=LOG_GROUP,
                logStreamName=stream,
                startFromHead=False,
                limit=LOG_TAIL_LINES,
            )
        except BackendError:
            return ""
        lines = [str(e.get("message", "")).rstrip() for e in answer.get("events", [])]
        return "\n".join(lines[-LOG_TAIL_LINES:]).strip()
