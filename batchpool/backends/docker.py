"""Containers on this machine: each job is one container of its image, with Docker or Podman.

A job runs ``python3 -m batchpool.worker <args>`` (or ``Resources.python``) in a
container of ``Resources.image``, started with the engine's CLI (``docker`` or
``podman``, whichever is found, or the one named). The engine runs whatever it is
given at once, so this backend queues jobs itself and runs at most ``parallel`` of
them (default: this machine's CPUs): it is ``bounded``, like the local pool.

One thread per running slot runs ``docker run`` attached: the command returns when
the container ends, with its exit status, while its output goes to a file of the
backend's ``log_dir``. Then one ``docker inspect`` reads ``OOMKilled`` and the
engine's own error, the container is removed, and a ``JobEvent`` is pushed
(``notifies``). A job's id is its container's name, ``batchpool-<backend>-<n>``;
every container carries the labels ``batchpool.backend`` and ``batchpool.job``, so
``cancel`` from any process (``batchpool cancel``) and ``status`` after a client
died (``attach``) find them by name.

What a container sees:

- the job's environment, passed as ``-e NAME`` with the values in the CLI's own
  environment, so neither the run's secret nor any value shows in a process list;
- a local store folder, bind-mounted at the same path (read-write); other stores
  (``s3://``, ``gs://``) are reached over the network: the host's network by default
  (``network="host"``), so endpoints on 127.0.0.1 work;
- this user's uid and gid (``--user``), so files it writes in the store are the user's;
- ``cpus``, ``memory`` (swap capped at the same amount, so the limit is a limit) and
  ``gpus`` as the engine's limits.

``check_store`` refuses, at the executor's construction, a store that no container
can reach: ``memory://`` (it lives in the client's process), a relative folder, or
any filesystem that is neither a local folder nor a network store.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import subprocess
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchpool.backends.base import (
    Backend,
    JobEvent,
    JobSpec,
    JobState,
    Notify,
    file_tail,
    signal_name,
)
from batchpool.errors import FATAL_EXIT_CODE, BackendError
from batchpool.images import find_engine

#: Seconds an engine command other than ``run`` may take before it counts as failed.
COMMAND_TIMEOUT = 120.0
#: The worker's Python in an image, unless ``Resources.python`` names another.
IMAGE_PYTHON = "python3"
#: Exit statuses of ``docker run`` itself (not of the container's command).
_ENGINE_EXITS = {
    125: "the engine could not create or start the container",
    126: "the container's command could not be invoked",
    127: "the container's command was not found",
}
_INSPECT_FORMAT = "{{json .Name}} {{json .State}}"
_NAME = re.compile(r"batchpool-[0-9a-f]{12}-[0-9]{1,12}")
#: Filesystems a container reaches over the network, as any process does.
_NETWORK_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "http", "https"})
_LOCAL_PROTOCOLS = frozenset({"file", "local"})


def _default_log_dir() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_cache_dir("batchpool"), "docker-logs")


@dataclass
class _Job:
    id: str
    spec: JobSpec
    notify: Notify | None
    state: JobState = JobState.PENDING
    cancelled: bool = False


class DockerBackend(Backend):
    """Run each job in a container of its image, at most ``parallel`` at once.

    ``engine`` is the CLI (``"docker"``, ``"podman"`` or a path; default: the first
    of them on the PATH). ``image`` is the default image for jobs whose options name
    none (the executor's ``image=`` and ``options(image=...)`` take precedence).
    ``network`` is the containers' network (``"host"`` by default; ``None`` leaves the
    engine's default). ``volumes`` are extra bind mounts (``"/data:/data:ro"``).
    ``run_args`` go to every ``docker run`` as they are. ``log_dir`` holds each
    container's output (the worker copies the calls' own output to the run's
    ``logs/`` in the store as well); ``keep_containers`` leaves ended containers for
    ``docker inspect`` instead of removing them. ``user`` is the containers' ``uid:gid``
    (default: this process's); ``init=False`` leaves out ``--init``, when an image's
    entry point already reaps and forwards signals.
    """

    name = "docker"
    notifies = True
    bounded = True
    shares_client_code = False
    job_ids_outlive_client = True

    def __init__(
        self,
        engine: str | None = None,
        *,
        image: str | None = None,
        parallel: int | None = None,
        network: str | None = "host",
        volumes: Sequence[str] = (),
        run_args: Sequence[str] = (),
        log_dir: str | None = None,
        keep_containers: bool = False,
        user: str | None = None,
        init: bool = True,
    ) -> None:
        if parallel is not None and (not isinstance(parallel, int) or parallel <= 0):
            raise ValueError(f"parallel={parallel!r} must be a positive int")
        if isinstance(run_args, str):
            run_args = shlex.split(run_args)
        self.engine = find_engine(engine)
        self.image = image
        self.parallel = parallel or os.cpu_count() or 1
        self.network = network
        self.volumes = tuple(volumes)
        self.run_args = tuple(run_args)
        self.log_dir = os.path.abspath(log_dir or _default_log_dir())
        self.keep_containers = keep_containers
        self.user = user if user is not None else f"{os.getuid()}:{os.getgid()}"
        self.init = init
        self._token = uuid.uuid4().hex[:12]
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        self._slots: list[threading.Thread] = []
        self._closed = False
        self._images_seen: set[str] = set()
        #: How many engine commands ran, by verb (``run``, ``inspect``, ``kill``, ...).
        self.commands: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"DockerBackend(engine={self.engine!r}, parallel={self.parallel})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": {"log_dir": self.log_dir}}

    @classmethod
    def check_job_id(cls, job_id: str) -> None:
        if not isinstance(job_id, str) or not _NAME.fullmatch(job_id):
            raise ValueError(
                f"{job_id!r} is not a container name of the docker backend "
                "(batchpool-<12 hex digits>-<number>)"
            )

    def max_parallel(self) -> int:
        return self.parallel

    def check_store(self, protocol: str, root: str) -> None:
        """Raise ValueError unless containers can reach a store at ``root``."""
        if protocol in _LOCAL_PROTOCOLS:
            if not os.path.isabs(root):
                raise ValueError(
                    f"the store folder {root!r} is a relative path: containers mount it at "
                    "the same path, so give an absolute one"
                )
            return
        if protocol in _NETWORK_PROTOCOLS:
            return
        raise ValueError(
            f"a {protocol}:// store cannot be reached from a container: it lives in this "
            "process (memory://) or on a filesystem the container does not mount; give "
            "storage= a local folder (mounted at the same path) or s3:// / gs://"
        )

    # -- the contract ---------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        for spec in jobs:
            self._check_image(self._image_of(spec))
        created = [
            _Job(f"batchpool-{self._token}-{next(self._numbers)}", spec, notify) for spec in jobs
        ]
        with self._wake:
            if self._closed:
                raise BackendError("this DockerBackend is closed")
            for job in created:
                self._jobs[job.id] = job
                self._queue.append(job)
            self._slots = [t for t in self._slots if t.is_alive()]
            for _ in range(min(len(self._queue), self.parallel - len(self._slots))):
                slot = threading.Thread(target=self._run_slot, name="batchpool-docker", daemon=True)
                self._slots.append(slot)
                slot.start()
            self._wake.notify_all()
        return [job.id for job in created]

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        unknown: list[str] = []
        with self._lock:
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is None:
                    unknown.append(job_id)
                else:
                    states[job_id] = job.state
        if unknown:  # another process's containers (attach, `batchpool status`)
            for job_id in unknown:
                self.check_job_id(job_id)
            found = self._inspect(unknown)
            for job_id in unknown:
                state = found.get(job_id, {})
                running = state.get("Running") or state.get("Status") in ("created", "running")
                # Gone (removed, or not made yet) or ended: the executor reads the outcome,
                # or explains its absence; every id asked for gets a state.
                states[job_id] = JobState.RUNNING if running else JobState.SUCCEEDED
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        dropped: list[_Job] = []
        running: list[str] = []
        with self._lock:
            for job_id in job_ids:
                self.check_job_id(job_id)
                job = self._jobs.get(job_id)
                if job is None:
                    running.append(job_id)  # another process's container
                    continue
                if job.state.is_final:
                    continue
                job.cancelled = True
                if job in self._queue:
                    self._queue.remove(job)
                    job.state = JobState.CANCELLED
                    dropped.append(job)
                else:
                    running.append(job_id)
        if running:
            # Ends the containers; each slot thread then reports its job CANCELLED.
            self._run(["kill", *running], ok=lambda rc, err: rc == 0 or "No such" in err)
        for job in dropped:
            if job.notify is not None:
                job.notify(JobEvent(job.id, JobState.CANCELLED, reason="cancelled before it ran"))

    def close(self) -> None:
        with self._wake:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            running = [j.id for j in self._jobs.values() if j.state is JobState.RUNNING]
            slots = list(self._slots)
            self._wake.notify_all()
        for job in queued:
            job.state = JobState.CANCELLED
        if running:
            self._run(["kill", *running], ok=lambda rc, err: True)
        for slot in slots:
            slot.join(timeout=COMMAND_TIMEOUT)
        if not self.keep_containers:
            with self._lock:
                ids = list(self._jobs)
            for job_id in ids:
                try:
                    os.unlink(self._log_path(job_id))
                except OSError:
                    pass

    def explain(self, job_id: str) -> str:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None and job.state.is_final:
            # Its event carried the engine's words; what is left to tell is its output.
            path = self._log_path(job_id)
            tail = file_tail(path).strip()
            if tail:
                return f"last lines of the container's output ({path}):\n{tail}"
            return (
                f"the container's output ({path}) is empty: the worker keeps the calls' own "
                "output for the run's logs/, and a killed worker leaves none there"
            )
        self.check_job_id(job_id)
        state = self._inspect([job_id]).get(job_id)
        if not state:
            return f"container {job_id} is gone (removed, or never started)"
        return self._words(job_id, state, int(state.get("ExitCode", -1)))

    # -- running jobs ---------------------------------------------------------------------

    def _run_slot(self) -> None:
        while True:
            with self._wake:
                if self._closed or not self._queue:
                    return
                job = self._queue.popleft()
                job.state = JobState.RUNNING
            if job.notify is not None:
                job.notify(JobEvent(job.id, JobState.RUNNING))
            try:
                event = self._run_container(job)
            except Exception as exc:  # the engine failed: the job is lost, and says why
                event = JobEvent(job.id, JobState.LOST, reason=f"{type(exc).__name__}: {exc}")
            with self._lock:
                job.state = event.state
            if job.notify is not None:
                job.notify(event)

    def _run_container(self, job: _Job) -> JobEvent:
        spec = job.spec
        env = spec.environment()
        argv = self._run_argv(job.id, spec, env)
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = self._log_path(job.id)
        self._count("run")
        with open(log_path, "wb") as log_file:
            # No timeout: a job runs as long as it needs (walltime is the worker's to
            # enforce); cancel and close end it with `docker kill`.
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # The engine's own settings (DOCKER_HOST, ...) are never the job's.
                env={**os.environ, **env, **_engine_settings()},
                check=False,
            )
        code = proc.returncode
        state = self._inspect([job.id]).get(job.id, {})
        if not self.keep_containers:
            self._run(["rm", "-f", job.id], ok=lambda rc, err: True)
        if job.cancelled:
            return JobEvent(job.id, JobState.CANCELLED, code, reason="cancelled (docker kill)")
        if code == 0:
            return JobEvent(job.id, JobState.SUCCEEDED, 0)
        words = self._words(job.id, state, code)
        tail = file_tail(log_path).strip()
        signum = code - 128 if code > 128 else None
        return JobEvent(
            job.id,
            JobState.FAILED,
            code,
            signum,
            reason=words,
            log_tail=tail,
            fatal=code == FATAL_EXIT_CODE,
        )

    def _run_argv(self, name: str, spec: JobSpec, env: dict[str, str]) -> list[str]:
        res = spec.resources
        argv = [self.engine, "run", "--name", name, "--pull", "never"]
        argv += ["--label", f"batchpool.backend={self._token}"]
        argv += ["--label", f"batchpool.job={spec.name}"]
        if self.init:
            # A small init as PID 1: the worker then gets signals as on any machine (the
            # kernel drops a namespace's PID 1's default-action signals, SIGKILL too).
            argv.append("--init")
        if self.network:
            argv += ["--network", self.network]
        if self.user:
            argv += ["--user", self.user]
        mounts = list(self.volumes)
        store = _store_folder(env)
        if store is not None:
            mounts.append(f"{store}:{store}")
        for mount in mounts:
            argv += ["-v", mount]
        if res.cpus:
            argv += ["--cpus", f"{res.cpus:g}"]
        if res.memory:
            memory = _engine_memory(res.memory)
            argv += ["--memory", memory, "--memory-swap", memory]
        if res.gpus:
            argv += ["--gpus", str(math.ceil(res.gpus))]
        if res.working_dir:
            argv += ["-w", res.working_dir]
        for key in env:
            argv += ["-e", key]  # the value comes from the CLI's environment
        argv += [*self.run_args, *res.extra_args, self._image_of(spec)]
        python = res.python or IMAGE_PYTHON
        worker = [python] if isinstance(python, str) else list(python)
        command = [*worker, "-m", "batchpool.worker", *spec.args]
        if res.setup or res.env_script:
            lines = list(res.setup)
            if res.env_script:
                lines.append(f"source {shlex.quote(res.env_script)}")
            lines.append("exec " + shlex.join(command))
            return [*argv, "bash", "-c", "\n".join(lines)]
        return [*argv, *command]

    def _image_of(self, spec: JobSpec) -> str:
        image = spec.resources.image or self.image
        if not image:
            raise ValueError(
                f"job {spec.name!r} names no image: the docker backend runs each job in a "
                "container, so give image=... to the executor, to options(), or to "
                "DockerBackend(image=...); `batchpool image build` builds one that matches "
                "this client"
            )
        return image

    def _check_image(self, image: str) -> None:
        if image in self._images_seen:
            return
        self._run(
            ["image", "inspect", image],
            ok=lambda rc, err: rc == 0,
            hint=(
                f"the image {image!r} is not on this machine's engine ({self.engine}), and "
                "batchpool never pulls (a job would wait on a registry); pull or build it "
                f"first, e.g. `batchpool image build --base python:3.11 -t {image}`"
            ),
        )
        self._images_seen.add(image)

    # -- engine commands ------------------------------------------------------------------

    def _inspect(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``State`` of each named container that exists (one command for all)."""
        out = self._run(
            ["inspect", "--type", "container", "--format", _INSPECT_FORMAT, *names],
            ok=lambda rc, err: True,
        )
        states: dict[str, dict[str, Any]] = {}
        for line in out.splitlines():
            name, _, state = line.partition(" ")
            try:
                states[json.loads(name).lstrip("/")] = json.loads(state)
            except ValueError:
                continue
        return states

    def _words(self, name: str, state: dict[str, Any], code: int) -> str:
        words = [f"container {name} exited with exit code {code}"]
        if state.get("OOMKilled"):
            words.append(
                "OOMKilled: it passed its memory limit and the kernel killed it; give the "
                "job more memory (options(memory=...))"
            )
        elif code in _ENGINE_EXITS:
            words.append(_ENGINE_EXITS[code])
        elif code > 128:
            words.append(f"killed by {signal_name(code - 128)}")
        error = state.get("Error")
        if error:
            words.append(f"the engine says: {error}")
        return "; ".join(words)

    def _log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def _count(self, verb: str) -> None:
        with self._lock:
            self.commands[verb] = self.commands.get(verb, 0) + 1

    def _run(
        self,
        args: Sequence[str],
        *,
        ok: Any = None,
        hint: str = "",
    ) -> str:
        argv = [self.engine, *args]
        self._count(args[0])
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(
                f"`{shlex.join(argv[:3])} ...` could not run: {exc}",
                transient=isinstance(exc, subprocess.TimeoutExpired),
            ) from exc
        accepted = ok(proc.returncode, proc.stderr) if ok else proc.returncode == 0
        if not accepted:
            detail = proc.stderr.strip() or proc.stdout.strip()
            raise BackendError(
                f"`{shlex.join(argv[:4])}` failed with exit status {proc.returncode}: "
                f"{detail[:2000]}" + (f"; {hint}" if hint else ""),
                # The daemon restarts: its CLI cannot reach the socket for a while.
                transient="Cannot connect to the Docker daemon" in detail,
            )
        return proc.stdout


def _store_folder(env: dict[str, str]) -> str | None:
    """The local folder of the run's store named in a job's environment, if it is one."""
    from batchpool.store import STORE_ENV  # the one place that knows the variable

    text = env.get(STORE_ENV)
    if not text:
        return None
    try:
        spec = json.loads(text)
        fs = json.loads(spec["fs"]) if isinstance(spec["fs"], str) else spec["fs"]
        protocol = fs.get("protocol")
        root = spec["root"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    protocols = {protocol} if isinstance(protocol, str) else set(protocol or ())
    if protocols & _LOCAL_PROTOCOLS and isinstance(root, str) and os.path.isabs(root):
        return root.rstrip("/")  # the run's own folder: its chunks, blobs and results
    return None


def _engine_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("DOCKER_", "CONTAINER"))}


def _engine_memory(memory: str) -> str:
    """``8G``, ``512M``, ``2GB`` or bytes as the engine's ``--memory`` takes it (``8g``)."""
    text = memory.strip().lower().removesuffix("b").removesuffix("i")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?[kmgt]?", text):
        raise ValueError(
            f"memory={memory!r} is not an amount the container engine understands; "
            "use e.g. '512M' or '8G'"
        )
    return text
