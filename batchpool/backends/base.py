"""The contract between the executor and an engine that runs jobs, and the registry of engines.

A job runs ``python -m batchpool.worker <args>`` with ``env`` in its environment:
that is all a worker needs to find its chunk in storage and write its outcome.
A backend starts jobs, tells their states, cancels them and cleans up after
itself. It never closes anything it was given by the user.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar

ENTRY_POINT_GROUP = "batchpool.backends"

#: Variables that cap the threads of numerical libraries in a job, set from ``cpus_per_job``.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9: the name of a signal that ended a process, for messages."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


#: How much of a job's output file an explanation quotes: its last lines, read from its end.
LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 8192


def file_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a job's output file (read from at most its last
    ``LOG_TAIL_BYTES``), or "" when it cannot be read."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - LOG_TAIL_BYTES))
            data = file.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def output_words(path: str) -> str:
    """The tail of a job's output file for an explanation, or that there is none."""
    tail = file_tail(path)
    if tail:
        return f"last lines of {path}:\n{tail}"
    return f"its output file {path} is empty or missing"


def remember(table: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """``table[key] = value``, dropping the oldest entries past ``limit`` (a backend's
    memory of ended jobs stays bounded however many jobs a run has)."""
    table[key] = value
    while len(table) > limit:
        table.pop(next(iter(table)))


_AMOUNT = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_MIB_PER_UNIT = {"": 1 / (1024 * 1024), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def amount_mib(memory: str | int, engine: str = "this engine") -> int:
    """MiB of a job option ``memory`` (``"512M"``, ``"8G"``, ``"2GiB"``, bytes as an int)."""
    if isinstance(memory, int):
        return max(1, math.ceil(memory / (1024 * 1024)))
    match = _AMOUNT.fullmatch(memory.strip())
    if match is None:
        raise ValueError(
            f"memory={memory!r} is not an amount {engine} understands; use e.g. '512M' or '8G'"
        )
    mib = float(match.group(1)) * _MIB_PER_UNIT[match.group(2).lower()]
    return max(1, math.ceil(mib))


def duration_seconds(walltime: str) -> int:
    """Seconds of a job option ``walltime``: ``"90"``, ``"30:00"``, ``"1-01:30:00"``."""
    days, _, rest = walltime.strip().rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        total = int(days or 0) * 86400
    except ValueError:
        raise ValueError(f"walltime={walltime!r} is not [D-]HH:MM:SS or seconds") from None
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"walltime={walltime!r} is not [D-]HH:MM:SS or seconds")
    for unit, part in zip((1, 60, 3600)[: len(parts)], reversed(parts), strict=True):
        total += unit * part
    return total


class JobState(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.LOST})


#: Job environment variables that only the executor sets (the store, the run secret).
RESERVED_ENV_PREFIX = "BATCHPOOL_"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _checked_env(env: Any) -> tuple[tuple[str, str], ...]:
    """``env`` of job options as sorted ``(name, value)`` pairs, or a clear error."""
    items = env.items() if isinstance(env, dict) else env
    try:
        pairs = [(name, value) for name, value in items]
    except (TypeError, ValueError):
        raise TypeError(f"job option env={env!r} must be a dict of names to strings") from None
    for name, value in pairs:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"job option env: {name!r} is not an environment variable name")
        if not isinstance(value, str):
            raise TypeError(
                f"job option env[{name!r}] must be a string, not {type(value).__name__}"
            )
        if name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(
                f"job option env[{name!r}]: {RESERVED_ENV_PREFIX}* variables are set by the "
                "executor for each job (they name the run's storage and secret) and cannot "
                "be given"
            )
    return tuple(sorted(pairs))


