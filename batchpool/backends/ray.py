"""Run jobs as tasks on a Ray cluster (``ray``).

Each job is one Ray task that runs :func:`_run_job` in a Ray worker process: the
same code ``python -m batchpool.worker`` runs, reading the chunk from and writing
its outcome (and the calls' output, to ``logs/``) to the run's store. The task
returns nothing, so a result the worker wrote survives a lost driver connection,
and Ray's object store keeps no data for us.

The job's end is pushed: each task's ``ObjectRef.future()`` (a real
``concurrent.futures.Future``) calls back as the task ends, in a thread of Ray's,
and the backend turns that into a ``JobEvent`` (``notifies = True``); ``status``
only reads what the callbacks recorded.

Retries: batchpool retries a job that ended without a result (up to the
executor's ``max_attempts``, each with a new attempt number), so Ray must not
retry behind its back: tasks run with ``max_retries=0`` (no re-run when the
worker dies) and ``retry_exceptions=False``. A worker that dies under its task
(SIGKILL, the OOM killer, its node lost) ends the job as LOST with Ray's own
words (``WorkerCrashedError: The worker died unexpectedly ...``), which
``explain`` returns; the executor then runs a new attempt.

Environment: the job's ``spec.environment()`` goes to the task's
``runtime_env={"env_vars": ...}``, not into ``os.environ`` of a worker that has
run other jobs: Ray starts (and reuses) worker processes per distinct runtime
env, so the variables are there before the interpreter starts (thread caps such
as ``OMP_NUM_THREADS`` reach libraries that read them at import), and a worker
process never serves jobs of another environment, so one run's secret never sits
in a process that runs another run's calls. The price is one worker start
(about a second) per environment and node, then reused. The secret is then part
of the task's description, which whoever can reach the cluster can read (``ray
list tasks --detail``); such a person can run code on its workers anyway.

Resources: ``cpus``, ``gpus`` and ``memory`` become the task's ``num_cpus``,
``num_gpus`` and ``memory`` (bytes); ``working_dir`` is the folder the calls run
in. ``python``, ``image``, ``setup``, ``env_script``, ``walltime``, ``queue`` do
not apply (the task runs in the Ray worker's interpreter).

Connection: with ``address=None`` the backend starts a local Ray (``ray.init``
with ``num_cpus`` from ``max_workers`` or ``os.cpu_count()``) and shuts it down
at ``close``; with an address it connects a driver to that running cluster and
disconnects at ``close`` (the cluster runs on). If Ray is already initialised in
this process (by the user), the backend uses that connection and never shuts it
down. Ray allows one connection per process, so several backends of one process
share it: the one that started it is shut down when the last of them closes.

Ray task ids do not outlive the driver (its tasks die with it), so
``job_ids_outlive_client`` is False: ``batchpool status`` and ``cancel`` from
another process go by the store's markers and ``cancel.json``, as for Dask.
"""

from __future__ import annotations

import os
import re
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from batchpool.backends.base import (
    Backend,
    JobEvent,
    JobSpec,
    JobState,
    Notify,
    Resources,
    amount_mib,
    remember,
)
from batchpool.errors import BackendError, is_fatal

#: How many ended jobs the backend remembers the state of for ``status``.
FINISHED_MEMORY = 100_000
#: Failed and lost jobs whose explanation is kept for ``explain``.
EXPLAIN_MEMORY = 10_000
#: A Ray task id in hex (24 bytes in Ray 2.x; a range, for other versions).
_TASK_ID = re.compile(r"[0-9a-f]{16,64}")

# One job at a time per Ray worker process (Ray runs one task at a time in a worker
# process, but a threaded actor might not): fds 1/2 and the cwd are process-wide.
_job_lock = threading.Lock()

# The Ray connection of this process that a RayBackend made (ray.init allows one):
# how many open backends use it. The one that made it is shut down at the last close.
_connection_lock = threading.Lock()
_connection_users = 0


def _run_job(args: Sequence[str], working_dir: str | None = None) -> None:
    """Run one job in a Ray worker, as ``python -m batchpool.worker *args`` would.

    The job's environment is the worker's own (the task's ``runtime_env``). The
    outcome and the captured output go to the store; an exception here means the
    worker code itself failed (the store unreachable, a bad signature, ...).
    """
    from batchpool import worker

    with _job_lock:
        worker.run_job_here(args, dict(os.environ), working_dir)


