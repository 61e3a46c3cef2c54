"""Son of Grid Engine (and other Grid Engines): array jobs through ``qsub -t``.

Jobs that share their resources and environment become one array job: one bash
script (``job_script``) handed to ONE ``qsub -terse -t 1-n`` on its standard input
(``qsub -b y`` re-parses its argv, so the script never travels as arguments).
A job's id is ``"<job number>.<task>"``.

``status`` asks ``qstat -xml`` once for every job of the user. A task that qstat no
longer lists has ended: it is reported SUCCEEDED, and the executor reads its outcome
from the store; a task that ended without one is explained (``explain``) from
``qacct -j`` (its ``exit_status`` and ``failed`` fields) and the tail of its output
file, then retried or failed.

Every command that fails raises ``BackendError`` naming the command, its exit
status and its error output.
"""

from __future__ import annotations

import getpass
import math
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from batchpool.backends.base import (
    Backend,
    JobSpec,
    JobState,
    Notify,
    file_tail,
    signal_name,
)
from batchpool.backends.script import alike_groups, job_script
from batchpool.errors import BackendError

#: The array size used when ``max_array_size`` is not given and ``qconf`` cannot tell.
DEFAULT_MAX_ARRAY_SIZE = 75_000
#: Seconds a command may take before it counts as failed.
COMMAND_TIMEOUT = 120.0

#: What SGE's commands print when sge_qmaster cannot be reached (a restart, a
#: fail-over to the shadow master): transient, the executor asks again within its
#: engine_outage_grace.
UNREACHABLE = (
    "unable to contact qmaster",
    "unable to send message to qmaster",
    "commlib error",
    "can't connect to service",
    "failed receiving gdi request",
    "Connection refused",
    "Connection timed out",
    "Connection reset by peer",
)
#: Seconds ``explain`` waits for ``qacct`` to learn of a job that just ended.
ACCOUNTING_WAIT = 5.0

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_TASK_ID = re.compile(r"([0-9]{1,20})\.([0-9]{1,10})")


def _default_log_dir() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_cache_dir("batchpool"), "sge-logs")


def _state(code: str) -> JobState:
    """JobState of a qstat state code (``qw``, ``hqw``, ``r``, ``t``, ``Eqw``, ``dr``, ...)."""
    if "E" in code:
        return JobState.FAILED
    if "d" in code:
        return JobState.CANCELLED
    if any(c in code for c in "rtsST"):
        return JobState.RUNNING
    return JobState.PENDING


def _task_numbers(text: str) -> Iterable[int]:
    """The task numbers of a qstat task list: ``"3"``, ``"1-100:1"``, ``"2,5-9:2"``."""
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        span, _, step = part.partition(":")
        first, _, last = span.partition("-")
        start = int(first)
        yield from range(start, int(last or first) + 1, int(step or 1))


def _split_id(job_id: str) -> tuple[str, str]:
    match = _TASK_ID.fullmatch(job_id) if isinstance(job_id, str) else None
    if match is None:
        raise ValueError(f"{job_id!r} is not an SGE task id of the form '<job number>.<task>'")
    return match.group(1), match.group(2)


def _job_name(spec: JobSpec) -> str:
    name = _NAME_UNSAFE.sub("_", spec.name)[:64] or "batchpool"
    return name if name[0].isalpha() else f"bp{name}"


def _describe_exit(exit_status: int) -> str:
    if exit_status > 128:
        signum = exit_status - 128
        words = f"exit_status {exit_status} (killed by {signal_name(signum)})"
        if signum == signal.SIGKILL:
            words += (
                "; SGE sends it when the job passes its h_vmem or h_rt limit, "
                "so do the out-of-memory killer and `kill -9`"
            )
        return words
    return f"exit_status {exit_status}"


