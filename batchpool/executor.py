"""BatchPoolExecutor: a ``concurrent.futures.Executor`` whose calls run as batch jobs."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import multiprocessing
import os
import secrets
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from batchpool import billing, documents
from batchpool.backends.base import Backend, Resources, make_backend
from batchpool.backends.local import LocalBackend, WorkerProcess
from batchpool.budget import FailureBudget, check_max_failures
from batchpool.chunks import CallGroup
from batchpool.documents import FORMAT, BackendInfo, ClientInfo, Manifest, Settings
from batchpool.errors import BatchPoolError, check_positive_int
from batchpool.future import BatchPoolFuture, MapBatch
from batchpool.mapping import (
    AsyncMap,
    MapOptions,
    check_canary,
    check_map_arguments,
    map_parts,
    results,
    submitted_map,
)
from batchpool.outage import DEFAULT_GRACE
from batchpool.payloads import Call, Payloads
from batchpool.processes import boot_id, orphan_grace, process_started
from batchpool.recovery import (
    Reopened,
    adopt,
    call_key,
    check_client_gone,
    create_run,
    earlier_outcomes,
    find_runs_named,
    forget_secret,
    load_secret,
    mark_reopened,
    reopen,
    reopen_resumed,
    run_folder,
    run_slug,
)
from batchpool.runs import Usage
from batchpool.serialization import (
    SECRET_ENV,
    BlobRef,
    client_versions,
    describe_callable,
    get_serializer,
)
from batchpool.store import STORE_ENV, Store, open_storage
from batchpool.watcher import Watcher

if TYPE_CHECKING:
    from batchpool.ui import UIServer

# -- interpreter exit: as the stdlib does, let submitted work finish ------------------------

_live_watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
_global_shutdown = False


def _python_exit() -> None:
    global _global_shutdown
    _global_shutdown = True
    watchers = list(_live_watchers)
    for watcher in watchers:
        watcher.stop()
    for watcher in watchers:
        watcher.join()


try:
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # pragma: no cover
    import atexit

    atexit.register(_python_exit)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _parse_cpus(value: Any) -> float:
    """``cpus_per_job`` as a number: 2, 0.5, "2", or Kubernetes-style "250m"."""
    text = str(value).strip()
    try:
        cpus = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ValueError(
            f"cpus_per_job={value!r} is not a number of CPUs; use e.g. 1, 4, 0.5 or '250m'"
        ) from None
    if not cpus > 0:
        raise ValueError(f"cpus_per_job={value!r} must be greater than 0")
    return cpus


def _run_id(name: str | None) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{run_slug(name)}-{stamp}-{secrets.token_hex(4)}"


class BatchPoolExecutor(cf.Executor):
    """An ``Executor`` that runs each chunk of calls as a batch job.

    With no arguments, jobs run in a pool of ``os.cpu_count()`` warm worker
    processes on this machine and travel through a folder in the user's cache
    dir, like ``ProcessPoolExecutor``. Name another ``backend`` and a
    ``storage`` it can reach, and the same code runs on a cluster.

    Keyword arguments (Hail's ``BatchPoolExecutor`` first):

    - ``name``: a readable name for the run (in its storage path and job names).
    - ``backend``: a ``Backend`` instance or a registered name such as ``"local"``.
      A backend you pass in is never closed by the executor.
    - ``image``: the container image for jobs, on backends that run containers.
    - ``cpus_per_job``: CPUs per job (default 1); also caps the threads of
      BLAS/OpenMP libraries in the job through ``OMP_NUM_THREADS`` and friends.
    - ``wait_on_exit``: whether leaving a ``with`` block waits for the calls.
    - ``cleanup_bucket``: delete the run from storage once every call is done.
    - ``project``: the billing project or account, for backends that have one.
    - ``storage``: a folder, an fsspec URL (``gs://b/p``, ``s3://b/p``), an fsspec
      filesystem, or ``(filesystem, root)``; ``storage_options`` go to fsspec.
    - ``serializer``: ``"cloudpickle"`` (default) or ``"dill"``.
    - ``max_attempts``: how often a job that dies without a result is run (default 3).
      An exception raised by your function is a result and is never retried.
    - ``isolate_culprits``: when a job of several calls dies without a result (a
      segfault, the OOM killer, preemption), run its calls again split in halves,
      down to single calls, so that the calls that do not kill their worker return
      and only the culprits fail with ``WorkerLostError`` (default True). A call runs
      at most ``max(max_attempts, 1 + ceil(log2(chunk size)))`` times. False retries
      the whole chunk, ``max_attempts`` times.
    - ``canary``: every ``map`` first runs this many of its calls as their own jobs,
      and raises the first error among them before anything else is submitted
      (default 0: none); ``map(..., canary=N)`` overrides it.
    - ``max_failures``: once more calls than this have failed (raised, or got no
      result), the calls not yet run fail with ``FailureBudgetExceeded``, the jobs
      the engine still queues are cancelled, and new calls are refused; running jobs
      finish. A count (0: stop at the first failure) or a fraction of the calls ended
      so far (0.05), judged once ``1 / fraction`` calls have ended. ``map`` takes one
      of its own, for its calls.
    - ``blob_threshold``: an argument (or function) that pickles larger than this
      many bytes (default 1 MiB) is stored once in the run's ``blobs/``, by content,
      and each call refers to it; see ``put``.
    - ``payload_warning``: warn when one argument pickles larger than this many
      bytes (default 100 MB), naming it.
    - ``job_options``: what each job asks of the engine and how its worker starts:
      ``memory``, ``gpus``, ``walltime``, ``queue``, ``account``, ``extra_args``,
      ``env`` (a dict), ``env_script``, ``setup`` (bash lines), ``python`` (an
      executable or argv list), ``working_dir``. ``options(...)`` overrides them
      for a group of calls.
    - ``max_poll_interval``: for backends that do not push job events, the longest
      pause between status queries (default 2 s); polls are fast while jobs end.
    - ``engine_outage_grace``: how long the engine may be unreachable (its status
      queries or submissions fail, or hang) before the jobs in flight count as lost
      (default 600 s). Meanwhile their states are unknown, not lost: the executor keeps
      asking with backoff, completes from the store what finished, and hands over
      new jobs once the engine answers.
    - ``resume``: with ``name``, keep the run at ``<storage>/<name>`` and reuse it:
      a call whose function and arguments (pickled, hashed) already returned in
      that run returns the same result without running again; calls that failed
      or never finished run. Side effects of the calls that are skipped are not
      repeated. Implies ``cleanup_bucket=False``.
    - ``cost_per_core_hour``: a price, to turn the core-hours of ``usage()`` (and
      ``batchpool status``) into an estimated cost.
    - ``memory_per_core``: GiB of memory per billed core (a number, or ``"3.75G"``): a
      job is billed the larger of its CPUs and the cores its memory implies, in Hail
      Batch's core sizes (``billing.billed_cores``). Default: the backend's
      (``Backend.memory_per_core``: 3.75 for Hail Batch, off for the others); 0: off.
    - ``ship_code``: pickle functions and classes of your own modules (``__main__``
      and source files that are not installed packages) by value, so workers that
      cannot import them run them anyway. Default: on for backends whose workers do
      not share this machine's files (``Backend.shares_client_code``), off for the
      local pool, which imports them as ``ProcessPoolExecutor`` does.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        name: str | None = None,
        backend: Backend | str | None = None,
        image: str | None = None,
        cpus_per_job: int | float | str | None = None,
        wait_on_exit: bool = True,
        cleanup_bucket: bool = True,
        project: str | None = None,
        storage: Any = None,
        storage_options: dict[str, Any] | None = None,
        serializer: str = "cloudpickle",
        max_attempts: int = 3,
        blob_threshold: int = 1 << 20,
        payload_warning: int = 100 * 10**6,
        ship_code: bool | None = None,
        max_poll_interval: float | None = None,
        engine_outage_grace: float = DEFAULT_GRACE,
        job_options: dict[str, Any] | None = None,
        resume: bool = False,
        cost_per_core_hour: float | None = None,
        isolate_culprits: bool = True,
        canary: int = 0,
        max_failures: int | float | None = None,
        memory_per_core: float | str | None = None,
        _reopened: Reopened | None = None,
    ) -> None:
        if max_workers is not None:
            check_positive_int("max_workers", max_workers)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, not a {type(initializer).__name__}")
        if max_tasks_per_child is not None:
            check_positive_int("max_tasks_per_child", max_tasks_per_child)
            # Other engines start a fresh process per job anyway (README: Arguments).
            if isinstance(backend, LocalBackend):
                raise ValueError(
                    "max_tasks_per_child= applies to the local pool the executor makes; for a "
                    "LocalBackend you made, pass it there: LocalBackend(max_tasks_per_child=...)"
                )
        # Workers are always fresh interpreters, as with "spawn" (see the README).
        self._mp_context = mp_context or multiprocessing.get_context("spawn")
        check_positive_int("max_attempts", max_attempts)
        if max_poll_interval is not None and not max_poll_interval > 0:
            raise ValueError(f"max_poll_interval={max_poll_interval!r} must be a number > 0")
        if (
            isinstance(engine_outage_grace, bool)
            or not isinstance(engine_outage_grace, (int, float))
            or not engine_outage_grace > 0
        ):
            raise ValueError(
                f"engine_outage_grace={engine_outage_grace!r} must be a number of seconds > 0 "
                "(how long the engine may be unreachable before its jobs count as lost)"
            )
        check_positive_int("blob_threshold", blob_threshold)
        check_positive_int("payload_warning", payload_warning)
        self._canary = check_canary(canary)
        limit = check_max_failures(max_failures)
        #: The executor's ``max_failures``: it counts every call.
        self._budget = None if limit is None else FailureBudget(limit, "the executor")
        cpus = _parse_cpus(cpus_per_job) if cpus_per_job is not None else 1.0
        self._resources = Resources(cpus=cpus, image=image).replace(**(job_options or {}))
        if memory_per_core is not None:  # refused before any backend is made
            billing.billed_cores(cpus, self._resources.memory, memory_per_core)
        self._serializer = get_serializer(serializer)
        self._resume = resume
        self.name = name
        self.wait_on_exit = wait_on_exit
        self.cleanup_bucket = cleanup_bucket

        fs, root = open_storage(storage, storage_options)
        if "memory" in _protocols(fs):
            raise ValueError(
                "storage='memory://...' lives inside this process, and every backend runs "
                "jobs in other processes that would not see it; use a folder (the default) "
                "or storage that the workers reach"
            )
        owns_backend = not isinstance(backend, Backend)
        if backend is None or backend == "local":
            if max_workers is None:
                max_workers = max(1, int((os.cpu_count() or 1) // max(cpus, 1)))
            backend = LocalBackend(max_workers, max_tasks_per_child=max_tasks_per_child)
        elif isinstance(backend, str):
            backend = make_backend(backend)
        elif not isinstance(backend, Backend):
            raise TypeError(
                f"backend= takes a Backend instance or a registered name such as 'local', "
                f"not a {type(backend).__name__}"
            )
        try:
            backend.check_store(_protocols(fs)[0], root)
        except BaseException:
            if owns_backend:
                backend.close()
            raise
        self._backend = backend
        self._memory_per_core = billing.memory_per_core_gib(
            backend.memory_per_core if memory_per_core is None else memory_per_core
        )
        self._payloads = Payloads(
            self._serializer,
            ship_code=not backend.shares_client_code if ship_code is None else ship_code,
            blob_threshold=blob_threshold,
            payload_warning=payload_warning,
        )
        try:
            initializer_data = self._payloads.initializer(initializer, initargs)
        except BaseException:
            if owns_backend:
                backend.close()
            raise
        if image is not None and isinstance(backend, LocalBackend):
            warnings.warn(
                f"image={image!r} is ignored: the local backend runs jobs with this machine's "
                "Python; to run jobs in containers of an image, use backend='docker' (or a "
                "cloud batch backend)",
                stacklevel=2,
            )
        # How many jobs may run at once, and how many the backend is handed at once.
        # A local pool gets a second job per slot (so a worker never idles between
        # jobs) only when it cannot run it before its turn.
        parallel = backend.max_parallel()
        capacity = max_workers or parallel
        if backend.bounded:
            capacity = min(capacity, parallel)
        if backend.bounded:
            in_flight = 2 * capacity if parallel <= capacity else capacity
        elif max_workers is None:
            # A cluster's scheduler queues what it cannot run yet: hand it everything
            # at once, so a map becomes one array job, not waves of them.
            in_flight = sys.maxsize
        else:
            in_flight = capacity

        if cost_per_core_hour is not None and not cost_per_core_hour >= 0:
            raise ValueError(f"cost_per_core_hour={cost_per_core_hour!r} must be a number >= 0")
        versions = client_versions(self._serializer)
        if resume and _reopened is None and not name:
            if owns_backend:
                backend.close()
            raise ValueError("resume=True needs name=...: the run to resume is found by its name")
        if resume:
            self.cleanup_bucket = cleanup_bucket = False
        settings = Settings(
            cpus_per_job=cpus,
            image=image,
            project=project,
            max_workers=max_workers,
            max_attempts=max_attempts,
            cleanup_bucket=cleanup_bucket,
            serializer=self._serializer.name,  # type: ignore[arg-type]
            resume=resume,
            cost_per_core_hour=cost_per_core_hour,
            memory_per_core=self._memory_per_core or 0.0,
            isolate_culprits=isolate_culprits,
            canary=self._canary,
            max_failures=limit,
            job_options=documents.to_builtins(dataclasses.asdict(self._resources)),
        )
        client = ClientInfo(
            **versions,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=process_started(os.getpid()),
            boot_id=boot_id(),
        )
        try:
            if _reopened is None:
                run_id = run_folder(name) if resume and name else _run_id(name)
                store = Store(fs, f"{root}/{run_id}")
                manifest = Manifest(
                    format=FORMAT,
                    run_id=run_id,
                    name=name,
                    created=datetime.now(timezone.utc).isoformat(),
                    client=client,
                    backend=documents.build(BackendInfo, backend.describe()),
                    settings=settings,
                )
                made = create_run(store, manifest)
                if made is not None:
                    secret = made
                elif resume and name:  # the run exists: continue it
                    _reopened = reopen_resumed(store, name)
                    _check_same_serializer(_reopened, self._serializer.name)
                    _reopened.results, _reopened.failures = earlier_outcomes(
                        store, _reopened.secret, _reopened.view
                    )
                else:
                    raise BatchPoolError(f"a run already exists at {store.url}")
            if _reopened is not None:
                store, secret = _reopened.store, _reopened.secret
                mark_reopened(_reopened, client, backend.describe())
        except Exception:
            if owns_backend:
                backend.close()
            raise
        self._run_id = store.root.rsplit("/", 1)[-1]
        self._reopened_results = _reopened.results if _reopened is not None else {}
        # resume: calls that raised before, by content, and the earlier jobs they were in
        self._earlier_failures = _reopened.failures if _reopened is not None else {}
        self._futures = _reopened.futures if _reopened is not None else []
        job_env = {STORE_ENV: store.spec(), SECRET_ENV: secret.hex(), "PYTHONUNBUFFERED": "1"}
        self._store = store
        self._ui: UIServer | None = None  # the web page (``ui``), once asked for
        self._payloads.use_store(store)
        header: dict[str, Any] = dict(versions)
        if initializer_data is not None:  # each worker process runs it before its first call
            ref = self._payloads.store_blob(initializer, initializer_data)
            header["initializer"] = {"digest": ref.digest, "size": ref.size}
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._watcher = Watcher(
            store=store,
            backend=backend,
            owns_backend=owns_backend,
            serializer=self._serializer,
            secret=secret,
            header=header,
            job_env=job_env,
            resources=self._resources,
            run_name=run_slug(name) if name else self._run_id.rsplit("-", 3)[0],
            capacity=capacity,
            in_flight=in_flight,
            max_attempts=max_attempts,
            cleanup=cleanup_bucket,
            max_poll_interval=max_poll_interval,
            engine_outage_grace=engine_outage_grace,
            cost_per_core_hour=cost_per_core_hour,
            memory_per_core=self._memory_per_core,
            next_chunk=_reopened.next_chunk if _reopened is not None else 0,
            next_journal=_reopened.next_journal if _reopened is not None else 0,
            adopted=_reopened.adopted if _reopened is not None else (),
            on_cleanup=functools.partial(forget_secret, store.url),
            isolate_culprits=isolate_culprits,
        )
        _live_watchers.add(self._watcher)
        # If the executor is dropped without shutdown, its calls still finish.
        weakref.finalize(self, self._watcher.stop)

    # -- what the run is --------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def run_url(self) -> str:
        """Where this run lives in storage."""
        return self._store.url

    @property
    def max_workers(self) -> int:
        return self._watcher.capacity

    @property
    def futures(self) -> list[BatchPoolFuture]:
        """The calls of the run this executor attached to, in the order they were
        submitted (see ``attach``); empty for a run this executor created."""
        return self._futures

    def status(self) -> dict[str, int]:
        """How many of this executor's calls are in each job state, in Hail's words:
        Pending (waiting for a free slot here), Ready (queued by the engine),
        Running, Success, Failed (the call's job had a call that raised), Error (its
        job ended without a result, every attempt), Cancelled. States with no call
        are left out. ``batchpool status RUN`` shows the same run job by job.
        """
        return self._watcher.status()

    def usage(self) -> Usage:
        """What the jobs that ended so far used: wall and CPU time, core-hours (wall
        time times the cores each job is billed: its CPUs, or the cores its memory
        implies with ``memory_per_core``), the time lost to attempts that died (billed
        too, and shown apart), the largest peak memory of a job, and ``cost`` when
        ``cost_per_core_hour`` was given."""
        return self._watcher.usage()

    def estimate(
        self, fn: Callable[..., Any], items: Iterable[Any], *, sample: int = 10
    ) -> billing.Estimate:
        """Run the first ``sample`` calls of ``map(fn, items)`` (one iterable) as jobs, time
        them, and say how long the whole map would take on this executor's workers and
        how many core-hours it would bill (``Estimate``; ``str()`` says it in a sentence).
        A sample call that raises raises here. See ``billing.estimate``."""
        return billing.estimate(self, fn, items, sample)

    def ui(self, *, open_browser: bool = True, port: int = 0) -> str:
        """Serve the web page of this run's storage (``batchpool ui``; needs the ``ui``
        extra) from a thread of this process, on 127.0.0.1, and return the URL of this
        run's page, with the server's token; it opens in a browser unless
        ``open_browser=False`` (in a notebook, the URL is the cell's output). The server
        lives as long as this process; calling ``ui`` again returns the same page."""
        if self._ui is None:
            from batchpool.ui import UIServer

            root = self._store.root.rsplit("/", 1)[0]
            self._ui = UIServer((self._store.fs, root), port=port).start()
        url = self._ui.run_url(self._store.root.rsplit("/", 1)[-1])
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        return url

    @classmethod
    def attach(
        cls,
        storage: Any = None,
        name: str | None = None,
        *,
        backend: Backend | str | None = None,
        secret: str | bytes | None = None,
        storage_options: dict[str, Any] | None = None,
        force: bool = False,
        **options: Any,
    ) -> BatchPoolExecutor:
        """Take over a run whose client died, from its storage alone.

        ``name`` is the run's id (its folder), or the name it was created with (the
        newest such run). The returned executor's ``futures`` are the run's calls in
        the order they were submitted: finished ones have their results; jobs the
        engine still runs or queues are watched; jobs that died with the old client
        run again, except a job a worker had started, which is waited for while
        its worker lives, so no call runs twice. New calls may be submitted too.

        The backend is rebuilt from the run's manifest unless one is given. The run
        secret comes from ``secret``, ``BATCHPOOL_RUN_SECRET``, or the file the
        client that created the run kept on this machine. ``options`` are further
        ``BatchPoolExecutor`` arguments (``max_workers``, ``cleanup_bucket``, ...).
        """
        fs, root = open_storage(storage, storage_options)
        # Everything below is read from documents that carry the run's signature.
        reopened = _reopen_named(fs, root, name, secret)
        reopened.how = "attach"
        manifest = reopened.manifest
        check_client_gone(reopened.view, force)
        settings = manifest.settings
        job_options = dict(settings.job_options)
        cpus = job_options.pop("cpus", settings.cpus_per_job)
        image = job_options.pop("image", settings.image)
        kwargs: dict[str, Any] = {
            "name": manifest.name,
            "cpus_per_job": cpus,
            "image": image,
            "project": settings.project,
            "serializer": settings.serializer,
            "max_attempts": settings.max_attempts,
            "cleanup_bucket": settings.cleanup_bucket,
            "cost_per_core_hour": settings.cost_per_core_hour,
            "memory_per_core": settings.memory_per_core,
            "isolate_culprits": settings.isolate_culprits,
            "canary": settings.canary,
            # a count comes back as a float from JSON when it was written as one
            "max_failures": _budget_limit(settings.max_failures),
            "job_options": job_options,
            "max_workers": settings.max_workers,
        }
        kwargs.update(options)
        try:
            resources = Resources(cpus=_parse_cpus(kwargs["cpus_per_job"] or 1), image=image)
            resources = resources.replace(**kwargs["job_options"])
        except (TypeError, ValueError) as exc:
            raise BatchPoolError(
                f"the job options recorded in the manifest of run {manifest.run_id} are not "
                f"usable here ({exc}); pass job_options= to attach"
            ) from exc
        made_here = not isinstance(backend, Backend)
        if backend is None:
            backend = _backend_from_manifest(manifest, kwargs["max_workers"])
        elif isinstance(backend, str):
            backend = make_backend(backend)
        try:
            adopt(reopened, backend, resources, orphan_grace())
            executor = cls(backend=backend, storage=(fs, root), _reopened=reopened, **kwargs)
        except BaseException:
            if made_here:
                backend.close()
            raise
        if made_here:  # a backend rebuilt for this executor ends with it
            executor._watcher._owns_backend = True
        return executor

    # -- submit and map --------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> BatchPoolFuture:
        """Schedule ``fn(*args, **kwargs)``; the call is pickled now, in this thread."""
        return self._submit(None, fn, args, kwargs)

    def options(self, **changes: Any) -> JobOptions:
        """A view of this executor whose calls ask for other job resources.

        ``bpe.options(cpus=4, memory="8G").map(fit, models)`` runs those calls in
        jobs with 4 CPUs and 8 GB; the view shares the executor's run, workers and
        shutdown. Names are those of ``job_options`` plus ``cpus`` and ``image``.
        """
        return JobOptions(self, _resources(self._resources, changes))

    def _submit(
        self,
        resources: Resources | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> BatchPoolFuture:
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not a {type(fn).__name__}")
        self._check_open()
        keys = self._call_keys(fn, [(args, kwargs)])
        if keys is not None and keys[0] in self._reopened_results:
            return self._resumed_future(keys[0])
        payload = self._payloads.group(fn, [(args, kwargs)])
        future = BatchPoolFuture()
        future._on_cancel = self._watcher.notify_cancelled
        group = CallGroup(payload, [future], describe_callable(fn), resources=resources, keys=keys)
        group.budgets = self._budgets(None)
        self._enqueue(group)
        return future

    def _budgets(self, own: FailureBudget | None) -> tuple[FailureBudget, ...]:
        """The ``max_failures`` budgets that count a call: its map's, and the executor's."""
        return tuple(budget for budget in (own, self._budget) if budget is not None)

    def _call_keys(self, fn: Callable[..., Any], calls: list[Call]) -> list[str] | None:
        """Each call's content hash, in a ``resume=True`` run (else None)."""
        if not self._resume:
            return None
        try:
            dumps = self._serializer.dumps
            fn_digest = hashlib.sha256(dumps(fn)).digest()
            keys = [call_key(fn_digest, call, dumps) for call in calls]
        except Exception:
            return None  # pickling fails: the normal path explains why
        failed = self._earlier_failures
        rerun = sorted({failed.pop(key) for key in keys if key in failed})
        if rerun:  # `batchpool status` counts those earlier failures as handled
            self._watcher.note_rerun(rerun)
        return keys

    def _resumed_future(self, key: str) -> BatchPoolFuture:
        """The future of a call that already returned in this run: done, not run again."""
        outcome = self._resumed_outcome(key)
        assert outcome is not None  # the caller looked it up
        future = BatchPoolFuture()
        future.set_running_or_notify_cancel()
        ok, value = outcome
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
        return future

    def put(self, obj: Any) -> BlobRef:
        """Store ``obj`` once in the run and return a small handle to pass to any call.

        In a job the handle is replaced by the object, loaded once per worker
        process and shared by the calls it runs: treat it as read-only.
        """
        self._check_open()
        return self._payloads.put(obj)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
        progress: bool | None = None,
        canary: int | None = None,
        max_failures: int | float | None = None,
    ) -> Iterator[Any]:
        """``map(fn, *iterables)`` with its calls run as jobs; results in input order.

        ``timeout`` is a deadline counted from this call. ``chunksize=None`` picks
        a size from the input's length and the workers (about four chunks per
        worker). ``buffersize`` bounds how many chunks are submitted and not yet
        yielded, so an endless generator is read only as fast as results are used.
        An exception raised by a call is raised when its item is reached.
        ``progress`` shows a tqdm bar of calls done, failed and running: by default
        only on a terminal and for maps that run longer than two seconds.
        ``canary=N`` runs the first N calls as their own jobs first, and waits for
        them: if one raises or its job dies, ``map`` raises that error and nothing
        else is submitted (default: the executor's ``canary``). ``max_failures``
        (a count, or a fraction of the calls ended) stops this map's calls not yet
        run once more of its calls failed, with ``FailureBudgetExceeded``.
        """
        options = MapOptions(chunksize, buffersize, None, progress, canary, max_failures)
        return self._map(fn, iterables, timeout, options)

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        options: MapOptions,
    ) -> Iterator[Any]:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or a number of seconds >= 0")
        deadline = None if timeout is None else time.monotonic() + timeout
        if options.resources is None and "submit" in vars(self):  # replaced, to watch map
            check_map_arguments(fn, options)
            self._check_open()
            canary = self._canary if options.canary is None else options.canary
            return submitted_map(self.submit, fn, iterables, deadline, options, canary)
        parts = map_parts(self, fn, iterables, options, deadline)
        return results(parts, deadline)

    @property
    def _broken(self) -> str | bool:
        """Why the executor is broken (its initializer failed), else False: the stdlib's
        ``ProcessPoolExecutor._broken``, for code that looks."""
        broken = self._watcher.broken
        return False if broken is None else str(broken)

    @property
    def _max_workers(self) -> int:
        """``max_workers``, under the stdlib's name (dask reads it)."""
        return self.max_workers

    @property
    def _processes(self) -> dict[int, WorkerProcess]:
        """The local pool's worker processes by pid, under the stdlib's name; empty on
        other backends, whose jobs run elsewhere."""
        backend = self._backend
        return backend.processes() if isinstance(backend, LocalBackend) else {}

    def _check_open(self) -> None:
        if self._watcher.broken is not None:
            raise self._watcher.broken_error()
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _enqueue_batch(
        self,
        batch: MapBatch,
        payload: bytes,
        label: str,
        resources: Resources | None,
        keys: list[str] | None,
        budget: FailureBudget | None = None,
    ) -> None:
        """Queue one map chunk's calls, with one future for all of them; ``budget``: the
        map's own ``max_failures``."""
        group = CallGroup(payload, [batch], label, fixed=True, resources=resources, keys=keys)
        group.budgets = self._budgets(budget)
        self._enqueue(group)

    def _resumed_outcome(self, key: str) -> tuple[bool, Any] | None:
        """``(ok, value)`` of a call that already returned in this run, or None."""
        data = self._reopened_results.get(key)
        if data is None:
            return None
        self._watcher.count_resumed()
        try:
            return True, self._serializer.loads(data)
        except Exception as exc:
            return False, exc

    def _enqueue(self, group: CallGroup) -> None:
        with self._shutdown_lock:
            self._check_open()
            self._watcher.enqueue(group)

    # -- shutdown ---------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more calls; with ``wait``, return when every call is done.

        ``cancel_futures`` cancels the calls not yet handed to the backend. The run
        is deleted from storage (``cleanup_bucket``) and the backend closed (when
        the executor made it) once every call is done, waiting or not.
        """
        with self._shutdown_lock:
            self._shutdown = True
        if cancel_futures:
            self._watcher.cancel_pending()
            self._watcher.cancel_queued()
        self._watcher.stop()
        if wait:
            self._watcher.join()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown(wait=self.wait_on_exit)

    # -- asyncio ----------------------------------------------------------------------------

    async def async_submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> BatchPoolFuture:
        """``submit`` for event loops: pickling runs in a thread; await the returned future."""
        return await asyncio.to_thread(self.submit, fn, *args, **kwargs)

    def async_map(
        self,
        fn: Callable[..., Any],
        iterables: Iterable[Iterable[Any]],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool | None = None,
        canary: int | None = None,
        max_failures: int | float | None = None,
    ) -> AsyncMap:
        """``map`` for event loops, with Hail's signature (one list of iterables).

        ``async for r in await bpe.async_map(fn, [xs])`` submits everything (in a
        thread) when awaited and yields results in input order;
        ``async for r in bpe.async_map(fn, [xs])`` works too. ``canary`` and
        ``max_failures`` are ``map``'s.
        """
        options = MapOptions(chunksize, None, None, progress, canary, max_failures)
        return AsyncMap(self, fn, list(iterables), timeout, options)

    async def __aenter__(self) -> BatchPoolExecutor:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await asyncio.to_thread(self.shutdown, self.wait_on_exit)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<BatchPoolExecutor {self._run_id} on {self._backend!r}, {state}>"


def _reopen_named(fs: Any, root: str, name: str | None, secret: str | bytes | None) -> Reopened:
    """The run ``attach`` takes over: the folder ``root`` (no name), the run whose id is
    ``name``, or the newest run called ``name`` whose manifest carries its signature (a
    folder that only says it has that name is passed over)."""
    if not name:
        store = Store(fs, root)
        return reopen(store, load_secret(store.url, secret))
    candidates = find_runs_named(fs, root, name)
    first_error: Exception | None = None
    for store in candidates:
        try:
            return reopen(store, load_secret(store.url, secret))
        except BatchPoolError as exc:  # not this user's run, or not a run it can read
            first_error = first_error or exc
    assert first_error is not None  # find_runs_named found at least one
    raise first_error


def _backend_from_manifest(manifest: Manifest, max_workers: int | None) -> Backend:
    """A backend like the one that ran a run, rebuilt from what its (signed) manifest
    recorded, in this process's own environment: a manifest names no commands and sets
    no environment variables."""
    name = manifest.backend.name
    if name == "local":
        return LocalBackend(max_workers)
    try:
        return make_backend(name, **manifest.backend.options)
    except Exception as exc:
        raise BatchPoolError(
            f"could not rebuild the {name!r} backend of run {manifest.run_id} from its "
            f"manifest ({type(exc).__name__}: {exc}); pass backend= to attach"
        ) from exc


def _budget_limit(value: float | None) -> int | float | None:
    """``max_failures`` as recorded: a count is an int again (a fraction is below 1)."""
    if value is None or value < 1 or value != int(value):
        return value
    return int(value)


def _check_same_serializer(reopened: Reopened, serializer: str) -> None:
    used = reopened.manifest.settings.serializer
    if used != serializer:
        raise ValueError(
            f"the run at {reopened.store.url} was made with serializer={used!r}; resume it "
            f"with the same serializer (not {serializer!r}), or give it another name"
        )


def _resources(base: Resources, changes: dict[str, Any]) -> Resources:
    if "cpus" in changes:
        changes = {**changes, "cpus": _parse_cpus(changes["cpus"])}
    return base.replace(**changes)


class JobOptions:
    """Calls of an executor that ask for other job resources; see ``options``."""

    def __init__(self, executor: BatchPoolExecutor, resources: Resources) -> None:
        self._executor = executor
        self.resources = resources

    def options(self, **changes: Any) -> JobOptions:
        return JobOptions(self._executor, _resources(self.resources, changes))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> BatchPoolFuture:
        return self._executor._submit(self.resources, fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
        progress: bool | None = None,
        canary: int | None = None,
        max_failures: int | float | None = None,
    ) -> Iterator[Any]:
        options = MapOptions(chunksize, buffersize, self.resources, progress, canary, max_failures)
        return self._executor._map(fn, iterables, timeout, options)

    async def async_submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> BatchPoolFuture:
        return await asyncio.to_thread(self.submit, fn, *args, **kwargs)

    def async_map(
        self,
        fn: Callable[..., Any],
        iterables: Iterable[Iterable[Any]],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool | None = None,
        canary: int | None = None,
        max_failures: int | float | None = None,
    ) -> AsyncMap:
        options = MapOptions(chunksize, None, self.resources, progress, canary, max_failures)
        return AsyncMap(self._executor, fn, list(iterables), timeout, options)

    def __repr__(self) -> str:
        return f"<options of {self._executor!r}: {self.resources}>"


__all__ = ["AsyncMap", "BatchPoolExecutor"]