def task_options(resources: Resources, env: dict[str, str]) -> dict[str, Any]:
    """The Ray ``.options()`` of a job's task: its resources, its environment, no retries."""
    options: dict[str, Any] = {
        "num_cpus": resources.cpus,
        "max_retries": 0,  # batchpool's max_attempts alone decides
        "retry_exceptions": False,
        "runtime_env": {"env_vars": dict(env)},
        "name": "batchpool-job",
    }
    if resources.gpus:
        options["num_gpus"] = resources.gpus
    if resources.memory is not None:
        options["memory"] = amount_mib(resources.memory, "Ray") * 1024 * 1024
    return options


class RayBackend(Backend):
    """Run each job as a Ray task.

    ``address`` is that of a running cluster (``"127.0.0.1:6379"``, ``"auto"``,
    ``"ray://head:10001"``): a driver connects to it and disconnects at ``close``.
    ``None`` starts a local Ray with ``max_workers`` CPUs (default: this machine's)
    and shuts it down at ``close``. A Ray already initialised in this process is
    used as it is and left running. ``init_options`` go to ``ray.init`` as they are
    (e.g. ``{"log_to_driver": False}``), and are never recorded in the run.
    """

    name = "ray"
    notifies = True
    bounded = False
    shares_client_code = False  # workers may be on other machines
    job_ids_outlive_client = False  # a driver's tasks die with it

    def __init__(
        self,
        address: str | None = None,
        *,
        max_workers: int | None = None,
        init_options: dict[str, Any] | None = None,
    ) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ImportError(
                "RayBackend needs the ray package: pip install 'batchpool[ray]'"
            ) from exc
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a Ray address string or None, not {address!r}")
        if max_workers is not None:
            max_workers = int(max_workers)  # from the command line, a string
            if max_workers < 1:
                raise ValueError(f"max_workers must be >= 1, not {max_workers}")
        self._ray = ray
        self._address = address
        self._lock = threading.Lock()
        self._refs: dict[str, Any] = {}  # job id -> ObjectRef, until the job ends
        self._notify: dict[str, Notify | None] = {}
        self._cancelled: set[str] = set()  # asked to cancel, not yet ended
        self._ended: dict[str, JobState] = {}
        self._why: dict[str, str] = {}
        self._closed = False
        self._remote: Any = ray.remote(_run_job)
        self._uses_connection = False
        global _connection_users
        with _connection_lock:
            if ray.is_initialized():
                # The user's connection, or one another RayBackend made (then it is
                # counted, and shut down when the last backend using it closes).
                if _connection_users:
                    _connection_users += 1
                    self._uses_connection = True
                return
            kwargs: dict[str, Any] = dict(init_options or {})
            if address is None:
                kwargs.setdefault("num_cpus", max_workers or os.cpu_count() or 1)
                kwargs.setdefault("include_dashboard", False)
            else:
                kwargs["address"] = address
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise BackendError(
                    f"could not connect to the Ray cluster at {address}: {exc}", transient=True
                ) from exc
            _connection_users = 1
            self._uses_connection = True

    def describe(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self._address is not None:
            options["address"] = self._address
        return {"name": self.name, "options": options}

    @classmethod
    def check_job_id(cls, job_id: str) -> None:
        if not isinstance(job_id, str) or not _TASK_ID.fullmatch(job_id):
            raise ValueError(f"{job_id!r} is not a Ray task id (hex) of the ray backend")

    def check_store(self, protocol: str, root: str) -> None:
        """Ray workers run in other processes (and machines): not a ``memory://`` store."""
        if protocol == "memory":
            raise ValueError(
                "a memory:// store lives in this process; Ray workers cannot reach it. "
                "Give storage= a folder every node mounts, or s3:// / gs://"
            )

    def max_parallel(self) -> int:
        try:
            cpus = self._ray.cluster_resources().get("CPU", 0)
        except Exception:
            return 64
        return max(1, int(cpus))

    def __repr__(self) -> str:
        return f"RayBackend({self._address!r})"

    # -- the contract ---------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        with self._lock:
            if self._closed:
                raise BackendError("this RayBackend is closed; create a new one to run jobs")
        self._check_connected()
        made: list[tuple[str, Any]] = []
        try:
            for spec in jobs:
                options = task_options(spec.resources, spec.environment())
                options["name"] = f"batchpool-{spec.name}"
                ref = self._remote.options(**options).remote(
                    tuple(spec.args), spec.resources.working_dir
                )
                made.append((ref.task_id().hex(), ref))
        except Exception as exc:
            self._cancel_refs([ref for _, ref in made])
            raise BackendError(
                f"Ray refused the jobs: {type(exc).__name__}: {exc}",
                transient=not self._ray.is_initialized(),
            ) from exc
        with self._lock:
            for job_id, ref in made:
                self._refs[job_id] = ref
                self._notify[job_id] = notify
        # Watched only once recorded: a task that ended already calls back at once.
        for job_id, ref in made:
            ref.future().add_done_callback(lambda f, job_id=job_id: self._done(job_id, f))
        return [job_id for job_id, _ in made]

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        self._check_connected()
        states: dict[str, JobState] = {}
        with self._lock:
            for job_id in job_ids:
                if job_id in self._ended:
                    states[job_id] = self._ended[job_id]
                elif job_id in self._refs:
                    # Queued or running: Ray's driver API does not tell them apart cheaply,
                    # and the end comes through the callback.
                    states[job_id] = JobState.PENDING
                else:
                    states[job_id] = JobState.LOST  # not of this driver: its tasks died with it
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        with self._lock:
            refs = []
            for job_id in job_ids:
                if job_id in self._refs:
                    refs.append(self._refs[job_id])
                    self._cancelled.add(job_id)
        self._cancel_refs(refs)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            refs = list(self._refs.values())
        self._cancel_refs(refs)
        global _connection_users
        with _connection_lock:
            if not self._uses_connection:
                return
            self._uses_connection = False
            _connection_users -= 1
            if _connection_users == 0:
                self._ray.shutdown()

    def explain(self, job_id: str) -> str:
        with self._lock:
            return self._why.get(job_id, "")

    # -- helpers --------------------------------------------------------------------------

    def _check_connected(self) -> None:
        if not self._ray.is_initialized():
            raise BackendError(
                "this process is no longer connected to Ray (ray.shutdown was called, or "
                "the connection to the cluster was lost)",
                transient=True,
            )

    def _cancel_refs(self, refs: Sequence[Any]) -> None:
        """Cancel tasks, killing the workers of those that run (``force=True``)."""
        for ref in refs:
            try:
                self._ray.cancel(ref, force=True)
            except Exception:
                pass  # it ended meanwhile, or Ray is gone: the callback says which

    # -- a task ended (in a thread of Ray's) ---------------------------------------------

    def _done(self, job_id: str, future: Any) -> None:
        from ray import exceptions as rex

        try:
            exc = future.exception()
        except BaseException as err:  # a future cancelled under us: its task's end is unknown
            exc = err
        if exc is None:
            self._end(job_id, JobState.SUCCEEDED)
            return
        with self._lock:
            asked = job_id in self._cancelled
        text = _ray_words(exc)
        if isinstance(exc, rex.TaskCancelledError):
            state = JobState.CANCELLED
            why = "cancelled by batchpool" if asked else f"Ray cancelled the task ({text})"
            self._end(job_id, state, why, why)
        elif isinstance(exc, rex.RayTaskError):
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            cause_text = f"{type(cause).__name__}: {cause}"
            if is_fatal(cause):  # a retry would fail the same way
                self._end(job_id, JobState.FAILED, cause_text, cause_text, fatal=True)
            else:
                tb = "".join(traceback.format_tb(cause.__traceback__)).rstrip("\n")
                self._end(job_id, JobState.FAILED, "the Ray task failed", f"{cause_text}\n{tb}")
        else:
            # WorkerCrashedError, NodeDiedError, OwnerDiedError, a lost object, ...:
            # the worker (or its node) died under the task, or Ray lost it.
            self._end(job_id, JobState.LOST, "the Ray worker running it died or was lost", text)

    def _end(
        self,
        job_id: str,
        state: JobState,
        why: str = "",
        detail: str = "",
        fatal: bool = False,
    ) -> None:
        with self._lock:
            if job_id in self._ended or job_id not in self._notify:
                return
            remember(self._ended, job_id, state, FINISHED_MEMORY)
            self._refs.pop(job_id, None)  # releases the task's (empty) result
            self._cancelled.discard(job_id)
            notify = self._notify.pop(job_id)
            if detail or why:
                remember(self._why, job_id, detail or why, EXPLAIN_MEMORY)
        if notify is not None:
            notify(JobEvent(job_id, state, reason=why, fatal=fatal))


def _ray_words(exc: BaseException) -> str:
    """What Ray said: the exception's type and its first lines."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {' '.join(lines[:3])}".strip()
