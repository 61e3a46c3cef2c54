"""HTCondor: jobs become the procs of clusters, submitted through the ``htcondor2`` bindings.

One dispatch batch becomes one submit per group of jobs that share their resources
and environment: a cluster of N procs (``queue N``), whose proc number picks the
job (the script's first argument is ``$(Process)``); a job's id is
``<cluster>.<proc>``. One schedd query (``condor_q``) tells the state of every job
the executor waits for; jobs that left the queue are looked up in the schedd's
history (``condor_history``). A held job is a failure: it is removed, and its
``HoldReason`` explains it.

Why the Python bindings rather than ``condor_submit``/``condor_q``: their answers
are ClassAds, not text to parse; a cluster of any size is one call; and they need
no HTCondor installation on the client, only ``pip install htcondor`` and a
configuration naming the pool (``CONDOR_CONFIG``), as on any submit host.

HTCondor never runs jobs as root: they run as the user the schedd authenticated
(the submitter, or a token's identity), so the store and ``log_dir`` must be
writable by that user. ``check_store`` says so before anything runs.
"""

from __future__ import annotations

import getpass
import grp
import math
import os
import pwd
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from batchpool.backends.base import (
    Backend,
    JobSpec,
    JobState,
    Notify,
    amount_mib,
    duration_seconds,
    output_words,
    signal_name,
)
from batchpool.backends.script import alike_groups, batch_name, job_script
from batchpool.errors import BackendError

#: Seconds any call to the schedd or collector may take before it counts as failed.
COMMAND_TIMEOUT = 120.0

#: The reason batchpool gives when it removes jobs; a job removed with it is CANCELLED.
CANCEL_REASON = "cancelled by batchpool"
#: The reason prefix when batchpool removes a held job (it failed; holding helps no one).
HELD_REASON = "batchpool removed it after it was held"

#: What the bindings say when the schedd or collector cannot be reached (a restart,
#: a network cut, an overload): transient, the executor asks again within its grace.
UNREACHABLE = (
    "Failed to connect",
    "Failed communication",
    "failed to connect",
    "Unable to locate",
    "Unable to connect",
    "Connection refused",
    "connection refused",
    "Connection reset",
    "timed out",
    "Timed out",
    "Failed to send",
    "failed to send",
    "Failed to fetch ads",
    "Failed to get",
    "Failed to end classad message",
    "Failed to receive",
    "Unable to find address",
    "Can't find address",
    "CEDAR",
)

# JobStatus values.
_IDLE, _RUNNING, _REMOVED, _COMPLETED, _HELD, _TRANSFERRING, _SUSPENDED = range(1, 8)
_STATUS_WORDS = {
    _IDLE: "idle",
    _RUNNING: "running",
    _REMOVED: "removed",
    _COMPLETED: "completed",
    _HELD: "held",
    _TRANSFERRING: "transferring output",
    _SUSPENDED: "suspended",
}
#: HoldReasonCode values that mean a limit of the job stopped it.
_HOLD_WALLTIME = {46, 47}  # allowed_job_duration, allowed_execute_duration
_HOLD_MEMORY = {34}  # JobOutOfResources: memory usage went over request_memory

_PROJECTION = [
    "ClusterId",
    "ProcId",
    "JobStatus",
    "ExitCode",
    "ExitBySignal",
    "ExitSignal",
    "HoldReason",
    "HoldReasonCode",
    "HoldReasonSubCode",
    "RemoveReason",
    "RemoteWallClockTime",
    "MemoryUsage",
    "RequestMemory",
    "AllowedExecuteDuration",
    "Out",
    "Owner",
]

#: A submit command's name: ``request_memory``, ``+JobFlavour``, ``MY.Attr``.
_SUBMIT_KEY = re.compile(r"\+?[A-Za-z_][A-Za-z0-9_.]*")
_JOB_ID = re.compile(r"([0-9]{1,12})\.([0-9]{1,9})")
_T = TypeVar("_T")


def _split_id(job_id: str) -> tuple[int, int]:
    match = _JOB_ID.fullmatch(job_id) if isinstance(job_id, str) else None
    if not match:
        raise ValueError(f"{job_id!r} is not an HTCondor job id of this backend (<cluster>.<proc>)")
    return int(match.group(1)), int(match.group(2))


def _bindings() -> ModuleType:
    try:
        import htcondor2
    except ImportError as exc:
        raise ImportError(
            "HTCondorBackend needs HTCondor's Python bindings: pip install 'batchpool[htcondor]'"
        ) from exc
    return htcondor2