class SGEBackend(Backend):
    """Run jobs as Son of Grid Engine array jobs.

    ``queue`` (``-q``) and ``project`` (``-P``) apply unless a job's resources name
    its own ``queue``/``account``. ``max_array_size`` caps the tasks of one ``qsub``
    (default: the cluster's ``max_aj_tasks``); ``max_running`` caps the tasks of an
    array running at once (``-tc``). ``pe`` is the parallel environment requested
    for jobs of more than one cpu (``-pe PE cpus``; none unless given).
    ``gpu_resource`` is the complex requested for gpus (``-l NAME=gpus``).
    ``extra_args`` go to every ``qsub`` as they are. ``log_dir`` holds the engine's
    output file of each job (it must be reachable from the execution hosts; the
    worker copies its own output to the run's ``logs/`` in the store as well).
    ``parallel`` is how many jobs run at once, for sizing ``map``'s chunks when the
    executor gets no ``max_workers``; default: the queue's slots (``qstat -g c``),
    or 64 when SGE does not say.
    """

    name = "sge"
    notifies = False
    bounded = False
    shares_client_code = False

    def __init__(
        self,
        queue: str | None = None,
        project: str | None = None,
        max_array_size: int | None = None,
        max_running: int | None = None,
        extra_args: Sequence[str] = (),
        qsub: str = "qsub",
        *,
        qstat: str = "qstat",
        qdel: str = "qdel",
        qacct: str = "qacct",
        qconf: str = "qconf",
        pe: str | None = None,
        gpu_resource: str | None = None,
        log_dir: str | None = None,
        keep_logs: bool = False,
        parallel: int | None = None,
    ) -> None:
        for label, value in (("max_array_size", max_array_size), ("max_running", max_running)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{label} must be a positive int, not {value!r}")
        if isinstance(extra_args, str):
            extra_args = shlex.split(extra_args)
        self.queue = queue
        self.project = project
        self.max_array_size = max_array_size
        self.max_running = max_running
        self.extra_args = tuple(extra_args)
        self.pe = pe
        self.gpu_resource = gpu_resource
        self.log_dir = os.path.abspath(log_dir or _default_log_dir())
        self.keep_logs = keep_logs
        self._commands = {
            "qsub": qsub,
            "qstat": qstat,
            "qdel": qdel,
            "qacct": qacct,
            "qconf": qconf,
        }
        self._parallel = parallel
        self._lock = threading.Lock()
        self._submitted: list[str] = []
        #: How many times ``qsub`` and ``qstat`` ran (batching is the point of this backend).
        self.qsub_calls = 0
        self.status_calls = 0

    job_ids_outlive_client = True

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": {"log_dir": self.log_dir, "queue": self.queue}}

    @classmethod
    def check_job_id(cls, job_id: str) -> None:
        _split_id(job_id)

    def __repr__(self) -> str:
        return f"SGEBackend(queue={self.queue!r}, project={self.project!r})"

    def max_parallel(self) -> int:
        if self._parallel is None:
            self._parallel = self._queue_slots() or 64
        return self._parallel

    def _queue_slots(self) -> int:
        """The slots of the queue (of all queues when none is named), 0 if unknown."""
        try:
            out = subprocess.run(
                [self._commands["qstat"], "-g", "c"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        total = 0
        for line in out.splitlines()[2:]:
            fields = line.split()
            if len(fields) >= 6 and (self.queue is None or fields[0] == self.queue):
                try:
                    total += int(fields[5])  # CLUSTER QUEUE CQLOAD USED RES AVAIL TOTAL
                except ValueError:
                    continue
        return total

    # -- the contract ---------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        ids: list[str] = [""] * len(jobs)
        limit = self._array_limit() if jobs else 1
        os.makedirs(self.log_dir, exist_ok=True)
        for indices in alike_groups(jobs):
            for start in range(0, len(indices), limit):
                part = indices[start : start + limit]
                number = self._qsub([jobs[i] for i in part])
                for task, i in enumerate(part, start=1):
                    ids[i] = f"{number}.{task}"
        with self._lock:
            self._submitted.extend(ids)
        return ids

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        self.status_calls += 1
        listed = self._qstat()
        states: dict[str, JobState] = {}
        for job_id in job_ids:
            _split_id(job_id)
            # Absent from qstat: it ended; the executor reads its outcome or explains it.
            states[job_id] = listed.get(job_id, JobState.SUCCEEDED)
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        tasks: dict[str, list[int]] = {}
        for job_id in job_ids:
            number, task = _split_id(job_id)
            tasks.setdefault(number, []).append(int(task))
        argv = [self._commands["qdel"]]
        for number, numbers in tasks.items():
            argv += [number, "-t", _ranges(numbers)]
        # qdel exits non-zero when some tasks have ended already: that is not a failure.
        self._run(argv, ok=lambda rc, err: rc == 0 or "does not exist" in err)

    def close(self) -> None:
        with self._lock:
            submitted, self._submitted = self._submitted, []
        if self.keep_logs:
            return
        for job_id in submitted:
            try:
                os.unlink(self._log_path(job_id))
            except OSError:
                pass

    def explain(self, job_id: str) -> str:
        number, task = _split_id(job_id)
        parts: list[str] = []
        if self._qstat().get(job_id) is JobState.FAILED:
            # Eqw: SGE could not start it and keeps it queued in error; say why, remove it.
            out = self._run([self._commands["qstat"], "-j", number], ok=lambda rc, err: True)
            reasons = [line.strip() for line in out.splitlines() if "error" in line.lower()]
            self.cancel([job_id])
            return f"SGE job {number} task {task} is in error state (Eqw), removed with qdel: " + (
                "; ".join(reasons) or "qstat -j gives no error reason"
            )
        record = self._accounting(number, task)
        if record is not None:
            words = [f"SGE job {number} task {task} ended"]
            exit_status = record.get("exit_status", "").split()
            if exit_status and exit_status[0].lstrip("-").isdigit():
                words.append(_describe_exit(int(exit_status[0])))
            failed = record.get("failed", "")
            if failed and not failed.startswith("0"):
                words.append(f"failed {failed}")
            parts.append(words[0] + ": " + ", ".join(words[1:]) if len(words) > 1 else words[0])
        else:
            parts.append(
                f"SGE job {number} task {task} is no longer in qstat and qacct does not know it "
                "(yet): no exit status"
            )
        path = self._log_path(job_id)
        tail = file_tail(path)
        if tail:
            parts.append(f"last lines of its output ({path}):\n{tail}")
        else:
            parts.append(f"its output file {path} is missing or empty")
        return "; ".join(parts)

    # -- commands -------------------------------------------------------------------------

    def _qsub(self, specs: Sequence[JobSpec]) -> str:
        script = job_script(
            specs, "SGE_TASK_ID", first_index=1, directives=self._directives(specs[0])
        )
        argv = [self._commands["qsub"], "-terse", "-t", f"1-{len(specs)}"]
        if self.max_running is not None:
            argv += ["-tc", str(self.max_running)]
        self.qsub_calls += 1
        out = self._run(argv, stdin=script)
        number = out.strip().split(".", 1)[0]
        if not number.isdigit():
            raise BackendError(
                f"`{shlex.join(argv)}` printed {out.strip()!r} instead of a job id "
                "(expected '<job number>.1-N:1' from -terse)"
            )
        return number

    def _directives(self, spec: JobSpec) -> list[str]:
        res = spec.resources
        options: list[list[str]] = [["-N", _job_name(spec)], ["-S", "/bin/bash"], ["-j", "y"]]
        options.append(["-o", os.path.join(self.log_dir, "$JOB_ID.$TASK_ID.log")])
        options.append(["-wd", res.working_dir] if res.working_dir else ["-cwd"])
        if self.pe and res.cpus > 1:
            options.append(["-pe", self.pe, str(math.ceil(res.cpus))])
        if res.memory:
            options.append(["-l", f"h_vmem={res.memory}"])
        if res.walltime:
            options.append(["-l", f"h_rt={res.walltime}"])
        if res.gpus and self.gpu_resource:
            options.append(["-l", f"{self.gpu_resource}={res.gpus}"])
        queue = res.queue or self.queue
        if queue:
            options.append(["-q", queue])
        project = res.account or self.project
        if project:
            options.append(["-P", project])
        extra = [*self.extra_args, *res.extra_args]
        if extra:
            options.append(extra)
        lines = ["#$ " + " ".join(option) for option in options]
        # The engine's output file starts with where and when the task ran: the worker
        # keeps the calls' own output to itself (and the store), so a killed job's
        # file would otherwise be empty.
        lines.append(
            'echo "batchpool: SGE job ${JOB_ID:-?} task ${SGE_TASK_ID:-?} started on '
            "$(hostname) at $(date '+%Y-%m-%d %H:%M:%S')\""
        )
        return lines

    def _array_limit(self) -> int:
        if self.max_array_size is None:
            limit = DEFAULT_MAX_ARRAY_SIZE
            try:
                out = self._run([self._commands["qconf"], "-sconf", "global"])
            except BackendError:
                out = ""
            match = re.search(r"^max_aj_tasks\s+(\d+)", out, re.MULTILINE)
            if match and int(match.group(1)) > 0:
                limit = int(match.group(1))
            self.max_array_size = limit
        return self.max_array_size

    def _qstat(self) -> dict[str, JobState]:
        out = self._run([self._commands["qstat"], "-u", getpass.getuser(), "-xml"])
        try:
            root = ET.fromstring(out)
        except ET.ParseError as exc:
            raise BackendError(
                f"qstat -xml printed what is not XML ({exc}): {out[:500]!r}"
            ) from exc
        states: dict[str, JobState] = {}
        for entry in root.iter("job_list"):
            number = (entry.findtext("JB_job_number") or "").strip()
            state = _state((entry.findtext("state") or "").strip())
            tasks = (entry.findtext("tasks") or "").strip()
            if not number:
                continue
            for task in _task_numbers(tasks or "1"):
                states[f"{number}.{task}"] = state
        return states

    def _accounting(self, number: str, task: str) -> dict[str, str] | None:
        deadline = time.monotonic() + ACCOUNTING_WAIT
        while True:
            try:
                out = self._run(
                    [self._commands["qacct"], "-j", number],
                    ok=lambda rc, err: rc == 0 or "not found" in err,
                )
            except BackendError:
                return None
            for record in _records(out):
                if record.get("taskid", "").strip() in (task, "undefined"):
                    return record
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)

    def _log_path(self, job_id: str) -> str:
        number, task = _split_id(job_id)
        return os.path.join(self.log_dir, f"{number}.{task}.log")

    def _run(
        self,
        argv: list[str],
        stdin: str | None = None,
        ok: Callable[[int, str], bool] | None = None,
    ) -> str:
        command = shlex.join(argv)
        root = os.environ.get("SGE_ROOT", "(unset)")
        cell = os.environ.get("SGE_CELL", "(unset)")
        hint = (
            f"check that SGE's commands work in this environment: SGE_ROOT={root}, "
            f"SGE_CELL={cell}, the commands on PATH, and `qstat` answering "
            "(is sge_qmaster running?)"
        )
        try:
            proc = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except FileNotFoundError as exc:
            raise BackendError(f"`{command}` could not start: {exc}; {hint}") from exc
        except subprocess.TimeoutExpired as exc:
            raise BackendError(
                f"`{command}` did not answer in {COMMAND_TIMEOUT:g} s; {hint}", transient=True
            ) from exc
        good = proc.returncode == 0 if ok is None else ok(proc.returncode, proc.stderr)
        if not good:
            said = (proc.stderr or proc.stdout).strip()
            raise BackendError(
                f"`{command}` failed with exit status {proc.returncode}: "
                f"{said or '(no output)'}; {hint}",
                transient=any(words in said for words in UNREACHABLE),
            )
        return proc.stdout


def _ranges(numbers: Iterable[int]) -> str:
    """``1-3,7`` for [1, 2, 3, 7]: a task list ``qdel -t`` accepts."""
    ordered = sorted(set(numbers))
    parts: list[str] = []
    start = prev = ordered[0]
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(parts)


def _records(text: str) -> list[dict[str, str]]:
    """The records of ``qacct -j``'s output, one dict of fields each."""
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("====="):
            if current:
                records.append(current)
            current = {}
            continue
        key, _, value = line.partition(" ")
        if key:
            current[key] = value.strip()
    if current:
        records.append(current)
    return records
