"""Run jobs as tasks on a Dask cluster (``distributed``).

Each job is one Dask task that runs :func:`_run_job` on a Dask worker: the same
code ``python -m batchpool.worker`` runs, reading the chunk from and writing its
outcome (and the calls' output, to ``logs/``) to the run's store. The task itself
returns nothing, so a result survives a lost client connection and the cluster
keeps no data for us.

Retries: batchpool retries a job that ended without a result (up to the
executor's ``max_attempts``, each with a new attempt number); Dask must not
retry it behind our back, or one lost job would count as several runs of its
calls. So:

- tasks are submitted with ``retries=0`` (the ``retries`` argument changes it,
  for errors of the task itself: the calls' own exceptions are results and
  never fail the task);
- when a worker dies, the scheduler runs the task again elsewhere (up to its
  ``distributed.scheduler.allowed-failures``) before it gives up with
  ``KilledWorker``. A task marks its start in ``events/<chunk>.<attempt>.start``;
  a task that finds the mark of an earlier run of the same attempt and no
  result does not run the calls again: it fails at once as lost, and batchpool
  counts one lost attempt. (A cluster this backend starts itself sets
  ``allowed-failures`` to 0, so the scheduler reports the death directly.)

A lost scheduler (restarted, or the client's connection to it cut): the client
cancels every future it holds (reason ``scheduler-connection-lost``) and
reconnects, within its ``timeout``, to whatever scheduler answers at the same
address; Dask workers finish the tasks they run (up to the 30 s a closing worker
waits for its threads; a ``dask worker`` whose scheduler went away then exits,
and whatever supervises the workers must start them again). The backend does not
take such a cancellation for an end of the job: it hands the same job (the same
attempt) to the scheduler again, under a new key, up to ``MAX_RESUBMITS`` times.
That task finds the job's outcome in the store if the first run wrote it, waits
for the first run if its process still runs on the same machine, and runs the
calls only when the first run never began. A task still waiting in a worker for
the job before it when that worker starts closing, or when the scheduler releases
it (its client went away), does not start its job. A first run that died (or runs
on another machine, which a task cannot check) counts as one lost attempt, as
above. So no call runs twice because the client lost sight of it.

A client that could not reconnect within its ``timeout`` closes itself (and
cancels its futures again). The backend then makes a new client to the same
scheduler address (closed by ``close``, whoever made the first one) and hands
the jobs over through it; while no scheduler answers there, ``status`` and
``submit`` raise a transient ``BackendError``, so the executor takes the jobs'
states for unknown, reads the store meanwhile, and asks again (within its
``engine_outage_grace``).

Within one Dask worker process the jobs run one at a time: a job sets its
environment variables and captures file descriptors 1 and 2, which belong to
the whole process. ``max_parallel`` is therefore the number of worker processes.

A ``distributed.Client`` given to the backend is never closed; a client made
from a scheduler address, and a ``LocalCluster`` started when none is given,
are closed by ``close``. ``Resources.python``, ``image``, ``setup`` and
``env_script`` do not apply (the task runs in the Dask worker's interpreter);
``env`` and ``working_dir`` do.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from batchpool.backends.base import Backend, JobEvent, JobSpec, JobState, Notify, remember
from batchpool.documents import DocumentError, StartMarker
from batchpool.errors import BackendError, is_fatal
from batchpool.processes import boot_id, same_process
from batchpool.store import Store

#: How many ended jobs the backend remembers the state of for ``status``.
FINISHED_MEMORY = 100_000
#: Failed and lost jobs whose explanation is kept for ``explain``.
EXPLAIN_MEMORY = 10_000
#: How many times one job is handed to the scheduler again after the client lost it.
MAX_RESUBMITS = 5
#: Seconds between looks at an earlier run of the same attempt that still runs.
EARLIER_RUN_POLL = 1.0
#: Seconds a new client, made when one closed itself, may take to reach the scheduler.
RECONNECT_TIMEOUT = 10.0

# One job at a time per worker process: environment and fds 1/2 are process-wide.
_job_lock = threading.Lock()


class DaskJobLost(RuntimeError):
    """Raised by a task that Dask ran again after the worker running it died, or that
    its worker no longer wants (see ``_abandoned``): batchpool counts a lost attempt."""


def _run_job(args: Sequence[str], env: Mapping[str, str], working_dir: str | None = None) -> None:
    """Run one job on a Dask worker, as ``python -m batchpool.worker *args`` with ``env`` would.

    The outcome and the captured output go to the store; an exception here means
    the worker code itself failed (the store unreachable, a bad signature, ...).
    """
    from batchpool import worker

    parsed = worker._job_parser().parse_args(list(args))
    store, secret = worker._store_from_env(env)
    chunk, attempt = parsed.chunk, parsed.attempt
    mark = store.start_key(chunk, attempt)  # the worker writes it as it starts
    with _job_lock:
        abandoned = _abandoned()
        if abandoned is not None:  # e.g. it waited for the lock while the scheduler went
            _say(f"attempt {attempt} of chunk {chunk} is not started: {abandoned}")
            raise DaskJobLost(f"the job was not started: {abandoned}")
        if store.exists(mark):
            result = store.result_key(chunk, attempt)
            try:
                before: StartMarker | None = store.get_document(StartMarker, mark, secret)
            except (FileNotFoundError, DocumentError):
                before = None  # not this run's own marker: it proves nothing
            if (
                before is not None
                and before.failed is None
                and not store.exists(result)
                and _still_running(before)
            ):
                _say(
                    f"attempt {attempt} of chunk {chunk} still runs in process {before.pid} "
                    "of this machine (Dask handed its task over again): waiting for it"
                )
                _wait_for_earlier_run(store, chunk, attempt, before)
            if store.exists(result):
                # It finished before its worker died, or before the client heard of it.
                _say(
                    f"attempt {attempt} of chunk {chunk} already has its result, written "
                    "by an earlier run of its task; its calls are not run again"
                )
                return
            if before is not None and before.failed is None:  # its worker died under it
                raise DaskJobLost(
                    f"the Dask worker that ran this job before (pid {before.pid} on "
                    f"{before.host}) died without writing its result; Dask ran the task "
                    "again, which batchpool counts as a lost attempt instead of running the "
                    "calls twice"
                )
        saved_env = {name: os.environ.get(name) for name in env}
        try:
            os.environ.update(env)
            worker.run_job_here(args, env, working_dir)
        except BaseException as exc:
            # A failure of the task itself (not of a call): say so in the mark, so
            # a retry the user asked Dask for (``retries=``) runs the job again.
            failed = StartMarker(
                chunk=chunk, attempt=attempt, failed=f"{type(exc).__name__}: {exc}"
            )
            try:
                store.put_document(mark, failed, secret)
            except Exception:
                pass
            raise
        finally:
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _abandoned() -> str | None:
    """Why the Dask worker running this task no longer wants it, if it does not: it
    is closing (it lost its scheduler), or the scheduler released the task (its
    client went away). Such a task's outcome reaches nobody, and Dask has handed the
    job, or will hand it, to a worker again: it must not run the calls as well."""
    try:
        from distributed.utils import thread_state
        from distributed.worker import WORKER_ANY_RUNNING, get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask task
        return None
    if worker.status not in WORKER_ANY_RUNNING:
        return f"its Dask worker is {worker.status.name} (its scheduler is gone, or it shuts down)"
    key = getattr(thread_state, "key", None)
    task = worker.state.tasks.get(key) if key is not None else None
    if task is None or task.state in ("cancelled", "released", "forgotten"):
        return "the scheduler released the task (its client went away)"
    return None


def _say(text: str) -> None:
    """A line in the Dask worker's log (its stderr), as ``batchpool.worker`` writes."""
    sys.stderr.write(f"batchpool: {text}\n")
    sys.stderr.flush()


