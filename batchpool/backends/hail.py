"""Run jobs on Hail Batch (``hailtop.batch``): the Hail Batch service, or hailtop's LocalBackend.

``hailtop`` ships inside the ``hail`` wheel (``pip install hail``); this module
imports it only when a backend is made.

The service (``hb.ServiceBackend``)
    Each hand-over is one ``hb.Batch`` with one bash job per chunk, submitted with
    ``run(wait=False)``; job ids are ``"<batch id>:<job id>"`` and outlive the client
    (``attach`` finds the batch again with ``hb.Batch.from_batch_id``). A job runs
    ``python3 -m batchpool.worker ...`` (``Resources.python`` if given) in
    ``Resources.image``, which is required: the service's default image has no
    batchpool. ``status`` lists each batch's jobs once per call. The service cancels
    whole batches only, so ``cancel`` cancels a batch when every unfinished job of it
    is to be cancelled, and otherwise says in a log warning that the others cannot be
    cancelled one by one, and leaves them. Jobs get ``n_max_attempts=1``: batchpool
    retries lost jobs itself.

    hailtop's client binds its HTTP session to the event loop of the thread that first
    uses it (``async_to_blocking`` runs one loop per thread), and batchpool calls a
    backend from several threads (the watcher, ``shutdown``, ``attach``). So every
    service call goes through one thread of this backend, which also makes the
    ServiceBackend when none is given; a ServiceBackend handed in should not be used
    elsewhere at the same time. (hailtop applies ``nest_asyncio``, which patches
    asyncio for the whole process: that is hailtop's doing, with either backend.)

hailtop's LocalBackend (``hb.LocalBackend``)
    ``Batch.run()`` blocks and runs a batch's jobs one at a time, reporting failures
    only when the whole batch ends. To learn of each job's end as it happens, every
    job is its own one-job ``hb.Batch``, run by a runner thread of this backend
    (``parallel`` threads, default 1; the backend is ``bounded``): when ``run()``
    returns, that job has ended, and the exit status is the one of its command
    (``CalledProcessError.returncode``). A ``JobEvent`` is pushed through ``notify``
    at once. This is simpler and more reliable than watching exit files of jobs that
    share a batch. Job ids are ``"local-<hex>-<n>"`` and die with the client.

    LocalBackend writes ``j.env`` values unquoted into its bash script (a value with
    spaces breaks), and prints the whole script when a job fails. So the job's
    environment (which holds the run secret) is written, shell-quoted, to a private
    file (mode 0600) that the job sources as a hailtop input file; the script names
    only that file. Without an image the worker runs with this machine's Python
    (``spec.command()``), its output goes to a private log file whose tail
    ``explain`` quotes, and ``cancel`` stops a running job with SIGTERM. With an image
    LocalBackend runs ``docker run`` (pass it ``extra_docker_run_flags`` that mount the
    store); a running container cannot be cancelled (queued jobs can), and its output
    goes to this process's stdout. LocalBackend enforces neither timeouts nor cpu and
    memory without an image; it prints ``Batch completed successfully!`` per job.

``Resources``: ``cpus``, ``memory`` (Hail's notation: ``"4Gi"``, ``"standard"``,
``"highmem"``), ``walltime`` (``[[H:]M:]S`` or seconds, as the job's timeout),
``image``, ``python``, ``setup``, ``env_script``, ``env`` and ``working_dir`` apply;
``gpus`` is refused (Hail Batch has none); ``queue``, ``account`` and ``extra_args``
are ignored.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from batchpool.backends.base import Backend, JobEvent, JobSpec, JobState, Notify, signal_name
from batchpool.errors import FATAL_EXIT_CODE, BackendError

#: Seconds one request to the Hail Batch service (with hailtop's own retries) may
#: take before it counts as the service being unreachable.
COMMAND_TIMEOUT = 300.0

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The service's job states, in batchpool's words.
SERVICE_STATES: dict[str, JobState] = {
    "Pending": JobState.PENDING,
    "Ready": JobState.PENDING,
    "Creating": JobState.RUNNING,
    "Running": JobState.RUNNING,
    "Success": JobState.SUCCEEDED,
    "Failed": JobState.FAILED,
    "Error": JobState.FAILED,
    "Cancelled": JobState.CANCELLED,
}
#: How much of a job's log ``explain`` quotes.
LOG_TAIL = 4000
#: How long cancelling a LocalBackend job that just started waits for its worker's pid.
STOP_WAIT = 30.0
#: How many ended local jobs the backend remembers the state and explanation of.
FINISHED_MEMORY = 100_000


def _import_hailtop() -> Any:
    try:
        import hailtop.batch as hb
    except ImportError as exc:
        raise ImportError(
            "HailBatchBackend needs hailtop, which ships inside the hail package: pip install hail"
        ) from exc
    return hb


def _timeout_seconds(walltime: str | None) -> float | None:
    """``"01:30:00"``, ``"90:00"``, ``"5400"`` as seconds; None for None."""
    if walltime is None:
        return None
    parts = str(walltime).strip().split(":")
    try:
        if len(parts) > 3:
            raise ValueError
        seconds = 0.0
        for part in parts:
            seconds = seconds * 60 + float(part)
    except ValueError:
        raise ValueError(
            f"walltime={walltime!r}: Hail Batch takes a timeout as [[H:]M:]S or seconds"
        ) from None
    if seconds <= 0:
        raise ValueError(f"walltime={walltime!r} must be positive")
    return seconds


def _tail(text: str) -> str:
    return text[-LOG_TAIL:].strip("\n")


def _exit_words(code: int) -> str:
    if code == FATAL_EXIT_CODE:
        return f"exit code {code}: the worker says running it again cannot help"
    if code > 128:
        return f"exit code {code} (killed by {signal_name(code - 128)})"
    return f"exit code {code}"


@dataclass
class _LocalJob:
    id: str
    spec: JobSpec
    notify: Notify | None
    state: JobState = JobState.PENDING
    cancelled: bool = False
    pid_file: str = ""


class HailBatchBackend(Backend):
    """Run each job as a Hail Batch job.

    ``backend`` is a ``hailtop.batch`` backend (``hb.ServiceBackend`` or
    ``hb.LocalBackend``, never closed by this backend), ``"local"`` (a
    ``hb.LocalBackend()``) or None: a ``hb.ServiceBackend(billing_project=...,
    remote_tmpdir=..., regions=...)`` made here and closed by ``close``. ``regions``
    also applies per job when a ServiceBackend is given. ``name`` names the service's
    batches (default: the first job's name). ``parallel`` is how many jobs run at
    once: LocalBackend's runner threads (default 1), or a sizing hint for the service
    (default 64). See the module's notes.
    """

    name = "hail"
    notifies = False  # the service is polled; a LocalBackend pushes (set per instance)
    bounded = False
    shares_client_code = False
    job_ids_outlive_client = True  # the service's; False per instance with LocalBackend
    #: The service bills the cores a job's memory implies, 3.75 GB each (its docs'
    #: "Billing": 1 CPU and 7 GB bills 2 cores); a LocalBackend bills nothing (None).
    memory_per_core: ClassVar[float | None] = 3.75

    def __init__(
        self,
        backend: Any = None,
        *,
        billing_project: str | None = None,
        remote_tmpdir: str | None = None,
        regions: Sequence[str] | None = None,
        name: str | None = None,
        parallel: int | None = None,
    ) -> None:
        hb = _import_hailtop()
        self._hb = hb
        if parallel is not None and (
            not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1
        ):
            raise ValueError(f"parallel must be an int >= 1, not {parallel!r}")
        self._regions = list(regions) if regions is not None else None
        self._billing_project = billing_project
        self._remote_tmpdir = remote_tmpdir
        self._batch_name = name
        self._owns_backend = False
        # All service calls run here: see the module's notes.
        self._hail_thread = ThreadPoolExecutor(1, thread_name_prefix="batchpool-hailtop")
        if backend is None:
            try:
                backend = self._call(
                    hb.ServiceBackend,
                    billing_project=billing_project,
                    remote_tmpdir=remote_tmpdir,
                    regions=self._regions,
                )
            except BaseException:
                self._hail_thread.shutdown(wait=False)
                raise
            self._owns_backend = True
        elif backend == "local":
            backend = hb.LocalBackend()
            self._owns_backend = True
        elif not isinstance(backend, hb.ServiceBackend | hb.LocalBackend):
            self._hail_thread.shutdown(wait=False)
            raise TypeError(
                "HailBatchBackend takes a hailtop.batch ServiceBackend or LocalBackend, "
                f"'local' or None, not {type(backend).__name__}"
            )
        self._backend = backend
        self._local = isinstance(backend, hb.LocalBackend)
        self._parallel = parallel or (1 if self._local else 64)
        self._lock = threading.Lock()
        self._closed = False
        # the service
        self._batches: dict[int, Any] = {}  # batch id -> hailtop.batch_client.client.Batch
        # a LocalBackend
        self._jobs: dict[str, _LocalJob] = {}
        self._ended: dict[str, JobState] = {}
        self._why: dict[str, str] = {}
        self._queue: queue.Queue[_LocalJob | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._token = secrets.token_hex(6)
        self._seq = itertools.count(1)
        self._dir = ""
        if self._local:
            # Per instance: a LocalBackend's jobs end with this process and push their ends.
            self.notifies = True  # type: ignore[misc]
            self.bounded = True  # type: ignore[misc]
            self.job_ids_outlive_client = False  # type: ignore[misc]
            self.memory_per_core = None  # type: ignore[misc]
            self._dir = tempfile.mkdtemp(prefix="batchpool-hail-")  # mode 0700

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in this backend's hailtop thread."""
        if threading.current_thread().name.startswith("batchpool-hailtop"):
            return fn(*args, **kwargs)
        try:
            return self._hail_thread.submit(fn, *args, **kwargs).result(COMMAND_TIMEOUT)
        except TimeoutError as exc:  # hailtop keeps retrying what it deems transient
            raise BackendError(
                f"the Hail Batch service did not answer {getattr(fn, '__name__', fn)} within "
                f"{COMMAND_TIMEOUT:g} s (hailtop retries transient errors); is it reachable?",
                transient=True,
            ) from exc

    @property
    def hail_backend(self) -> Any:
        """The ``hailtop.batch`` backend the jobs go to."""
        return self._backend

    def describe(self) -> dict[str, Any]:
        if self._local:
            return {"name": self.name, "options": {"backend": "local"}}
        options: dict[str, Any] = {}
        billing = self._billing_project or getattr(self._backend, "_billing_project", None)
        tmpdir = self._remote_tmpdir or getattr(self._backend, "remote_tmpdir", None)
        if billing:
            options["billing_project"] = billing
        if tmpdir:
            options["remote_tmpdir"] = tmpdir
        if self._regions is not None:
            options["regions"] = self._regions
        if self._batch_name:
            options["name"] = self._batch_name
        return {"name": self.name, "options": options}

    @classmethod
    def check_job_id(cls, job_id: str) -> None:
        if isinstance(job_id, str):
            batch, colon, job = job_id.partition(":")
            if colon and batch.isdigit() and job.isdigit() and batch.isascii() and job.isascii():
                return
            head, _, tail = job_id.rpartition("-")
            if head.startswith("local-") and tail.isdigit() and tail.isascii():
                hexpart = head[len("local-") :]
                if hexpart and all(c in "0123456789abcdef" for c in hexpart):
                    return
        raise ValueError(
            f"{job_id!r} is not a job id of the hail backend ('<batch id>:<job id>' or "
            "'local-<hex>-<n>')"
        )

    def check_store(self, protocol: str, root: str) -> None:
        if protocol == "memory":
            raise ValueError(
                "Hail Batch jobs are other processes: they cannot reach the 'memory' store of "
                "this one; use a folder (with a LocalBackend) or a cloud store"
            )
        if not self._local and protocol in ("file", "local"):
            raise ValueError(
                f"the Hail Batch service's jobs cannot reach a {protocol!r} store ({root}); "
                "use a cloud store (gs://, s3://, ...) that the jobs' image can read"
            )

    def max_parallel(self) -> int:
        return self._parallel

    def __repr__(self) -> str:
        return f"HailBatchBackend({type(self._backend).__name__})"

    # -- building a job -------------------------------------------------------------------

    def _argv(self, spec: JobSpec) -> list[str]:
        res = spec.resources
        if res.image is None:
            return spec.command()
        python = res.python or "python3"
        argv = [python] if isinstance(python, str) else list(python)
        return [*argv, "-m", "batchpool.worker", *spec.args]

    def _script_head(self, spec: JobSpec) -> list[str]:
        res = spec.resources
        lines: list[str] = []
        if res.env_script:
            lines.append(f". {shlex.quote(res.env_script)}")
        lines.extend(res.setup)
        if res.working_dir:
            lines.append(f"cd {shlex.quote(res.working_dir)}")
        return lines

    def _new_job(self, batch: Any, spec: JobSpec) -> Any:
        res = spec.resources
        if res.gpus:
            raise ValueError("Hail Batch jobs have no GPUs: job option gpus must be 0")
        job = batch.new_job(name=spec.name)
        if res.image is not None:
            job.image(res.image)
        job.cpu(res.cpus)
        if res.memory is not None:
            job.memory(res.memory)
        timeout = _timeout_seconds(res.walltime)
        if timeout is not None:
            job.timeout(timeout)
        job.n_max_attempts(1)
        return job

    # -- the contract ---------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        with self._lock:
            if self._closed:
                raise BackendError("this HailBatchBackend is closed; create a new one to run jobs")
        if not jobs:
            return []
        if self._local:
            return self._submit_local(jobs, notify)
        return self._call(self._submit_service, jobs)

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        if self._local:
            with self._lock:
                return {
                    j: (
                        self._ended[j]
                        if j in self._ended
                        else self._jobs[j].state
                        if j in self._jobs
                        else JobState.LOST
                    )
                    for j in job_ids
                }
        states: dict[str, JobState] = {}
        for batch_id, wanted in self._by_batch(job_ids).items():
            listed = self._call(self._list_jobs, batch_id)
            for job_id, number in wanted.items():
                entry = listed.get(number)
                states[job_id] = (
                    JobState.LOST
                    if entry is None
                    else SERVICE_STATES.get(str(entry.get("state")), JobState.PENDING)
                )
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        if self._local:
            for job_id in job_ids:
                self._cancel_local(job_id)
            return
        self._call(self._cancel_service, job_ids)

    def _cancel_service(self, job_ids: Sequence[str]) -> None:
        for batch_id, wanted in self._by_batch(job_ids).items():
            listed = self._list_jobs(batch_id)
            unfinished = {
                number
                for number, entry in listed.items()
                if not SERVICE_STATES.get(str(entry.get("state")), JobState.PENDING).is_final
            }
            if not unfinished & set(wanted.values()):
                continue  # nothing of ours still runs
            others = unfinished - set(wanted.values())
            if others:
                log.warning(
                    "Hail Batch cancels whole batches only: batch %s keeps %d other unfinished "
                    "job(s) (%s) that are not to be cancelled, so its jobs %s are left to run",
                    batch_id,
                    len(others),
                    ", ".join(str(n) for n in sorted(others)[:10]),
                    ", ".join(str(n) for n in sorted(set(wanted.values()) & unfinished)),
                )
                continue
            try:
                self._batch(batch_id).cancel()
            except Exception as exc:
                raise BackendError(f"Hail Batch could not cancel batch {batch_id}: {exc}") from exc

    def explain(self, job_id: str) -> str:
        if self._local:
            with self._lock:
                return self._why.get(job_id, "")
        return self._call(self._explain_service, job_id)

    def _explain_service(self, job_id: str) -> str:
        try:
            batch_id, number = self._split(job_id)
            batch = self._batch(batch_id)
            status = batch.get_job(number).status()
        except Exception as exc:
            return f"Hail Batch job {job_id}: its state is unknown ({type(exc).__name__}: {exc})"
        words = [f"Hail Batch job {job_id} ended {status.get('state')}"]
        code = status.get("exit_code")
        if code is None:
            try:
                from hailtop.batch_client.client import Job

                code = Job.exit_code(status)
            except Exception:
                code = None
        if isinstance(code, int):
            words.append(_exit_words(code))
        error = _service_error(status)
        if error:
            words.append(f"the service says: {error}")
        text = "; ".join(words)
        try:
            logs = batch.get_job_log(number)
        except Exception as exc:
            return f"{text}\n(no log: {type(exc).__name__}: {exc})"
        if isinstance(logs, dict):
            main = logs.get("main")
            chosen = main if isinstance(main, str) else "\n".join(str(v) for v in logs.values())
        else:
            chosen = str(logs)
        tail = _tail(chosen or "")
        return f"{text}\n{tail}" if tail else text

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [j.id for j in self._jobs.values()]
        if self._local:
            for job_id in pending:
                self._cancel_local(job_id)
            for _ in self._threads:
                self._queue.put(None)
            for thread in self._threads:
                thread.join(timeout=30)
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._owns_backend:
            try:
                self._call(self._backend.close)
            except Exception as exc:
                log.warning("closing hailtop's %s failed: %s", type(self._backend).__name__, exc)
        self._hail_thread.shutdown(wait=True)

    # -- the service ----------------------------------------------------------------------

    def _submit_service(self, jobs: Sequence[JobSpec]) -> list[str]:
        missing = [spec.name for spec in jobs if spec.resources.image is None]
        if missing:
            raise ValueError(
                "Hail Batch service jobs need an image with batchpool installed (job option "
                f"image=...; see `batchpool image build`); none given for {', '.join(missing)}"
            )
        batch = self._hb.Batch(
            backend=self._backend,
            name=self._batch_name or jobs[0].name,
            attributes={"batchpool": "1"},
        )
        made = []
        for spec in jobs:
            job = self._new_job(batch, spec)
            if self._regions is not None and not self._owns_backend:
                job.regions(self._regions)
            for key, value in spec.environment().items():
                job.env(key, value)
            lines = [*self._script_head(spec), shlex.join(self._argv(spec))]
            job.command("\n".join(lines))
            made.append(job)
        try:
            submitted = batch.run(wait=False, disable_progress_bar=True)
        except Exception as exc:
            raise BackendError(f"Hail Batch did not take the batch: {exc}") from exc
        batch_id = int(submitted.id)
        with self._lock:
            self._batches[batch_id] = submitted
        return [f"{batch_id}:{job._client_job.job_id}" for job in made]

    @staticmethod
    def _split(job_id: str) -> tuple[int, int]:
        batch, _, job = job_id.partition(":")
        try:
            return int(batch), int(job)
        except ValueError:
            raise ValueError(f"{job_id!r} is not a Hail Batch job id") from None

    def _by_batch(self, job_ids: Sequence[str]) -> dict[int, dict[str, int]]:
        groups: dict[int, dict[str, int]] = {}
        for job_id in job_ids:
            batch_id, number = self._split(job_id)
            groups.setdefault(batch_id, {})[job_id] = number
        return groups

    def _batch(self, batch_id: int) -> Any:
        with self._lock:
            known = self._batches.get(batch_id)
        if known is not None:
            return known
        from hailtop.batch_client.client import Batch as ClientBatch

        try:
            found = self._hb.Batch.from_batch_id(batch_id, backend=self._backend)
        except Exception as exc:
            raise BackendError(f"Hail Batch does not know batch {batch_id}: {exc}") from exc
        client_batch = ClientBatch(found._async_batch)
        with self._lock:
            self._batches[batch_id] = client_batch
        return client_batch

    def _list_jobs(self, batch_id: int) -> dict[int, dict[str, Any]]:
        try:
            return {int(entry["job_id"]): entry for entry in self._batch(batch_id).jobs()}
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"Hail Batch could not list batch {batch_id}'s jobs: {exc}") from exc

    # -- a LocalBackend -------------------------------------------------------------------

    def _submit_local(self, jobs: Sequence[JobSpec], notify: Notify | None) -> list[str]:
        for spec in jobs:
            self._new_job(self._hb.Batch(backend=self._backend), spec)  # options checked now
        made = [_LocalJob(f"local-{self._token}-{next(self._seq)}", spec, notify) for spec in jobs]
        with self._lock:
            for job in made:
                self._jobs[job.id] = job
            while len(self._threads) < self._parallel:
                thread = threading.Thread(
                    target=self._runner, name=f"batchpool-hail-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        for job in made:
            self._queue.put(job)
        return [job.id for job in made]

    def _runner(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.cancelled:
                    continue
                job.state = JobState.RUNNING
            try:
                event = self._run_local(job)
            except BaseException as exc:  # hailtop itself failed: the job's fate is unknown
                event = JobEvent(job.id, JobState.LOST, reason=f"{type(exc).__name__}: {exc}")
            self._end(job, event)

    def _run_local(self, job: _LocalJob) -> JobEvent:
        spec = job.spec
        base = os.path.join(self._dir, job.id)
        env_file, log_file, job.pid_file = f"{base}.env", f"{base}.log", f"{base}.pid"
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            for key, value in spec.environment().items():
                out.write(f"export {key}={shlex.quote(value)}\n")
        try:
            batch = self._hb.Batch(backend=self._backend, name=spec.name)
            env_input = batch.read_input(env_file)
            hjob = self._new_job(batch, spec)
            argv = shlex.join(self._argv(spec))
            lines = [f". {env_input}", *self._script_head(spec)]
            if spec.resources.image is None:
                lines += [
                    f"{argv} >{shlex.quote(log_file)} 2>&1 &",
                    f"echo $! >{shlex.quote(job.pid_file)}",
                    "wait $!",
                ]
            else:
                lines.append(argv)
            hjob.command("\n".join(lines))
            code = 0
            try:
                batch.run()
            except subprocess.CalledProcessError as exc:
                code = exc.returncode
            if job.cancelled:
                return JobEvent(job.id, JobState.CANCELLED, code, reason="cancelled by batchpool")
            if code == 0:
                return JobEvent(job.id, JobState.SUCCEEDED, 0)
            tail = ""
            try:
                with open(log_file, errors="replace") as f:
                    tail = _tail(f.read())
            except OSError:
                pass
            words = f"hailtop LocalBackend job {job.id} ended with {_exit_words(code)}"
            return JobEvent(
                job.id,
                JobState.FAILED,
                code,
                code - 128 if code > 128 else None,
                reason=words,
                log_tail=tail,
                fatal=code == FATAL_EXIT_CODE,
            )
        finally:
            for path in (env_file, log_file, job.pid_file):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _cancel_local(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.cancelled:
                return
            job.cancelled = True
            queued = job.state is JobState.PENDING
        if queued:
            self._end(job, JobEvent(job_id, JobState.CANCELLED, reason="cancelled by batchpool"))
            return
        if job.spec.resources.image is None:  # a container runs to its end
            threading.Thread(target=self._stop, args=(job,), daemon=True).start()

    def _stop(self, job: _LocalJob) -> None:
        """SIGTERM to a running job's worker, once its script has written the worker's pid."""
        deadline = time.monotonic() + STOP_WAIT
        while True:
            try:
                with open(job.pid_file) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):  # not written yet
                with self._lock:
                    ended = job.id not in self._jobs
                if ended or time.monotonic() > deadline:
                    return
                time.sleep(0.05)
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass  # it ended meanwhile
            return

    def _end(self, job: _LocalJob, event: JobEvent) -> None:
        with self._lock:
            if self._jobs.pop(job.id, None) is None:
                return
            self._ended[job.id] = event.state
            while len(self._ended) > FINISHED_MEMORY:
                self._ended.pop(next(iter(self._ended)))
            if event.reason or event.log_tail:
                self._why[job.id] = "\n".join(x for x in (event.reason, event.log_tail) if x)
                while len(self._why) > FINISHED_MEMORY:
                    self._why.pop(next(iter(self._why)))
        if job.notify is not None:
            job.notify(event)


def _service_error(status: dict[str, Any]) -> str:
    """The error the service recorded for a job's containers, if any."""
    inner = status.get("status")
    if not isinstance(inner, dict):
        return ""
    found = []
    for name, container in (inner.get("container_statuses") or {}).items():
        if isinstance(container, dict) and container.get("error"):
            found.append(f"{name}: {container['error']}")
    if inner.get("error"):
        found.append(str(inner["error"]))
    return "; ".join(found)