def submit_value(text: str) -> str:
    """``text`` as a value of a submit description: ``$`` starts a macro there, so a
    literal one is written ``$(DOLLAR)``."""
    return text.replace("$", "$(DOLLAR)")


def environment_value(env: Mapping[str, str]) -> str:
    """The ``environment`` of a submit description in HTCondor's quoted syntax: the whole
    list in double quotes, each value in single quotes, and inside a value every ``'``
    and ``"`` doubled (values carry JSON). A ``$`` becomes ``$(DOLLAR)`` where the
    description is made (``submit_value``)."""
    parts = []
    for name, value in env.items():
        if any(c in value for c in "\n\r\0"):
            raise ValueError(
                f"environment variable {name} holds a newline or NUL, which an HTCondor "
                "job's environment cannot carry; pass it in a file instead"
            )
        if "$$" in value:
            # After the submit language, the schedd reads $$ as a match-time macro
            # ($$(attr)); HTCondor 23's schedd crashed on one here.
            raise ValueError(
                f"environment variable {name} holds '$$', which HTCondor reads as a "
                "match-time macro in a job's environment; set it in a setup line or an "
                "env_script instead"
            )
        quoted = value.replace("'", "''").replace('"', '""')
        parts.append(f"{name}='{quoted}'")
    return '"' + " ".join(parts) + '"'


def _submit_lines(lines: Sequence[str], where: str) -> dict[str, str]:
    """``key = value`` lines of a submit description as a dict, or a clear error."""
    commands: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep or not _SUBMIT_KEY.fullmatch(key.strip()):
            raise ValueError(
                f"{where}: {line!r} is not a submit description line `key = value` "
                '(e.g. "requirements = OpSysMajorVer == 12" or \'+JobFlavour = "espresso"\')'
            )
        commands[key.strip()] = value.strip()
    return commands


