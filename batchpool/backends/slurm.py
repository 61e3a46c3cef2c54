"""Slurm: jobs become tasks of array jobs submitted with ``sbatch``.

One dispatch batch becomes one ``sbatch --array`` per group of jobs that share
their resources and environment (split at the cluster's ``MaxArraySize``); a
job's id is ``<array job id>_<task index>``. One ``squeue`` tells the state of
every job the executor waits for; jobs that left ``squeue`` are looked up with
``sacct`` when accounting works, else with ``scontrol show job`` once per array.

Every command runs with this process's environment, so ``SLURM_CONF`` (or the
cluster's DNS SRV record) must be set as for any Slurm command.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchpool.backends.base import Backend, JobSpec, JobState, Notify, Resources, output_words
from batchpool.backends.script import alike_groups, batch_name, job_script
from batchpool.errors import BackendError

#: Seconds any Slurm command may take before it counts as failed.
COMMAND_TIMEOUT = 120.0

#: What Slurm's commands print when slurmctld (or slurmdbd, for sacct) cannot be
#: reached: a restart, a fail-over, an overload. Such a failure is transient: the
#: executor asks again, and keeps the jobs, within its engine_outage_grace.
UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out on send/recv operation",
    "Zero Bytes were transmitted or received",
    "Communication connection failure",
    "Connection refused",
    "Connection timed out",
    "Connection reset by peer",
    "Transport endpoint is not connected",
    "backup controller in standby mode",
    "temporarily unable to accept job",
    "Problem talking to the database",
    "slurmdbd: Connection refused",
)

_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "COMPLETED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "PREEMPTED": JobState.LOST,
}

_TASK_ID = re.compile(r"([0-9]{1,20})_([0-9]{1,10})")


def slurm_state(word: str) -> JobState:
    """The JobState of a Slurm state word (``CANCELLED by 0`` and ``OUT_OF_ME+`` too)."""
    word = word.strip().split()[0] if word.strip() else ""
    word = word.rstrip("+")
    if word in _STATES:
        return _STATES[word]
    for name, state in _STATES.items():  # sacct truncates long names: OUT_OF_ME+
        if word and name.startswith(word):
            return state
    return JobState.LOST


def _split_id(job_id: str) -> tuple[str, int]:
    match = _TASK_ID.fullmatch(job_id) if isinstance(job_id, str) else None
    if not match:
        raise ValueError(f"{job_id!r} is not a Slurm array task id of this backend (<job>_<task>)")
    return match.group(1), int(match.group(2))


def _expand(job_field: str) -> list[str]:
    """Task ids in a squeue/sacct id field: ``12_3``, ``12_[4-6,9%2]``, or a plain ``12``."""
    match = re.match(r"^(\d+)_\[([^\]]*)\]$", job_field)
    if not match:
        return [job_field]
    base, ranges = match.groups()
    ids: list[str] = []
    for part in ranges.split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            ids += [f"{base}_{i}" for i in range(int(lo), int(hi) + 1)]
        elif part:
            ids.append(f"{base}_{part}")
    return ids


def _parse_scontrol_records(text: str) -> list[dict[str, str]]:
    """``scontrol show job`` output: one dict of ``Key=Value`` per record."""
    records: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        record: dict[str, str] = {}
        for line in block.splitlines():
            line = line.strip()
            # Values may hold spaces only in a few fields (Command, WorkDir...); keep it simple:
            # split on the spaces that start a new Key=.
            for item in re.split(r" (?=[A-Za-z:/_]+=)", line):
                key, sep, value = item.partition("=")
                if sep:
                    record.setdefault(key, value)
        if record:
            records.append(record)
    return records


class SlurmBackend(Backend):
    """Run jobs as Slurm array tasks.

    - ``partition``, ``account``: defaults for jobs whose resources name none
      (``queue``/``account`` of ``job_options`` or ``options()`` win).
    - ``max_array_size``: the most tasks per ``sbatch`` (default: the cluster's
      ``MaxArraySize`` from ``scontrol show config``).
    - ``max_running``: at most this many tasks of one array run at once (``%N``).
    - ``extra_args``: more ``sbatch`` arguments for every job, as they are.
    - ``log_dir``: where the jobs' own output files go; it must be reachable from
      the compute nodes (default: ``~/.cache/batchpool/slurm``). The calls' output
      also ends up in the run's ``logs/`` in storage.
    - ``requeue``: let Slurm requeue a preempted or failed-node job itself
      (``--requeue``); by default (``--no-requeue``) such a job ends as
      PREEMPTED/NODE_FAIL and the executor retries it with a new attempt.
    - ``min_status_interval``: seconds between two ``squeue`` queries at least
      (schedulers rate-limit); a poll sooner than that is answered from the last one.
    - ``max_jobs``: how many jobs run at once, for sizing ``map``'s chunks when the
      executor gets no ``max_workers``; default: the partition's CPUs (``sinfo``),
      or 64 when Slurm does not say.
    - ``sbatch``, ``squeue``, ``sacct``, ``scontrol``, ``scancel``: the commands
      (a name on ``PATH`` or a path).
    """

    name = "slurm"
    notifies = False
    bounded = False
    shares_client_code = False

    def __init__(
        self,
        partition: str | None = None,
        account: str | None = None,
        max_array_size: int | None = None,
        max_running: int | None = None,
        extra_args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        *,
        requeue: bool = False,
        max_jobs: int | None = None,
        min_status_interval: float = 1.0,
        sbatch: str = "sbatch",
        squeue: str = "squeue",
        sacct: str = "sacct",
        scontrol: str = "scontrol",
        scancel: str = "scancel",
    ) -> None:
        for label, value in (("max_array_size", max_array_size), ("max_running", max_running)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0
            ):
                raise ValueError(f"{label}={value!r} must be a positive int or None")
        if isinstance(extra_args, str):
            extra_args = shlex.split(extra_args)
        self.partition = partition
        self.account = account
        self.max_running = max_running
        self.extra_args = tuple(extra_args)
        self.requeue = requeue
        self._max_jobs = max_jobs
        self._max_array_size = max_array_size
        if log_dir is None:
            log_dir = Path.home() / ".cache" / "batchpool" / "slurm"
        self.log_dir = str(Path(log_dir).expanduser().absolute())
        self._commands = {
            "sbatch": sbatch,
            "squeue": squeue,
            "sacct": sacct,
            "scontrol": scontrol,
            "scancel": scancel,
        }
        self._lock = threading.Lock()
        self._accounting: bool | None = None  # learned at the first sacct
        self._final: dict[str, JobState] = {}
        self.min_status_interval = min_status_interval
        self._last_query = -math.inf
        self._last_states: dict[str, JobState] = {}
        #: How many ``sbatch`` commands this backend ran.
        self.sbatch_calls = 0
        #: How many commands ``status`` ran (squeue, sacct, scontrol).
        self.status_calls = 0

    job_ids_outlive_client = True

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": {"log_dir": self.log_dir, "partition": self.partition},
        }

    @classmethod
    def check_job_id(cls, job_id: str) -> None:
        _split_id(job_id)

    def __repr__(self) -> str:
        where = f"partition={self.partition!r}" if self.partition else "default partition"
        return f"SlurmBackend({where})"

    def max_parallel(self) -> int:
        if self._max_jobs is None:
            self._max_jobs = self._partition_cpus() or 64
        return self._max_jobs

    def _partition_cpus(self) -> int:
        """The CPUs of the partition (all partitions when none is named), 0 if unknown."""
        argv = ["sinfo", "--noheader", "--format=%C"]
        if self.partition:
            argv.append(f"--partition={self.partition}")
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            return sum(int(line.split("/")[3]) for line in out.split() if line.count("/") == 3)
        except (OSError, ValueError, subprocess.SubprocessError):
            return 0

    # -- running commands -----------------------------------------------------------------

    def _run(
        self, argv: Sequence[str], *, input: str | None = None, ok_errors: Sequence[str] = ()
    ) -> str:
        """Run a Slurm command; its stdout, or BackendError saying what failed and what to check."""
        command = " ".join(shlex.quote(a) for a in argv)
        try:
            proc = subprocess.run(
                list(argv),
                input=input,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except FileNotFoundError as exc:
            raise BackendError(
                f"`{argv[0]}` was not found: the Slurm client commands must be on PATH "
                f"(or pass their paths to SlurmBackend); {exc}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise BackendError(
                f"`{command}` did not answer within {COMMAND_TIMEOUT:.0f} s: is slurmctld "
                f"running and reachable? ({_hint()})",
                transient=True,
            ) from exc
        if proc.returncode != 0 and not any(e in proc.stderr for e in ok_errors):
            stderr = proc.stderr.strip() or "(nothing on stderr)"
            raise BackendError(
                f"`{command}` exited with status {proc.returncode}: {stderr}\n"
                f"Check that this machine can talk to the Slurm controller: {_hint()}",
                transient=any(words in proc.stderr for words in UNREACHABLE),
            )
        return proc.stdout

    def max_array_size(self) -> int:
        """The most tasks one ``sbatch --array`` may hold (indices 0 to this minus one)."""
        if self._max_array_size is None:
            out = self._run([self._commands["scontrol"], "show", "config"])
            match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
            self._max_array_size = int(match.group(1)) if match else 1001
        return self._max_array_size

    # -- the contract ---------------------------------------------------------------------

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        if not jobs:
            return []
        os.makedirs(self.log_dir, exist_ok=True)
        ids: list[str | None] = [None] * len(jobs)
        size = self.max_array_size()
        for positions in alike_groups(jobs):
            for start in range(0, len(positions), size):
                part = positions[start : start + size]
                array_id = self._submit_array([jobs[p] for p in part])
                for index, position in enumerate(part):
                    ids[position] = f"{array_id}_{index}"
        return [i for i in ids if i is not None]

    def _submit_array(self, specs: Sequence[JobSpec]) -> str:
        resources = specs[0].resources
        name = batch_name(specs)
        directives = [f"#SBATCH {d}" for d in self._directives(resources, name)]
        script = job_script(specs, "SLURM_ARRAY_TASK_ID", directives=directives)
        array = f"0-{len(specs) - 1}"
        if self.max_running is not None:
            array += f"%{self.max_running}"
        argv = [
            self._commands["sbatch"],
            "--parsable",
            f"--array={array}",
            *self.extra_args,
            *resources.extra_args,
        ]
        with self._lock:
            self.sbatch_calls += 1
        out = self._run(argv, input=script)  # the script travels on stdin: no file to clean up
        array_id = out.strip().splitlines()[-1].split(";")[0] if out.strip() else ""
        if not array_id.isdigit():
            raise BackendError(
                f"`sbatch --parsable` printed {out.strip()!r}, not a job id; check the "
                f"cluster's sbatch wrapper or job_submit plugin ({_hint()})"
            )
        return array_id

    def _directives(self, resources: Resources, name: str) -> list[str]:
        lines = [
            f"--job-name={name}",
            f"--output={self.log_dir}/slurm-%A_%a.out",
            f"--cpus-per-task={max(1, math.ceil(resources.cpus))}",
            "--requeue" if self.requeue else "--no-requeue",
        ]
        if resources.memory:
            lines.append(f"--mem={resources.memory}")
        if resources.gpus:
            lines.append(f"--gres=gpu:{resources.gpus}")
        if resources.walltime:
            lines.append(f"--time={resources.walltime}")
        partition = resources.queue or self.partition
        if partition:
            lines.append(f"--partition={partition}")
        account = resources.account or self.account
        if account:
            lines.append(f"--account={account}")
        return lines

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        wanted: dict[str, str] = {}  # task id -> array id, of jobs not known to be over
        for job_id in job_ids:
            if job_id in self._final:
                states[job_id] = self._final[job_id]
            else:
                wanted[job_id] = _split_id(job_id)[0]
        if not wanted:
            return states
        if time.monotonic() - self._last_query < self.min_status_interval:
            # Schedulers rate-limit: answer from the last query (a job submitted since
            # is pending as far as anyone can tell) rather than run squeue again.
            for job_id in wanted:
                states[job_id] = self._last_states.get(job_id, JobState.PENDING)
            return states
        self._last_query = time.monotonic()
        arrays = sorted(set(wanted.values()), key=int)
        found = self._squeue(arrays)
        missing = [j for j, a in wanted.items() if j not in found and a not in found]
        if missing:
            found.update(self._finished_states(missing))
        for job_id, array_id in wanted.items():
            # A bare array id stands for its tasks not listed apart (a pending or
            # cancelled-while-pending array is one record until its tasks start).
            word = found.get(job_id) or found.get(array_id)
            state = slurm_state(word) if word else JobState.LOST
            states[job_id] = state
            if state.is_final:
                self._final[job_id] = state
        self._last_states = {j: states[j] for j in wanted}
        return states

    def _squeue(self, arrays: Sequence[str]) -> dict[str, str]:
        """Slurm's state word of every task of ``arrays`` that ``squeue`` still lists."""
        with self._lock:
            self.status_calls += 1
        out = self._run(
            [
                self._commands["squeue"],
                "--noheader",
                "--array",
                "--states=all",
                f"--jobs={','.join(arrays)}",
                "--format=%i|%T",
            ],
            ok_errors=("Invalid job id",),  # every one of them has left the controller
        )
        found: dict[str, str] = {}
        for line in out.splitlines():
            field, _, word = line.strip().partition("|")
            for task in _expand(field.strip()):
                found[task] = word.strip()
        return found

    def _finished_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """State words of jobs ``squeue`` no longer lists: from sacct, else scontrol."""
        if self._accounting is not False:
            with self._lock:
                self.status_calls += 1
            try:
                rows = self._sacct("JobID,State", job_ids)
                self._accounting = True
                found: dict[str, str] = {}
                for field, *rest in rows:
                    for task in _expand(field):
                        found[task] = "|".join(rest)
                return found
            except BackendError:
                if self._accounting:  # it worked before: a real failure
                    raise
                self._accounting = False  # "accounting storage is disabled": scontrol then
        found = {}
        for array_id in sorted({_split_id(j)[0] for j in job_ids}, key=int):
            for record in self._scontrol_job(array_id):
                found.update(_record_states(record))
        return found

    def _sacct(self, fields: str, job_ids: Sequence[str]) -> list[list[str]]:
        """``sacct``'s rows (allocations only) for these jobs, split into ``fields``."""
        out = self._run(
            [
                self._commands["sacct"],
                "--noheader",
                "--parsable2",
                "--allocations",
                f"--format={fields}",
                f"--jobs={','.join(job_ids)}",
            ]
        )
        return [line.strip().split("|") for line in out.splitlines() if line.strip()]

    def _scontrol_job(self, job_id: str) -> list[dict[str, str]]:
        with self._lock:
            self.status_calls += 1
        out = self._run(
            [self._commands["scontrol"], "show", "job", job_id],
            ok_errors=("Invalid job id",),
        )
        return _parse_scontrol_records(out)

    def explain(self, job_id: str) -> str:
        parts: list[str] = []
        log_path = ""
        array_id, index = _split_id(job_id)
        try:  # the whole array: a task not started yet is part of the array's own record
            records = self._scontrol_job(array_id)
        except BackendError as exc:
            records = []
            parts.append(f"(scontrol could not tell: {exc})")
        record = next((r for r in records if job_id in _record_states(r)), None)
        if record is None:
            record = next((r for r in records if array_id in _record_states(r)), None)
        if record is not None:
            words = [
                f"{key}={record[key]}"
                for key in ("JobState", "Reason", "ExitCode", "DerivedExitCode", "RunTime")
                if key in record
            ]
            parts.append("Slurm says " + " ".join(words))
            log_path = record.get("StdOut", "")
        elif self._accounting:
            try:
                rows = self._sacct("State,ExitCode,Reason,Elapsed", [job_id])
                if rows:
                    state, exit_code, reason, elapsed = (rows[0] + [""] * 4)[:4]
                    parts.append(
                        f"Slurm says JobState={state} Reason={reason} ExitCode={exit_code} "
                        f"Elapsed={elapsed}"
                    )
            except BackendError as exc:
                parts.append(f"(sacct could not tell: {exc})")
        if not log_path or "%" in log_path:
            log_path = os.path.join(self.log_dir, f"slurm-{array_id}_{index}.out")
        parts.append(output_words(log_path))
        return "; ".join(parts)

    def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        for job_id in job_ids:
            _split_id(job_id)  # only ids of this backend's form reach scancel
        self._run(
            [self._commands["scancel"], *job_ids],
            ok_errors=("already completing or completed", "Invalid job id"),
        )

    def close(self) -> None:
        """Nothing to release: scripts travel on stdin, and jobs are cancelled only by cancel()."""


def _record_states(record: dict[str, str]) -> dict[str, str]:
    """Task id -> state word of one ``scontrol show job`` record (a task or a task range)."""
    state = record.get("JobState", "")
    array_id = record.get("ArrayJobId")
    task = record.get("ArrayTaskId")
    if array_id and task:
        if not re.fullmatch(r"[\d,%-]+", task) or task == "4294967294":  # NO_VAL: all tasks
            return {array_id: state}
        return dict.fromkeys(_expand(f"{array_id}_[{task}]"), state)
    job_id = record.get("JobId", "")
    return {job_id: state} if job_id else {}


def _hint() -> str:
    conf = os.environ.get("SLURM_CONF")
    where = f"SLURM_CONF={conf}" if conf else "SLURM_CONF is not set (nor found by DNS SRV?)"
    return f"{where}; does `sinfo` list nodes and `scontrol ping` find slurmctld?"