@dataclass(frozen=True)
class Resources:
    """What one job asks of the engine, and where and how its worker starts.

    Engines use what they support. ``memory`` and ``walltime`` are the engine's
    own notation ("8G", "01:30:00"); ``queue`` is Slurm's partition or SGE's
    queue; ``extra_args`` go to the submit command as they are.
    """

    cpus: float = 1
    memory: str | None = None
    gpus: int = 0
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    extra_args: tuple[str, ...] = ()
    image: str | None = None
    #: The worker's Python: an executable, or an argv list (default: the client's).
    python: str | tuple[str, ...] | None = None
    #: Lines of bash run before the worker starts (``module load``, ``conda activate``).
    setup: tuple[str, ...] = ()
    #: A bash file sourced before the worker starts (e.g. a virtualenv's activate).
    env_script: str | None = None
    #: Extra environment variables of the job.
    env: tuple[tuple[str, str], ...] = ()
    #: The folder the worker starts in (default: the engine's).
    working_dir: str | None = None

    def replace(self, **changes: Any) -> Resources:
        """A copy with ``changes``, checked: unknown names are refused with the known ones."""
        known = set(self.__dataclass_fields__)
        unknown = set(changes) - known
        if unknown:
            raise TypeError(
                f"unknown job option(s) {', '.join(sorted(unknown))}; known: "
                f"{', '.join(sorted(known))}"
            )
        if "env" in changes:
            changes["env"] = _checked_env(changes["env"])
        for name in ("setup", "extra_args"):
            if isinstance(changes.get(name), list):
                changes[name] = tuple(changes[name])
        if isinstance(changes.get("python"), list):
            changes["python"] = tuple(changes["python"])
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class JobSpec:
    """One job: the worker's arguments, its environment, its resources and a readable name."""

    name: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)

    def command(self) -> list[str]:
        """The argv that runs this job's worker on a machine with batchpool installed."""
        python = self.resources.python or sys.executable
        argv = [python] if isinstance(python, str) else list(python)
        return [*argv, "-m", "batchpool.worker", *self.args]

    def environment(self) -> dict[str, str]:
        """The job's environment variables: the executor's, then the user's ``env``, which
        may change anything but the ``BATCHPOOL_`` variables: the store and the secret
        that a worker reads always come from the executor."""
        user = {k: v for k, v in self.resources.env if not k.startswith(RESERVED_ENV_PREFIX)}
        return {**self.env, **user}


@dataclass(frozen=True)
class JobEvent:
    """A change of a job's state that a backend pushes to the executor as it happens."""

    job_id: str
    state: JobState
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    log_tail: str = ""
    #: The worker reported that running the job again cannot help (``errors.is_fatal``):
    #: a pool's word, a task's exception, or a one-job worker's exit status
    #: ``errors.FATAL_EXIT_CODE`` where the engine tells exit statuses.
    fatal: bool = False


Notify = Callable[[JobEvent], None]