class HTCondorBackend(Backend):
    """Run jobs as the procs of HTCondor clusters.

    - ``pool``: the collector's address (``host:port``); default: the configuration's
      ``COLLECTOR_HOST``.
    - ``schedd_name``: the schedd to submit to; default: the pool's first (the local one
      on a submit host).
    - ``accounting_group``: for jobs whose resources name no ``account``.
    - ``submit_options``: more submit description commands for every job, as
      ``{"requirements": "...", "+JobFlavour": '"espresso"'}``; a job's ``extra_args``
      are such lines too (``"key = value"``).
    - ``log_dir``: where each cluster's script and each job's output file go; it must be
      reachable from the execute nodes (or files are transferred) and writable by the
      user the jobs run as (default: ``~/.cache/batchpool/htcondor``). The calls' output
      also ends up in the run's ``logs/`` in storage.
    - ``max_jobs``: how many jobs run at once, for sizing ``map``'s chunks when the
      executor gets no ``max_workers``; default: the pool's CPUs, or 64.
    - ``max_cluster_size``: the most procs per cluster (one submit); larger groups are
      split (default 20,000, HTCondor's default ``MAX_JOBS_PER_SUBMISSION``).
    - ``min_status_interval``: seconds between two queue queries at least; a poll sooner
      than that is answered from the last one.
    """

    name = "htcondor"
    notifies = False
    bounded = False
    shares_client_code = False
    job_ids_outlive_client = True

    def __init__(
        self,
        pool: str | None = None,
        schedd_name: str | None = None,
        *,
        accounting_group: str | None = None,
        submit_options: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        max_jobs: int | None = None,
        max_cluster_size: int = 20_000,
        min_status_interval: float = 1.0,
    ) -> None:
        for label, value in (("max_jobs", max_jobs), ("max_cluster_size", max_cluster_size)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0
            ):
                raise ValueError(f"{label}={value!r} must be a positive int")
        self.max_cluster_size = max_cluster_size
        self.pool = pool
        self.schedd_name = schedd_name
        self.accounting_group = accounting_group
        self.submit_options = dict(submit_options or {})
        if log_dir is None:
            log_dir = Path.home() / ".cache" / "batchpool" / "htcondor"
        self.log_dir = str(Path(log_dir).expanduser().absolute())
        self.min_status_interval = min_status_interval
        self._max_jobs = max_jobs
        self._htcondor = _bindings()
        # Guards the backend's own state; status runs in a thread of its own.
        self._lock = threading.Lock()
        # One bindings call at a time: the bindings' thread safety is not documented.
        self._engine_lock = threading.Lock()
        self._schedd: Any = None
        self._owner: str | None = None
        self._final: dict[str, JobState] = {}
        self._ads: dict[str, dict[str, Any]] = {}  # job id -> its last ClassAd, as a dict
        self._last_query = -math.inf
        self._last_states: dict[str, JobState] = {}
        #: How many submits (one per cluster) this backend made.
        self.submit_calls = 0
        #: How many queries ``status`` made (queue and history).
        self.status_calls = 0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": {
                "log_dir": self.log_dir,
                "pool": self.pool,
                "schedd_name": self.schedd_name,
            },
        }

    @classmethod
    def check_job_id(cls, job_id: str) -> None:
        _split_id(job_id)

    def __repr__(self) -> str:
        where = f"pool={self.pool!r}" if self.pool else "the configured pool"
        return f"HTCondorBackend({where})"

    # -- talking to the pool ----------------------------------------------------------------

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        """Run one bindings call, bounded by ``COMMAND_TIMEOUT``; its result, or
        BackendError saying what failed (transient when the pool could not be reached).

        The bindings take no timeout of their own, so the call runs in a daemon thread
        that is abandoned if it does not answer in time (HTCondor's own network timeouts
        end it later)."""
        outcome: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                with self._engine_lock:
                    outcome.append((True, call()))
            except BaseException as exc:  # handed to the caller's thread
                outcome.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=run, name="batchpool-htcondor", daemon=True).start()
        if not done.wait(COMMAND_TIMEOUT):
            raise BackendError(
                f"HTCondor's {what} did not answer within {COMMAND_TIMEOUT:.0f} s: are the "
                f"collector and schedd running and reachable? ({self._hint()})",
                transient=True,
            )
        ok, value = outcome[0]
        if ok:
            return value
        if isinstance(value, BackendError) or not isinstance(value, Exception):
            raise value
        text = f"{type(value).__name__}: {value}"
        unreachable = any(words in text for words in UNREACHABLE)
        if unreachable:
            with self._lock:
                self._schedd = None  # locate it again: it may have moved or restarted
        raise BackendError(
            f"HTCondor's {what} failed: {text}\nCheck that this machine can talk to the "
            f"pool: {self._hint()}",
            transient=unreachable,
        ) from value

    def _schedd_handle(self) -> Any:
        with self._lock:
            if self._schedd is not None:
                return self._schedd
        htcondor = self._htcondor

        def locate() -> Any:
            return htcondor.Schedd(self._schedd_ad())

        schedd = self._call("collector (locating the schedd)", locate)
        with self._lock:
            self._schedd = schedd
        return schedd

    def _schedd_ad(self) -> Any:
        """The schedd's location ad: the one named, else this host's, else the pool's
        first (called inside ``_call``)."""
        htcondor = self._htcondor
        collector = htcondor.Collector(self.pool) if self.pool else htcondor.Collector()
        if self.schedd_name:
            return collector.locate(htcondor.DaemonType.Schedd, self.schedd_name)
        try:
            return collector.locate(htcondor.DaemonType.Schedd)  # a submit host's own
        except htcondor.HTCondorException:
            ads = collector.query(htcondor.AdType.Schedd)
        if not ads:  # the collector answers without it: a schedd restarting, as a rule
            raise BackendError(
                f"the pool's collector lists no schedd to submit to ({self._hint()})",
                transient=True,
            )
        return ads[0]

    def job_owner(self) -> str:
        """The user the pool runs this client's jobs as: the identity the schedd
        authenticated (a token's, or this user's), without its domain."""
        if self._owner is None:
            htcondor = self._htcondor

            def ping() -> Any:
                return htcondor.ping(self._schedd_ad(), "WRITE")

            answer = self._call("schedd (asking who we are)", ping)
            name = str(answer.get("MyRemoteUserName", "") or "")
            self._owner = name.split("@", 1)[0] or getpass.getuser()
        return self._owner

    def max_parallel(self) -> int:
        if self._max_jobs is None:
            self._max_jobs = self._pool_cpus() or 64
        return self._max_jobs

    def _pool_cpus(self) -> int:
        htcondor = self._htcondor

        def cpus() -> int:
            # A partitionable slot's Cpus are those still free; TotalSlotCpus all of
            # them. Dynamic slots are carved out of a partitionable one: not counted.
            collector = htcondor.Collector(self.pool) if self.pool else htcondor.Collector()
            ads = collector.query(
                htcondor.AdType.Startd, projection=["Cpus", "TotalSlotCpus", "SlotType"]
            )
            return sum(
                int(ad.get("TotalSlotCpus", ad.get("Cpus", 0)))
                for ad in ads
                if ad.get("SlotType") != "Dynamic"
            )

        try:
            return self._call("collector (counting CPUs)", cpus)
        except BackendError:
            return 0

    # -- the store must be writable by the jobs' user ----------------------------------------

    def check_store(self, protocol: str, root: str) -> None:
        if protocol not in ("file", "local") or os.geteuid() != 0:
            return  # a non-root client's jobs run as itself; object stores need no check
        owner = self.job_owner()
        if owner == "root":
            return
        for label, folder in (("the store", root), ("log_dir", self.log_dir)):
            problem = _unwritable_for(owner, folder)
            if problem:
                raise ValueError(
                    f"HTCondor runs jobs as {owner!r}, never as root, and {label} {folder} "
                    f"is not writable by that user: {problem}. Run the client as {owner!r}, "
                    f"or give {label} a folder that user may write (and set the umask so "
                    "the folders batchpool creates stay writable: os.umask(0o000), or 0o002 "
                    "with a shared group), or use a gs:// or s3:// store"
                )

    # -- the contract ---------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        if not jobs:
            return []
        ids: list[str | None] = [None] * len(jobs)
        for group in alike_groups(jobs):
            # A schedd refuses a submission of more than MAX_JOBS_PER_SUBMISSION jobs.
            for start in range(0, len(group), self.max_cluster_size):
                positions = group[start : start + self.max_cluster_size]
                cluster = self._submit_cluster([jobs[p] for p in positions])
                for proc, position in enumerate(positions):
                    ids[position] = f"{cluster}.{proc}"
        return [i for i in ids if i is not None]

    def _submit_cluster(self, specs: Sequence[JobSpec]) -> int:
        """One cluster of ``len(specs)`` procs; its id."""
        description = self.description(specs)
        folder = os.path.join(self.log_dir, "scripts")
        os.makedirs(folder, exist_ok=True)
        # The script holds no secret (the environment is in the description), so it may
        # be readable by the jobs' user, which is not this one when root submits.
        script = os.path.join(folder, f"{description['batch_name']}-{uuid.uuid4().hex}.sh")
        with open(script, "w", encoding="utf-8") as file:
            file.write(job_script(specs, "1", export_env=False))
        os.chmod(script, 0o755)
        description["executable"] = submit_value(script)
        htcondor = self._htcondor
        submit = htcondor.Submit(description)
        schedd = self._schedd_handle()
        with self._lock:
            self.submit_calls += 1
        result = self._call(
            f"submit of {len(specs)} jobs", lambda: schedd.submit(submit, count=len(specs))
        )
        return int(result.cluster())

    def description(self, specs: Sequence[JobSpec]) -> dict[str, str]:
        """The submit description of a cluster running ``specs`` (all sharing their
        resources and environment), without its executable."""
        first = specs[0]
        res = first.resources
        if res.queue:
            raise ValueError(
                f"job option queue={res.queue!r}: HTCondor has no queues; choose machines "
                "with a requirements expression or the pool's own attribute, e.g. "
                'extra_args=["requirements = ...", \'+JobFlavour = "espresso"\']'
            )
        out = os.path.join(submit_value(self.log_dir), "htcondor-$(Cluster).$(Process).out")
        description = {
            "batch_name": batch_name(specs),
            "arguments": "$(Process)",
            "output": out,
            "error": out,
            "initialdir": submit_value(self.log_dir),
            "environment": submit_value(environment_value(first.environment())),
            "request_cpus": str(max(1, math.ceil(res.cpus))),
            "notification": "never",
            "getenv": "false",
        }
        if res.memory:
            description["request_memory"] = str(amount_mib(res.memory, engine="HTCondor"))
        if res.gpus:
            description["request_gpus"] = str(int(res.gpus))
        if res.walltime:
            # The execute node holds a job that runs longer (HoldReasonCode 47); status
            # then fails it with that reason and removes it.
            description["allowed_execute_duration"] = str(duration_seconds(res.walltime))
        group = res.account or self.accounting_group
        if group:
            description["accounting_group"] = submit_value(group)
        description.update(self.submit_options)
        description.update(_submit_lines(res.extra_args, "job option extra_args"))
        return description

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        wanted: list[str] = []
        with self._lock:
            for job_id in job_ids:
                if job_id in self._final:
                    states[job_id] = self._final[job_id]
                else:
                    _split_id(job_id)
                    wanted.append(job_id)
            if not wanted:
                return states
            if time.monotonic() - self._last_query < self.min_status_interval:
                # Schedds are shared: answer from the last query (a job submitted since
                # is pending as far as anyone can tell) rather than ask again.
                for job_id in wanted:
                    states[job_id] = self._last_states.get(job_id, JobState.PENDING)
                return states
            self._last_query = time.monotonic()
        found = self._ads_of(wanted)
        held: dict[str, list[str]] = {}  # hold reason -> jobs held for it
        with self._lock:
            for job_id in wanted:
                ad = found.get(job_id)
                state = _state(ad)
                if ad is not None:
                    self._ads[job_id] = {**self._ads.get(job_id, {}), **ad}
                    if ad.get("JobStatus") == _HELD:
                        held.setdefault(str(ad.get("HoldReason", "")), []).append(job_id)
                states[job_id] = state
                if state.is_final:
                    self._final[job_id] = state
            self._last_states = {j: states[j] for j in wanted}
        # A held job waits for a person; this one has failed: take it away.
        for hold_reason, job_ids_held in held.items():
            try:
                self._remove(job_ids_held, f"{HELD_REASON}: {hold_reason}")
            except BackendError:
                break  # removed at the next status, or by the executor's cancel
        return states

    def _ads_of(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The ClassAd of each job, from the queue, else from the history."""
        schedd = self._schedd_handle()
        clusters = sorted({_split_id(j)[0] for j in job_ids})
        constraint = f"member(ClusterId, {{{', '.join(map(str, clusters))}}})"
        with self._lock:
            self.status_calls += 1
        ads = self._call("queue query", lambda: schedd.query(constraint, _PROJECTION))
        found = {_ad_id(ad): _plain(ad) for ad in ads}
        missing = [j for j in job_ids if j not in found]
        if missing:
            left = sorted({_split_id(j)[0] for j in missing})
            constraint = f"member(ClusterId, {{{', '.join(map(str, left))}}})"
            with self._lock:
                self.status_calls += 1
            past = self._call("history query", lambda: schedd.history(constraint, _PROJECTION))
            for ad in past:
                found.setdefault(_ad_id(ad), _plain(ad))
        return found

    def explain(self, job_id: str) -> str:
        parts: list[str] = []
        with self._lock:
            ad = self._ads.get(job_id)
        try:  # the freshest word: the job may have left the queue since the last status;
            # what an earlier ad said (a hold's reason) stays unless this one says otherwise
            ad = {**(ad or {}), **self._ads_of([job_id]).get(job_id, {})} or None
        except BackendError as exc:
            parts.append(f"(HTCondor could not tell: {exc})")
        cluster, proc = _split_id(job_id)
        log_path = os.path.join(self.log_dir, f"htcondor-{cluster}.{proc}.out")
        if ad is not None:
            parts.append("HTCondor says " + _ad_words(ad))
            limit = _limit_words(ad)
            if limit:
                parts.append(limit)
            out = ad.get("Out")
            if isinstance(out, str) and os.path.isabs(out):
                log_path = out
        elif not parts:
            parts.append("HTCondor knows no such job, in its queue or its history")
        parts.append(output_words(log_path))
        return "; ".join(parts)

    def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        for job_id in job_ids:
            _split_id(job_id)  # only ids of this backend's form reach the schedd
        self._remove(list(job_ids), CANCEL_REASON)

    def _remove(self, job_ids: list[str], reason: str) -> None:
        """Remove these jobs in one call (jobs already gone are no error)."""
        schedd = self._schedd_handle()
        action = self._htcondor.JobAction.Remove
        self._call(
            f"removal of {len(job_ids)} jobs",
            lambda: schedd.act(action, job_ids, reason=reason),
        )

    def close(self) -> None:
        """Nothing to release: the schedd is asked per call, and jobs end only by cancel()."""

    def _hint(self) -> str:
        config = os.environ.get("CONDOR_CONFIG")
        where = f"CONDOR_CONFIG={config}" if config else "CONDOR_CONFIG is not set"
        pool = f"pool={self.pool}" if self.pool else "the configuration's COLLECTOR_HOST"
        return f"{where}, {pool}; does `condor_status -schedd` list the schedd?"


def _plain(ad: Any) -> dict[str, Any]:
    """A ClassAd as a dict of evaluated values (``MemoryUsage`` is an expression);
    attributes that evaluate to UNDEFINED or ERROR are left out."""
    plain: dict[str, Any] = {}
    for key in ad:
        try:
            value = ad.eval(key)
        except Exception:  # the bindings raise their own types for unevaluable attributes
            continue
        if isinstance(value, (str, int, float, bool)):
            plain[key] = value
    return plain


def _ad_id(ad: Mapping[str, Any]) -> str:
    return f"{int(ad['ClusterId'])}.{int(ad['ProcId'])}"


def _state(ad: Mapping[str, Any] | None) -> JobState:
    """The JobState of a job's ClassAd (None: in neither the queue nor the history)."""
    if ad is None:
        return JobState.LOST
    status = ad.get("JobStatus")
    if status == _IDLE:
        return JobState.PENDING
    if status in (_RUNNING, _TRANSFERRING, _SUSPENDED):
        return JobState.RUNNING
    if status == _HELD:
        return JobState.FAILED
    if status == _REMOVED:
        reason = str(ad.get("RemoveReason", ""))
        if reason.startswith(HELD_REASON) or "PeriodicRemove" in reason:
            return JobState.FAILED  # removed by a limit, not by anyone's wish
        return JobState.CANCELLED
    if status == _COMPLETED:
        if ad.get("ExitBySignal") or ad.get("ExitCode") not in (0, None):
            return JobState.FAILED
        return JobState.SUCCEEDED
    return JobState.LOST


def _ad_words(ad: Mapping[str, Any]) -> str:
    status = ad.get("JobStatus")
    words = [f"JobStatus={status} ({_STATUS_WORDS.get(status, 'unknown')})"]  # type: ignore[arg-type]
    if ad.get("ExitBySignal"):
        signum = int(ad.get("ExitSignal", 0) or 0)
        words.append(f"killed by {signal_name(signum)}")
    elif ad.get("ExitCode") is not None:
        words.append(f"ExitCode={ad.get('ExitCode')}")
    for key in ("HoldReason", "RemoveReason"):
        if ad.get(key):
            words.append(f"{key}={ad[key]!r}")
    if ad.get("HoldReasonCode") is not None and ad.get("HoldReason"):
        words.append(f"HoldReasonCode={ad['HoldReasonCode']}")
    for key in ("RemoteWallClockTime", "MemoryUsage", "RequestMemory"):
        if ad.get(key) is not None:
            words.append(f"{key}={ad[key]}")
    return " ".join(words)


def _limit_words(ad: Mapping[str, Any]) -> str:
    """Which of the job's limits stopped it, in the words of the job options."""
    code = ad.get("HoldReasonCode")
    reason = f"{ad.get('HoldReason', '')} {ad.get('RemoveReason', '')}".lower()
    if code in _HOLD_WALLTIME or "duration" in reason:
        limit = ad.get("AllowedExecuteDuration")
        seconds = f" of {limit} s" if limit is not None else ""
        return f"killed: runtime limit{seconds} (the walltime job option) reached"
    if code in _HOLD_MEMORY or "memory" in reason:
        mib = ad.get("RequestMemory")
        amount = f" of {mib} MiB" if mib is not None else ""
        return f"killed: memory limit{amount} (the memory job option, request_memory) exceeded"
    return ""


def _unwritable_for(user: str, folder: str) -> str:
    """Why ``user`` could not create files in ``folder`` and in the folders this
    process creates beneath it, or "" when it could; a user unknown here counts as
    "others" (a pool's job user need not exist on the submit host)."""
    try:
        entry = pwd.getpwnam(user)
        uid = entry.pw_uid
        gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    except KeyError:
        uid, gids = -1, set()

    def allows(mode: int, owner: int, group: int, bit: int) -> bool:
        shift = 6 if owner == uid else 3 if group in gids else 0
        return mode & (bit << shift) == bit << shift

    path = Path(folder).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    for parent in [existing, *existing.parents]:
        info = parent.stat()
        if not allows(info.st_mode, info.st_uid, info.st_gid, 1):
            return f"it cannot enter {parent} (mode {stat.filemode(info.st_mode)})"
    info = existing.stat()
    if not allows(info.st_mode, info.st_uid, info.st_gid, 2):
        return f"it cannot write in {existing} (mode {stat.filemode(info.st_mode)})"
    # The run's folders are created by this process, with its umask.
    umask = os.umask(0)
    os.umask(umask)
    if not allows(0o777 & ~umask, os.geteuid(), os.getegid(), 3):
        return (
            f"the folders batchpool creates in it get mode {0o777 & ~umask:o} "
            f"(this process's umask is {umask:03o})"
        )
    return ""
