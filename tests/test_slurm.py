"""SlurmBackend against a real single-node Slurm cluster, started by ``ci/slurm.sh``.

With ``CI`` set, a cluster that cannot start fails the tests loudly with the
script's output; elsewhere they skip with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from batchpool import BatchPoolExecutor, WorkerLostError
from batchpool.backends.base import JobSpec, JobState, Notify, backend_class
from batchpool.backends.slurm import SlurmBackend, slurm_state
from batchpool.errors import BackendError

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def slurm() -> Iterator[str]:
    """Start (idempotently) the local Slurm cluster; SLURM_CONF's path."""
    why = ""
    if sys.platform != "linux":
        why = "Slurm runs here only on Linux"
    elif os.geteuid() != 0:
        why = "ci/slurm.sh must run as root to install and start Slurm"
    output = ""
    conf = ""
    if not why:
        # Once more after a full stop if the first start failed: a daemon that came up
        # badly on a fresh machine (CI once saw it) is started again from scratch.
        for attempt in (1, 2):
            proc = subprocess.run(
                ["bash", str(REPO / "ci" / "slurm.sh")],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            output += f"-- ci/slurm.sh, attempt {attempt}:\n{proc.stdout}{proc.stderr}"
            for line in proc.stdout.splitlines():
                if line.startswith("export SLURM_CONF="):
                    conf = line.split("=", 1)[1].strip()
            if proc.returncode == 0 and conf:
                break
            subprocess.run(
                ["bash", str(REPO / "ci" / "slurm.sh"), "stop"], timeout=120, check=False
            )
        else:
            why = f"ci/slurm.sh exited with status {proc.returncode}"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm is required in CI and could not start: {why}\n{output}")
        pytest.skip(f"no Slurm cluster: {why}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


class Recording(SlurmBackend):
    """A SlurmBackend that remembers the ids it returned and how often status was asked."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.ids: list[str] = []
        self.polls = 0

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        ids = super().submit(jobs, notify)
        self.ids += ids
        return ids

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        self.polls += 1
        return super().status(job_ids)


def triple(x: int) -> int:
    time.sleep(0.01)
    return 3 * x


def test_registered_by_name() -> None:
    assert backend_class("slurm") is SlurmBackend


def test_state_words() -> None:
    assert slurm_state("PENDING") is JobState.PENDING
    assert slurm_state("COMPLETING") is JobState.RUNNING
    assert slurm_state("COMPLETED") is JobState.SUCCEEDED
    assert slurm_state("OUT_OF_ME+") is JobState.FAILED
    assert slurm_state("TIMEOUT") is JobState.FAILED
    assert slurm_state("CANCELLED by 0") is JobState.CANCELLED
    assert slurm_state("PREEMPTED") is JobState.LOST
    assert slurm_state("SOMETHING_NEW") is JobState.LOST


def test_map_is_one_sbatch_and_one_query_per_poll(slurm: str, tmp_path: Path) -> None:
    backend = Recording(log_dir=tmp_path / "slurm-logs")
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "runs")) as bpe:
        results = list(bpe.map(triple, range(200), chunksize=10, timeout=90))
    assert results == [3 * x for x in range(200)]
    assert backend.sbatch_calls == 1
    assert len(backend.ids) == 20
    assert len({i.split("_")[0] for i in backend.ids}) == 1  # one array
    # One squeue per poll, plus at most one lookup per array once jobs leave squeue;
    # never one command per job.
    assert backend.polls >= 1
    assert backend.status_calls <= 2 * backend.polls
    assert backend.status_calls < 200


def test_split_at_max_array_size(slurm: str, tmp_path: Path) -> None:
    backend = SlurmBackend(max_array_size=8, log_dir=tmp_path / "slurm-logs")
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "runs")) as bpe:
        assert list(bpe.map(triple, range(20), chunksize=1, timeout=90)) == [
            3 * x for x in range(20)
        ]
    assert backend.sbatch_calls == 3  # 8 + 8 + 4


def test_exceptions_keep_their_type(slurm: str, tmp_path: Path) -> None:
    def boom(x: int) -> int:
        raise KeyError(f"no {x}")

    backend = SlurmBackend(log_dir=tmp_path / "slurm-logs")
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "runs")) as bpe:
        future = bpe.submit(boom, 7)
        with pytest.raises(KeyError, match="no 7"):
            future.result(timeout=60)


def test_the_initializer_runs_once_per_job(slurm: str, tmp_path: Path) -> None:
    """Each Slurm job is a fresh process: the initializer runs in each, before its calls."""
    from calls import initialized, remember_init

    folder = tmp_path / "inits"
    folder.mkdir()
    backend = SlurmBackend(log_dir=tmp_path / "slurm-logs")
    with BatchPoolExecutor(
        backend=backend,
        storage=str(tmp_path / "runs"),
        initializer=remember_init,
        initargs=(str(folder),),
    ) as bpe:
        seen = list(bpe.map(initialized, range(6), chunksize=2, timeout=120))
    assert [given for _, given in seen] == [[str(folder)]] * 6
    assert len(list(folder.iterdir())) == 3  # one per job of two calls


def test_killed_job_is_retried_then_fails_with_slurms_words(slurm: str, tmp_path: Path) -> None:
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    backend = Recording(log_dir=tmp_path / "slurm-logs")
    with BatchPoolExecutor(
        backend=backend,
        storage=str(tmp_path / "runs"),
        max_attempts=2,
        job_options={"setup": ("echo 'batchpool test job starting' >&2",)},
    ) as bpe:
        future = bpe.submit(die)
        with pytest.raises(WorkerLostError) as info:
            future.result(timeout=90)
    message = str(info.value)
    assert backend.sbatch_calls == 2  # the first attempt and its retry
    assert "2 attempts" in message
    assert "JobState=FAILED" in message
    assert "ExitCode=0:9" in message  # killed by signal 9
    assert "batchpool test job starting" in message  # the tail of the job's output file


def test_cancel_pending_array_and_queued_calls(slurm: str, tmp_path: Path) -> None:
    # --hold keeps the array pending, as on a busy cluster.
    backend = Recording(log_dir=tmp_path / "slurm-logs", extra_args=["--hold"], max_running=2)
    bpe = BatchPoolExecutor(backend=backend, storage=str(tmp_path / "runs"), max_workers=1)
    try:
        handed = bpe.submit(triple, 1)
        deadline = time.monotonic() + 30
        while not backend.ids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.ids, "the first call was never handed to Slurm"
        queued = bpe.submit(triple, 2)  # waits: max_workers=1 and one job is in flight
        job_id = backend.ids[0]
        assert backend.status([job_id]) == {job_id: JobState.PENDING}
        shown = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True
        ).stdout
        assert "ArrayTaskThrottle=2" in shown
        bpe.shutdown(wait=True, cancel_futures=True)
        assert queued.cancelled()  # never handed to Slurm
        assert handed.cancelled()  # handed over, but still queued: Slurm dropped it
        assert backend.status([job_id]) == {job_id: JobState.CANCELLED}
        assert backend.sbatch_calls == 1
    finally:
        bpe.shutdown(wait=True, cancel_futures=True)


def test_logs_reach_the_run_and_the_job_output(slurm: str, tmp_path: Path) -> None:
    def chatty(x: int) -> int:
        print(f"hello from slurm {x}", flush=True)
        return x

    logs = tmp_path / "slurm-logs"
    backend = Recording(log_dir=logs)
    with BatchPoolExecutor(
        backend=backend, storage=str(tmp_path / "runs"), cleanup_bucket=False
    ) as bpe:
        assert bpe.submit(chatty, 5).result(timeout=60) == 5
    run_logs = list((tmp_path / "runs").glob("*/logs/*.log"))
    assert len(run_logs) == 1
    assert "hello from slurm 5" in run_logs[0].read_text()
    array_id, index = backend.ids[0].split("_")
    engine_log = logs / f"slurm-{array_id}_{index}.out"
    assert "hello from slurm 5" in engine_log.read_text()


def test_command_failures_name_the_command_and_what_to_check(slurm: str, tmp_path: Path) -> None:
    broken = tmp_path / "squeue"  # answers as squeue does when slurmctld is down
    broken.write_text(
        "#!/bin/bash\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\n"
        "exit 1\n"
    )
    broken.chmod(0o755)
    backend = SlurmBackend(log_dir=tmp_path, squeue=str(broken))
    with pytest.raises(BackendError) as info:
        backend.status(["1_0"])
    message = str(info.value)
    assert "squeue" in message and "exited with status 1" in message
    assert "Unable to contact slurm controller" in message
    assert f"SLURM_CONF={slurm}" in message
    missing = SlurmBackend(log_dir=tmp_path, sbatch=str(tmp_path / "no-sbatch"), max_array_size=10)
    spec = JobSpec(name="x-1-1", args=("--chunk", "c", "--attempt", "1"))
    with pytest.raises(BackendError, match="no-sbatch"):
        missing.submit([spec])


def test_future_cancel_drops_a_queued_job(slurm: str, tmp_path: Path) -> None:
    import concurrent.futures as cf

    backend = Recording(log_dir=tmp_path / "slurm-logs", extra_args=["--hold"])
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "runs")) as bpe:
        future = bpe.submit(triple, 1)
        deadline = time.monotonic() + 30
        while not backend.ids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert future.running()  # handed to Slurm, held in its queue
        assert future.cancel() and future.cancelled()
        done, _ = cf.wait([future], timeout=60)  # at once: the timeout is a hang guard
        assert done == {future}
        with pytest.raises(cf.CancelledError):
            future.result()
        deadline = time.monotonic() + 30  # status answers from its last squeue for a second
        while backend.status(backend.ids)[backend.ids[0]] is not JobState.CANCELLED:
            assert time.monotonic() < deadline, "Slurm never reported the job CANCELLED"
            time.sleep(0.2)


@pytest.mark.timeout(300)
def test_walltime_kill_fails_with_timeout_and_the_log_tail(slurm: str, tmp_path: Path) -> None:
    # Slurm's shortest --time is one minute; slurmctld notices the overrun on its
    # next timer pass (up to 30 s later), then KillWait=5 (ci/slurm.sh) to SIGKILL.
    def overrun() -> None:
        print("working past the walltime", flush=True)
        time.sleep(600)

    backend = Recording(log_dir=tmp_path / "slurm-logs")
    with BatchPoolExecutor(
        backend=backend,
        storage=str(tmp_path / "runs"),
        max_attempts=1,
        job_options={"setup": ("echo 'walltime job starting' >&2",)},
    ) as bpe:
        future = bpe.options(walltime="1").submit(overrun)
        with pytest.raises(WorkerLostError) as info:
            future.result(timeout=240)
    message = str(info.value)
    assert "JobState=TIMEOUT" in message, message
    assert "walltime job starting" in message  # the tail of the job's output file
    assert backend.sbatch_calls == 1


@pytest.mark.timeout(240)
def test_requeue_reruns_the_attempt_in_place(slurm: str, tmp_path: Path) -> None:
    """With requeue=True, Slurm itself runs a requeued job again: same job id, same
    attempt; the worker notes the restart, and the call's result comes back once."""
    marks = tmp_path / "marks"
    marks.mkdir()

    def slow(x: int) -> int:
        first = not any(marks.iterdir())
        (marks / f"{os.getpid()}-{time.time()}").touch()
        if first:  # still in the call when the requeue kills it, however late that is
            time.sleep(600)
        return x + 1

    backend = Recording(log_dir=tmp_path / "slurm-logs", requeue=True)
    with BatchPoolExecutor(
        backend=backend, storage=str(tmp_path / "runs"), cleanup_bucket=False
    ) as bpe:
        future = bpe.submit(slow, 41)
        deadline = time.monotonic() + 60
        while not any(marks.iterdir()):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        job_id = backend.ids[0]
        # What preemption does to a --requeue job: back to the queue, run again.
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)
        # Slurm holds a requeued job back (its BeginTime moves ~2 minutes on): let it go
        # a few seconds after it is pending again (sooner, slurmd may still hold the
        # revoked credential of the killed run and refuse to launch it).
        deadline = time.monotonic() + 30
        while (
            "PENDING"
            not in subprocess.run(
                ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
            ).stdout
        ):
            assert time.monotonic() < deadline, "the requeued job never became pending"
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], check=True)
        assert future.result(timeout=200) == 42
        run_url = bpe.run_url
    assert backend.sbatch_calls == 1  # Slurm, not batchpool, ran it again
    assert len(list(marks.iterdir())) == 2  # killed once mid-call, then run to the end
    start = json.loads(next(Path(run_url, "events").glob("*.1.start")).read_text())
    assert start["restarts"] >= 1 and start["engine_job"] == job_id