class Backend(abc.ABC):
    """An engine that runs jobs. Implement the four abstract methods; see DESIGN.md."""

    #: The name this backend is registered under.
    name: ClassVar[str] = ""
    #: True when ``submit``'s ``notify`` is called for every job's end, so the
    #: executor need not poll ``status`` to learn of it quickly.
    notifies: ClassVar[bool] = False
    #: True when the backend itself runs at most ``max_parallel()`` jobs at once and
    #: queues the rest (a local pool); False when every job handed over may start.
    bounded: ClassVar[bool] = False
    #: True when jobs run where the client's files and ``sys.path`` are (a local
    #: pool): the user's own modules are then imported there, not shipped by value.
    shares_client_code: ClassVar[bool] = False

    #: True when this backend's job ids name jobs that outlive the client process and
    #: that another process can query and cancel (a cluster's scheduler); False when
    #: the jobs live and die with the client (a local pool, a Dask client's futures).
    #: Then a client that attaches to a run checks the store's markers instead.
    job_ids_outlive_client: ClassVar[bool] = False

    #: GiB of memory per core the engine bills by, for the executor's default
    #: ``memory_per_core`` (``billing.billed_cores``): a job that asks more memory than
    #: its CPUs come with is billed the cores that memory implies. None: the engine bills
    #: the CPUs asked for (or bills nothing), whatever the memory.
    memory_per_core: ClassVar[float | None] = None

    def describe(self) -> dict[str, Any]:
        """What a run's manifest records of this backend: ``{"name", "options"}``, where
        ``make_backend(name, **options)`` rebuilds one for ``attach`` (which uses them only
        from a manifest that carries the run's signature). Never command paths or
        environment variables: those come from the configuration of whoever attaches
        (``batchpool`` ignores the options and uses only the name)."""
        return {"name": self.name or type(self).__name__, "options": {}}

    @classmethod
    def check_job_id(cls, job_id: str) -> None:
        """Raise ValueError unless ``job_id`` has the form this engine's ids have; ids read
        from storage are checked before any engine command sees them. The default
        refuses what could pass for an option or break a command line."""
        if not job_id or job_id.startswith("-") or not job_id.isprintable() or " " in job_id:
            raise ValueError(
                f"{job_id!r} is not a job id of the {cls.name or cls.__name__} backend"
            )

    def explain(self, job_id: str) -> str:
        """Why a job ended without success, in the engine's words (state, reason, exit
        status) and the tail of its output, for the error its calls fail with."""
        return ""

    def check_store(self, protocol: str, root: str) -> None:
        """Raise ValueError when this engine's jobs cannot reach a store of ``protocol``
        (fsspec's name: ``file``, ``s3``, ``memory``, ...) at ``root``; called when an
        executor is made, so a store no job reaches is refused before anything runs."""
        return None

    def max_parallel(self) -> int:
        """How many jobs run at once: the pool size of a bounded backend, else a default
        for sizing chunks when the executor gets no ``max_workers``."""
        return 64

    @abc.abstractmethod
    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        """Start ``jobs`` (in one batch where the engine allows) and return their ids, in order."""

    @abc.abstractmethod
    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """The state of each job, in one query to the engine."""

    @abc.abstractmethod
    def cancel(self, job_ids: Sequence[str]) -> None:
        """Stop these jobs if they are queued or running."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what this backend started (worker processes, connections)."""


_BUILTIN: dict[str, str] = {"local": "batchpool.backends.local:LocalBackend"}
_BUILTIN["sge"] = "batchpool.backends.sge:SGEBackend"
_BUILTIN["slurm"] = "batchpool.backends.slurm:SlurmBackend"
_BUILTIN["dask"] = "batchpool.backends.dask:DaskBackend"
_BUILTIN["docker"] = "batchpool.backends.docker:DockerBackend"
_BUILTIN["aws-batch"] = "batchpool.backends.aws_batch:AWSBatchBackend"
_BUILTIN["hail"] = "batchpool.backends.hail:HailBatchBackend"
_BUILTIN["ray"] = "batchpool.backends.ray:RayBackend"
_BUILTIN["htcondor"] = "batchpool.backends.htcondor:HTCondorBackend"
_REGISTERED: dict[str, type[Backend]] = {}


def register_backend(name: str, cls: type[Backend]) -> None:
    """Make ``backend=name`` create ``cls``; third parties may use the entry point group instead."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"register_backend({name!r}, ...) needs a Backend subclass, not {cls!r}")
    _REGISTERED[name] = cls


def _load(target: str) -> type[Backend]:
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a batchpool Backend subclass")
    return cls


def available_backends() -> list[str]:
    """The names ``backend=`` accepts: built-in, registered and from entry points."""
    names = set(_BUILTIN) | set(_REGISTERED)
    names |= {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def backend_class(name: str) -> type[Backend]:
    """The Backend class registered as ``name``."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return _load(_BUILTIN[name])
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _load(ep.value)
    raise ValueError(
        f"backend={name!r} is not a known backend; known: {', '.join(available_backends())}. "
        f"Third-party engines register under the entry point group {ENTRY_POINT_GROUP!r}"
    )


def make_backend(name: str, **options: Any) -> Backend:
    return backend_class(name)(**options)
