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
import threading
import traceback
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from batchpool.backends.base import Backend, JobEvent, JobSpec, JobState, Notify
from batchpool.documents import DocumentError, StartMarker
from batchpool.errors import BackendError, is_fatal

#: How many ended jobs the backend remembers the state of for ``status``.
FINISHED_MEMORY = 100_000
#: Failed and lost jobs whose explanation is kept for ``explain``.
EXPLAIN_MEMORY = 10_000

# One job at a time per worker process: environment and fds 1/2 are process-wide.
_job_lock = threading.Lock()


class DaskJobLost(RuntimeError):
    """Raised by a task that Dask ran again after the worker running it died."""


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
        if store.exists(mark):
            if store.exists(store.result_key(chunk, attempt)):
                return  # it finished before its worker died: nothing to do again
            try:
                before: StartMarker | None = store.get_document(StartMarker, mark, secret)
            except (FileNotFoundError, DocumentError):
                before = None  # not this run's own marker: it proves nothing
            if before is not None and before.failed is None:  # its worker died under it
                raise DaskJobLost(
                    f"the Dask worker that ran this job before (pid {before.pid} on "
                    f"{before.host}) died without writing its result; Dask ran the task "
                    "again, which batchpool counts as a lost attempt instead of running the "
                    "calls twice"
                )
        saved_env = {name: os.environ.get(name) for name in env}
        saved_cwd = os.getcwd() if working_dir else None
        capture = worker._Capture(own_file=True)
        saved_fds = capture._saved
        try:
            os.environ.update(env)
            if working_dir:
                os.chdir(working_dir)
            worker.run_job(args, env, capture)
        except SystemExit as exc:  # run_job's own "variable not set" messages
            raise BackendError(str(exc.code)) from None
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
            capture.restore()
            for fd in (capture._log, *(saved_fds or ())):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if saved_cwd is not None:
                os.chdir(saved_cwd)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


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
        ids = [f"batchpool-{spec.name}-{uuid.uuid4().hex[:8]}" for spec in jobs]
        futures = []
        for job_id, spec in zip(ids, jobs, strict=True):
            with self._lock:
                self._notify[job_id] = notify
            future = self._client.submit(
                _run_job,
                tuple(spec.args),
                spec.environment(),
                spec.resources.working_dir,
                key=job_id,
                pure=False,
                retries=self._retries,
                resources=self._resources,
            )
            with self._lock:
                self._futures[job_id] = future
            futures.append(future)
        for job_id, future in zip(ids, futures, strict=True):
            future.add_done_callback(lambda f, job_id=job_id: self._done(job_id, f))
        return ids

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
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
                    states[job_id] = JobState.CANCELLED
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
        if futures:
            self._client.cancel(futures)
        for job_id in job_ids:
            self._end(job_id, JobState.CANCELLED, "cancelled by batchpool")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = list(self._futures.values())
        if futures and self._client.status == "running":
            try:
                self._client.cancel(futures)
            except Exception:
                pass
        if self._owns_client:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    def explain(self, job_id: str) -> str:
        with self._lock:
            return self._why.get(job_id, "")

    def __repr__(self) -> str:
        return f"DaskBackend({self._client.scheduler.address if self._client else None!r})"

    # -- a task ended ---------------------------------------------------------------------

    def _done(self, job_id: str, future: Any) -> None:
        status = future.status
        if status == "finished":
            self._end(job_id, JobState.SUCCEEDED)
            return
        if status == "cancelled":
            self._end(job_id, JobState.CANCELLED, "the Dask task was cancelled")
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
            self._ended[job_id] = state
            while len(self._ended) > FINISHED_MEMORY:
                self._ended.pop(next(iter(self._ended)))
            self._futures.pop(job_id, None)  # releases the task on the cluster
            notify = self._notify.pop(job_id)
            if detail or why:
                self._why[job_id] = detail or why
                while len(self._why) > EXPLAIN_MEMORY:
                    self._why.pop(next(iter(self._why)))
        if notify is not None:
            notify(JobEvent(job_id, state, reason=why, fatal=fatal))