@pytest.mark.parametrize("accounting", [True, False], ids=["sacct", "scontrol"])
def test_ended_jobs_are_read_from_sacct_or_else_scontrol(
    slurm: str, tmp_path: Path, accounting: bool
) -> None:
    """squeue forgets ended jobs (after MinJobAge): their states then come from sacct
    where accounting runs (ci/slurm.sh starts slurmdbd), else from scontrol."""
    options = {} if accounting else {"sacct": str(tmp_path / "no-sacct")}
    backend = Recording(log_dir=tmp_path / "slurm-logs", **options)
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "runs"), max_attempts=1) as bpe:
        assert list(bpe.map(triple, range(4), chunksize=1)) == [0, 3, 6, 9]
        with pytest.raises(WorkerLostError):
            bpe.submit(os._exit, 3).result(timeout=90)
    *done, failed = backend.ids
    deadline = time.monotonic() + 30  # slurmctld reports to slurmdbd a moment later
    while len(words := backend._finished_states([*done, failed])) < 5:
        assert time.monotonic() < deadline, f"sacct never listed every job: {words}"
        time.sleep(0.5)
    assert backend._accounting is accounting
    assert [slurm_state(words[job]) for job in done] == [JobState.SUCCEEDED] * 4
    assert slurm_state(words[failed]) is JobState.FAILED