def _still_running(before: StartMarker) -> bool:
    """Whether the run that wrote ``before`` is another live process of this machine.
    (A run in this process ended before ``_job_lock`` was ours; one on another machine
    cannot be checked from here.)"""
    if before.pid is None or before.pid == os.getpid():
        return False
    if before.host != socket.gethostname() or before.boot_id != boot_id():
        return False
    return bool(same_process(before.pid, before.pid_started))


def _wait_for_earlier_run(store: Store, chunk: str, attempt: int, before: StartMarker) -> None:
    """Wait until the earlier run of this attempt ends: its result or its end marker
    is written, or its process is gone (it may serve other jobs long after)."""
    ended = (store.result_key(chunk, attempt), store.end_key(chunk, attempt))
    while same_process(before.pid, before.pid_started) and not any(
        store.exists(key) for key in ended
    ):
        time.sleep(EARLIER_RUN_POLL)


class DaskBackend(Backend):
    """Run each job as a task on a Dask cluster.

    ``client_or_address`` is a ``distributed.Client`` (never closed by this
    backend), a scheduler address such as ``"tcp://10.0.0.5:8786"`` (a client
    is made and closed with the backend), or ``None``: a ``LocalCluster`` of two
    single-threaded worker processes on 127.0.0.1 (its dashboard on a free port)
    is started and closed with the backend. ``retries`` are Dask's retries of a
    failed task (default 0: batchpool retries lost jobs itself, see the module's
    notes); ``resources`` are Dask worker resources each task needs, e.g.
    ``{"GPU": 1}``.
    """

    name = "dask"
    notifies = True
    bounded = False
    shares_client_code = False  # workers may be on other machines

    def __init__(
        self,
        client_or_address: Any = None,
        *,
        retries: int = 0,
        resources: Mapping[str, float] | None = None,
    ) -> None:
        try:
            import dask
            import distributed
        except ImportError as exc:
            raise ImportError(
                "DaskBackend needs the distributed package: pip install 'batchpool[dask]'"
            ) from exc
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        self._retries = retries
        self._resources = dict(resources) if resources else None
        self._cluster: Any = None
        self._owns_client = True
        if client_or_address is None:
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = distributed.LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    host="127.0.0.1",
                    dashboard_address=":0",  # a free port: no clash with another cluster
                    processes=True,
                )
            try:
                self._client = distributed.Client(self._cluster, set_as_default=False)
            except BaseException:
                self._cluster.close()
                raise
        elif isinstance(client_or_address, str):
            self._client = distributed.Client(client_or_address, set_as_default=False)
        elif isinstance(client_or_address, distributed.Client):
            self._client = client_or_address
            self._owns_client = False
        else:
            raise TypeError(
                "DaskBackend takes a distributed.Client, a scheduler address or None, not "
                f"{type(client_or_address).__name__}"
            )
        self._lock = threading.Lock()
        self._futures: dict[str, Any] = {}  # job id -> distributed.Future, until it ends
        # job id -> what submit gave the task, to hand it over again (see the notes).
        self._tasks: dict[str, tuple[tuple[str, ...], dict[str, str], str | None]] = {}
        self._resubmits: dict[str, int] = {}
        # Jobs whose client closed itself before they were handed over again: status()
        # makes a new client to the same scheduler and hands them over.
        self._orphans: set[str] = set()
        self._address: str | None = _scheduler_address(self._client)
        self._first_client = self._client  # closed by close() only if made here
        self._made_clients: list[Any] = []  # made again after a client closed itself
        self._reconnect_lock = threading.Lock()
        self._notify: dict[str, Notify | None] = {}
        self._ended: dict[str, JobState] = {}
        self._why: dict[str, str] = {}
        self._closed = False

    @property
    def client(self) -> Any:
        return self._client

    def max_parallel(self) -> int:
        try:
            workers = self._client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:  # older distributed: no n_workers argument
            workers = self._client.scheduler_info()["workers"]
        except Exception:
            return 64
        # One job at a time per worker process (see the module's notes).
        return max(1, sum(1 for w in workers.values() if w.get("nthreads", 1) > 0))

    # -- the contract ---------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        with self._lock:
            if self._closed:
                raise BackendError("this DaskBackend is closed; create a new one to run jobs")
        self._live_client()  # a BackendError (transient) while the scheduler is away
        ids = [f"batchpool-{spec.name}-{uuid.uuid4().hex[:8]}" for spec in jobs]
        futures = []
        try:
            for job_id, spec in zip(ids, jobs, strict=True):
                task = (tuple(spec.args), spec.environment(), spec.resources.working_dir)
                with self._lock:
                    self._notify[job_id] = notify
                    self._tasks[job_id] = task
                future = self._submit_task(job_id, job_id, task)
                with self._lock:
                    self._futures[job_id] = future
                futures.append(future)
        except Exception as exc:  # the client closed itself meanwhile: none of them ran
            with self._lock:
                gone = [self._futures.pop(j) for j in ids if j in self._futures]
                for job_id in ids:
                    self._notify.pop(job_id, None)
                    self._tasks.pop(job_id, None)
            _cancel(gone)
            raise BackendError(
                f"the Dask client could not hand the jobs to its scheduler: "
                f"{type(exc).__name__}: {exc}",
                transient=self._client.status in ("connecting", "closing", "closed"),
            ) from exc
        for job_id, future in zip(ids, futures, strict=True):
            self._watch(job_id, future)
        return ids

    def _live_client(self) -> Any:
        """The client; a new one to the same scheduler when it closed itself (it could
        not reconnect within its ``timeout``). A transient ``BackendError`` while the
        scheduler cannot be reached, so the executor asks again (engine_outage_grace)."""
        with self._reconnect_lock:
            client = self._client
            if client.status not in ("closing", "closed") or self._closed:
                return client
            if self._address is None:
                raise BackendError("the Dask client is closed, and its scheduler is unknown")
            import distributed

            try:
                new = distributed.Client(
                    self._address, set_as_default=False, timeout=RECONNECT_TIMEOUT
                )
            except Exception as exc:
                raise BackendError(
                    f"the Dask client lost its scheduler at {self._address} and closed itself; "
                    f"a new client cannot reach it: {type(exc).__name__}: {exc}",
                    transient=True,
                ) from exc
            self._client = new
            self._made_clients.append(new)
            return new

    def _submit_task(
        self, job_id: str, key: str, task: tuple[tuple[str, ...], dict[str, str], str | None]
    ) -> Any:
        args, env, working_dir = task
        return self._live_client().submit(
            _run_job,
            args,
            env,
            working_dir,
            key=key,
            pure=False,
            retries=self._retries,
            resources=self._resources,
        )

    def _watch(self, job_id: str, future: Any) -> None:
        future.add_done_callback(lambda f, job_id=job_id: self._done(job_id, f))

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        self._adopt_orphans()  # a BackendError (transient) while the scheduler is away
        states: dict[str, JobState] = {}
        with self._lock:
            for job_id in job_ids:
                if job_id in self._ended:
                    states[job_id] = self._ended[job_id]
                    continue
                future = self._futures.get(job_id)
                if future is None:
                    states[job_id] = JobState.LOST
                    continue
                status = future.status
                if status == "finished":
                    states[job_id] = JobState.SUCCEEDED
                elif status == "cancelled":
                    # Not by batchpool (its cancels are in _ended): the client lost the
                    # scheduler, and the callback hands the job over again.
                    states[job_id] = JobState.PENDING
                elif status == "error":
                    states[job_id] = JobState.FAILED  # the callback tells LOST from FAILED
                elif status == "lost":
                    states[job_id] = JobState.LOST
                else:
                    states[job_id] = JobState.PENDING
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        with self._lock:
            futures = [self._futures[j] for j in job_ids if j in self._futures]
        # Ended first: the callbacks of these futures must not take the cancellation
        # for a lost scheduler and hand the jobs over again.
        for job_id in job_ids:
            self._end(job_id, JobState.CANCELLED, "cancelled by batchpool")
        _cancel(futures)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = list(self._futures.values())
        try:
            _cancel(futures)
        except Exception:
            pass
        for client in self._made_clients:
            client.close()
        if self._owns_client:
            self._first_client.close()
        if self._cluster is not None:
            self._cluster.close()

    def explain(self, job_id: str) -> str:
        with self._lock:
            return self._why.get(job_id, "")

    def __repr__(self) -> str:
        return f"DaskBackend({self._address!r})"

    # -- a task ended ---------------------------------------------------------------------

    def _done(self, job_id: str, future: Any) -> None:
        if not self._is_current(job_id, future):
            return  # ended already (cancelled by batchpool), or handed over again
        status = future.status
        if status == "finished":
            self._end(job_id, JobState.SUCCEEDED)
            return
        if status == "cancelled":  # not by batchpool: see ``cancel``
            self._lost_sight(job_id, _cancel_reason(future))
            return
        try:
            exc = future.exception()
            tb = future.traceback()
        except BaseException as err:  # the client lost its scheduler, or the task vanished
            self._end(job_id, JobState.LOST, "the Dask task's state is unknown", repr(err))
            return
        from distributed.scheduler import KilledWorker

        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, KilledWorker | DaskJobLost):
            self._end(job_id, JobState.LOST, "the Dask worker running it died", text)
        elif is_fatal(exc):  # a retry would fail the same way
            self._end(job_id, JobState.FAILED, text, text, fatal=True)
        else:
            if tb is not None:
                text += "\n" + "".join(traceback.format_tb(tb)).rstrip("\n")
            self._end(job_id, JobState.FAILED, "the Dask task failed", text)

    def _is_current(self, job_id: str, future: object) -> bool:
        with self._lock:
            return self._futures.get(job_id) is future

    def _lost_sight(self, job_id: str, reason: str) -> None:
        """The client cancelled the task without being asked (it lost its scheduler):
        hand the same job to the scheduler again, or end it as lost."""
        why = f"the Dask client cancelled the task ({reason})"
        with self._lock:
            resubmits = self._resubmits.get(job_id, 0)
            known = job_id in self._tasks
            closed = self._closed
        if closed or not known:
            self._end(job_id, JobState.CANCELLED, why)
        elif resubmits >= MAX_RESUBMITS:
            more = f"{why}; handed over {resubmits} times already"
            self._end(job_id, JobState.LOST, more, more)
        elif self._client.status in ("closing", "closed"):
            self._orphan(job_id)  # it could not reconnect: status() makes a new client
        else:
            self._hand_over(job_id, why)

    def _orphan(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._notify and job_id not in self._ended:
                self._orphans.add(job_id)

    def _adopt_orphans(self) -> None:
        """Hand over again the jobs of a client that closed itself, through a new one."""
        with self._lock:
            if not self._orphans and self._client.status not in ("closing", "closed"):
                return
        self._live_client()
        with self._lock:
            orphans, self._orphans = self._orphans, set()
        for job_id in sorted(orphans):  # the order they were submitted in
            self._hand_over(job_id, "the Dask client closed itself and was made again")

    def _hand_over(self, job_id: str, why: str) -> None:
        """Submit the same job (the same attempt) again, under a new key."""
        with self._lock:
            resubmits = self._resubmits.get(job_id, 0)
            task = self._tasks.get(job_id)
        if task is None:  # it ended meanwhile
            return
        try:
            future = self._submit_task(job_id, f"{job_id}-again{resubmits + 1}", task)
        except BackendError as exc:
            if exc.transient:  # the client closed itself meanwhile
                self._orphan(job_id)
                return
            detail = f"{why}; handing it over again failed: {exc}"
            self._end(job_id, JobState.LOST, detail, detail)
            return
        except Exception as exc:
            if self._client.status in ("closing", "closed"):
                self._orphan(job_id)
                return
            detail = f"{why}; handing it over again failed: {type(exc).__name__}: {exc}"
            self._end(job_id, JobState.LOST, detail, detail)
            return
        with self._lock:
            ended = job_id in self._ended or job_id not in self._notify
            if not ended:
                self._resubmits[job_id] = resubmits + 1
                self._futures[job_id] = future
        if ended:  # cancelled by batchpool in between
            _cancel([future])
            return
        self._watch(job_id, future)

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
            self._futures.pop(job_id, None)  # releases the task on the cluster
            self._tasks.pop(job_id, None)
            self._resubmits.pop(job_id, None)
            self._orphans.discard(job_id)
            notify = self._notify.pop(job_id)
            if detail or why:
                remember(self._why, job_id, detail or why, EXPLAIN_MEMORY)
        if notify is not None:
            notify(JobEvent(job_id, state, reason=why, fatal=fatal))


def _cancel_reason(future: Any) -> str:
    """Why Dask cancelled ``future`` ("scheduler-connection-lost", ...), as it says."""
    exception = getattr(getattr(future, "_state", None), "exception", None)
    reason = getattr(exception, "reason", None)
    return str(reason) if reason else "no reason given"


def _cancel(futures: Sequence[Any]) -> None:
    """Cancel Dask futures, through the client each belongs to (one message per client)."""
    by_client: dict[int, tuple[Any, list[Any]]] = {}
    for future in futures:
        by_client.setdefault(id(future.client), (future.client, []))[1].append(future)
    for client, group in by_client.values():
        if client.status in ("running", "connecting"):
            client.cancel(group)


def _scheduler_address(client: Any) -> str | None:
    """The address of the scheduler ``client`` talks to, if it says."""
    try:
        address = client.scheduler.address
    except AttributeError:
        return None
    return address if isinstance(address, str) else None
