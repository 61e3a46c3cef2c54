"""The ``batchpool`` command, run as a subprocess on real runs made by local executors."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_slurm import slurm  # noqa: F401  (the fixture that starts the local Slurm cluster)

from batchpool import BatchPoolExecutor, WorkerLostError
from batchpool.backends.slurm import SlurmBackend
from batchpool.processes import process_started
from batchpool.runs import JobView, open_run, read_run

REPO = Path(__file__).resolve().parent.parent


# -- calls the runs make (imported by reference in the local workers) -------------------------


def shout(x: int) -> int:
    print(f"hello from call {x}")
    print(f"call {x} on stderr", file=sys.stderr)
    return x


def explode(x: int) -> int:
    print("about to fail")
    raise ValueError(f"boom {x}")


def snooze(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def square(x: int) -> int:
    return x * x


# -- helpers ----------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m batchpool ARGS``: its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "batchpool", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def cli_json(*args: str, env: dict[str, str] | None = None) -> tuple[int, Any]:
    result = cli(*args, "--json", env=env)
    assert not result.stderr or result.returncode != 0, result.stderr
    return result.returncode, json.loads(result.stdout)


def wait_until_running(run_url: str, deadline: float = 60.0) -> JobView:
    """The first job of the run that the store shows Running (its worker started); the
    deadline only guards against a hang (a loaded machine starts workers slowly)."""
    store = open_run(run_url)
    stop = time.monotonic() + deadline
    while time.monotonic() < stop:
        running = [job for job in read_run(store).jobs if job.state == "Running"]
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError(f"no job of {run_url} started within {deadline} s")


def wait_until_ended(run_url: str, deadline: float = 60.0) -> None:
    """Wait until the store shows every job of the run ended (the deadline: a hang guard)."""
    store = open_run(run_url)
    stop = time.monotonic() + deadline
    while not read_run(store).finished:
        assert time.monotonic() < stop, f"jobs of {run_url} still run after {deadline} s"
        time.sleep(0.05)


def status_fields(stdout: str) -> dict[str, str]:
    """The ``label: value`` lines above the job table of ``batchpool status``."""
    header = stdout.partition("\n\n")[0]
    return {k: v.strip() for k, _, v in (line.partition(":") for line in header.splitlines())}


def make_old(run_url: str) -> None:
    """Rewrite a run's manifest as if the run were created in 2020."""
    path = Path(run_url) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["created"] = "2020-01-02T03:04:05+00:00"
    path.write_text(json.dumps(manifest))


class Runs:
    """Two finished runs in one storage folder."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        with BatchPoolExecutor(
            storage=str(storage), cleanup_bucket=False, max_workers=2, name="alpha"
        ) as bpe:
            futures = [
                bpe.submit(shout, 1),
                bpe.submit(shout, 2),
                bpe.submit(explode, 3),
                bpe.submit(snooze, 0.3),
            ]
            cf.wait(futures, timeout=30)
            self.alpha = bpe.run_url
        assert [f.exception() is None for f in futures] == [True, True, False, True]
        with BatchPoolExecutor(
            storage=str(storage), cleanup_bucket=False, max_workers=2, name="beta"
        ) as bpe:
            assert list(bpe.map(square, range(3), chunksize=1)) == [0, 1, 4]
            self.beta = bpe.run_url

    def chunk_of(self, text: str) -> str:
        """The chunk id of the job of run alpha whose output holds ``text``."""
        store = open_run(self.alpha)
        run = read_run(store)
        for job in run.jobs:
            if job.logs and text in run.log(job):
                return job.chunk
        raise AssertionError(f"no job of {self.alpha} printed {text!r}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("cli") / "store")


# -- runs -------------------------------------------------------------------------------------


def test_help_documents_the_exit_codes() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "exit codes:" in result.stdout
    for code in "0123":
        assert f"\n  {code}  " in result.stdout


def test_runs_lists_each_run_as_a_table(runs: Runs) -> None:
    result = cli("runs", str(runs.storage), "--storage-option", "auto_mkdir=true")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["RUN", "NAME", "CREATED", "AGE", "STATE", "JOBS", "SIZE"]
    assert len(lines) == 2
    alpha, beta = lines
    assert alpha.startswith(Path(runs.alpha).name) and beta.startswith(Path(runs.beta).name)
    assert "3 Success, 1 Failed" in alpha
    assert "3 Success" in beta
    # aligned columns: the NAME of each run starts under the header's
    assert alpha.index(" alpha ") + 1 == beta.index(" beta ") + 1 == header.index("NAME")


def test_runs_json(runs: Runs) -> None:
    code, document = cli_json("runs", str(runs.storage))
    assert code == 0
    by_name = {run["name"]: run for run in document["runs"]}
    assert set(by_name) == {"alpha", "beta"}
    alpha = by_name["alpha"]
    assert alpha["url"] == runs.alpha
    assert alpha["job_counts"] == {"Success": 3, "Failed": 1}
    assert alpha["call_counts"] == {"Success": 3, "Failed": 1}
    assert alpha["state"] in ("closed", "finished")
    assert alpha["size_bytes"] > 0
    assert 0 <= alpha["age_seconds"] < 600
    assert by_name["beta"]["job_counts"] == {"Success": 3}


def test_runs_of_an_empty_or_missing_folder(tmp_path: Path) -> None:
    result = cli("runs", str(tmp_path))
    assert (result.returncode, result.stdout.strip()) == (0, f"no runs in {tmp_path}")
    result = cli("runs", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = cli("runs", str(tmp_path), "--storage-option", "no-equals-sign")
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr


# -- status -----------------------------------------------------------------------------------


def test_status_of_a_run_where_a_call_raised(runs: Runs) -> None:
    result = cli("status", runs.alpha)
    assert result.returncode == 1, result.stderr  # a job Failed
    fields = status_fields(result.stdout)
    table = result.stdout.partition("\n\n")[2]
    assert fields["run"] == runs.alpha
    assert fields["name"] == "alpha"
    assert fields["jobs"] == "3 Success, 1 Failed"
    assert fields["calls"] == "3 Success, 1 Failed"
    assert fields["usage"].startswith("4 jobs, ") and "core-hours billed" in fields["usage"]
    columns, *rows = table.splitlines()
    assert columns.split() == [
        "CHUNK", "STATE", "ATTEMPT", "CALLS", "JOB", "ID", "HOST", "DURATION", "EXIT", "CPU",
        "PEAK", "MEM",
    ]  # fmt: skip
    assert len(rows) == 4
    failed = [row for row in rows if " Failed " in row]
    assert len(failed) == 1 and "1/1 raised: " in failed[0]
    assert all(len(row.split()[0]) == 14 for row in rows)


def test_status_json(runs: Runs) -> None:
    code, document = cli_json("status", runs.alpha)
    assert code == 1
    assert document["job_counts"] == {"Success": 3, "Failed": 1}
    assert document["usage"]["jobs"] == 4
    assert document["usage"]["peak_memory_bytes"] > 0
    states = sorted(job["state"] for job in document["jobs"])
    assert states == ["Failed", "Success", "Success", "Success"]
    assert all(job["calls"] == 1 and job["attempt"] == 1 for job in document["jobs"])
    code, document = cli_json("status", runs.beta)
    assert code == 0


def test_status_finds_a_run_by_its_name(runs: Runs) -> None:
    result = cli("status", str(runs.storage / "beta"))
    assert result.returncode == 0, result.stderr
    assert status_fields(result.stdout)["run"] == runs.beta
    assert "3 Success" in result.stdout


def test_status_of_something_that_is_not_a_run(runs: Runs) -> None:
    result = cli("status", str(runs.storage / "gamma"))
    assert result.returncode == 2
    assert "no manifest.json" in result.stderr
    assert Path(runs.alpha).name in result.stderr and Path(runs.beta).name in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("status", str(runs.storage))
    assert result.returncode == 2
    assert "not a run but a storage folder holding 2 runs" in result.stderr


# -- logs -------------------------------------------------------------------------------------


def test_logs_of_one_job_by_a_prefix_of_its_chunk(runs: Runs) -> None:
    chunk = runs.chunk_of("hello from call 2")
    result = cli("logs", runs.alpha, chunk[:14])
    assert result.returncode == 0, result.stderr
    assert "hello from call 2\n" in result.stdout
    assert "call 2 on stderr\n" in result.stdout
    assert "hello from call 1" not in result.stdout
    code, document = cli_json("logs", runs.alpha, chunk[:14], "--attempt", "1")
    assert code == 0
    [log] = document["logs"]
    assert (log["chunk"], log["attempt"], log["state"]) == (chunk, 1, "Success")
    assert "hello from call 2" in log["text"]


def test_logs_of_every_job(runs: Runs) -> None:
    result = cli("logs", runs.alpha)
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("==> chunk ")]
    assert len(headers) == 3  # the job that slept printed nothing
    assert f"==> chunk {runs.chunk_of('about to fail')} (Failed, attempt 1) <==" in headers
    for text in ("hello from call 1", "hello from call 2", "about to fail"):
        assert text in result.stdout


def test_logs_of_a_job_that_printed_nothing(runs: Runs) -> None:
    run = read_run(open_run(runs.alpha))
    [silent] = [job for job in run.jobs if not job.logs]
    result = cli("logs", runs.alpha, silent.chunk)
    assert (result.returncode, result.stdout) == (0, "")
    assert f"job {silent.chunk} printed nothing" in result.stderr


def test_logs_of_an_unknown_chunk(runs: Runs) -> None:
    result = cli("logs", runs.alpha, "zzzz")
    assert result.returncode == 2
    assert "no job of run" in result.stderr and "'zzzz'" in result.stderr
    assert "Traceback" not in result.stderr


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_stops_a_running_job(tmp_path: Path) -> None:
    bpe = BatchPoolExecutor(storage=str(tmp_path), cleanup_bucket=False, max_workers=1)
    try:
        futures = [bpe.submit(time.sleep, 60), bpe.submit(time.sleep, 60)]
        job = wait_until_running(bpe.run_url)
        assert process_started(job.pid or 0) == job.pid_started
        result = cli("clean", bpe.run_url)
        assert result.returncode == 1, result.stderr
        assert f"skipped {bpe.run_url}: it is running (" in result.stdout
        assert Path(bpe.run_url, "manifest.json").exists()
        result = cli("cancel", bpe.run_url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"sent SIGTERM to 1 worker: {job.pid} (chunk {job.chunk})" in result.stdout
        assert (Path(bpe.run_url) / "cancel.json").exists()
        done, _ = cf.wait(futures, timeout=60)  # a hang guard: cancel ends them at once
        assert len(done) == 2, "cancel did not end the run's calls"
        for future in futures:
            assert_cancelled(future)
        assert process_started(job.pid or 0) != job.pid_started  # the worker is gone
    finally:
        bpe.shutdown(wait=False, cancel_futures=True)
    wait_until_ended(bpe.run_url)
    request = json.loads((Path(bpe.run_url) / "cancel.json").read_text())
    assert request["by"].endswith(f"@{os.uname()[1]}") and request["requested"] > 0
    result = cli("cancel", bpe.run_url)
    assert (result.returncode, result.stdout.strip()) == (
        1,
        "nothing to cancel: every job has ended",
    )


def assert_cancelled(future: cf.Future[Any]) -> None:
    """The future of a call whose job ``batchpool cancel`` stopped failed as cancelled."""
    if future.cancelled():
        return
    error = future.exception()
    assert isinstance(error, (cf.CancelledError, WorkerLostError)), repr(error)
    if isinstance(error, WorkerLostError):
        assert "cancel" in str(error).lower()


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_status_and_cancel_ask_slurm(tmp_path: Path) -> None:
    bpe = BatchPoolExecutor(
        backend=SlurmBackend(log_dir=tmp_path / "slurm-logs"),
        storage=str(tmp_path / "runs"),
        cleanup_bucket=False,
        max_workers=1,
    )
    try:
        future = bpe.submit(time.sleep, 60)
        job = wait_until_running(bpe.run_url)
        # The command asks the cluster this machine's own configuration names (SLURM_CONF),
        # as any Slurm command does: the manifest records only that the run used Slurm.
        code, document = cli_json("status", bpe.run_url)
        assert (code, document["engine_error"], document["backend"]) == (0, None, "slurm")
        assert document["verified"] is True  # the secret of a run made here is here
        assert [(j["state"], j["job_id"]) for j in document["jobs"]] == [("Running", job.job_id)]
        result = cli("cancel", bpe.run_url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"cancelled 1 job on slurm: {job.job_id}" in result.stdout
        cf.wait([future], timeout=60)  # a hang guard: scancel ends it at once
        assert future.done(), "scancel did not end the call"
        assert_cancelled(future)
    finally:
        bpe.shutdown(wait=False, cancel_futures=True)


CLIENT = """
import sys, time
from batchpool import BatchPoolExecutor
bpe = BatchPoolExecutor(storage=sys.argv[1], cleanup_bucket=False, max_workers=1, name="lost")
bpe.submit(time.sleep, 600)  # still running when the test looks: it kills the worker
print(bpe.run_url, flush=True)
time.sleep(600)  # killed by the test once the job runs
"""


def test_a_run_whose_client_died(tmp_path: Path) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CLIENT), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        run_url = client.stdout.readline().strip()
        job = wait_until_running(run_url)
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    try:
        # The worker finishes its job after its client died: the job still runs.
        code, document = cli_json("runs", str(tmp_path))
        assert code == 0
        [run] = document["runs"]
        assert (run["state"], run["job_counts"]) == ("detached", {"Running": 1})
        result = cli("status", run_url)
        assert result.returncode == 0, result.stderr
        assert status_fields(result.stdout)["state"] == "detached"
    finally:
        if process_started(job.pid or 0) == job.pid_started:
            os.kill(job.pid or 0, signal.SIGKILL)
    # Its worker is gone too: nobody will write the job's result.
    deadline = time.monotonic() + 60
    while process_started(job.pid or 0) == job.pid_started:
        assert time.monotonic() < deadline, "the worker did not die"
        time.sleep(0.05)
    result = cli("status", run_url)
    assert result.returncode == 1, result.stderr
    fields = status_fields(result.stdout)
    assert (fields["state"], fields["jobs"]) == ("detached", "1 Error")
    [error] = cli_json("status", run_url)[1]["jobs"]
    assert error["reason"] == f"its worker process {job.pid} is gone"
    result = cli("clean", run_url)  # nothing runs there any more
    assert result.returncode == 0, result.stderr
    assert not Path(run_url).exists()


# -- object storage ---------------------------------------------------------------------------


def test_a_run_in_s3(s3_storage: dict[str, Any]) -> None:
    with BatchPoolExecutor(**s3_storage, cleanup_bucket=False, max_workers=2, name="remote") as bpe:
        assert bpe.submit(shout, 7).result(timeout=30) == 7
        run_url = bpe.run_url
    assert run_url.startswith("s3://")
    options = [
        f"--storage-option={key}={json.dumps(value)}"
        for key, value in s3_storage["storage_options"].items()
    ]
    code, document = cli_json("runs", s3_storage["storage"], *options)
    assert code == 0
    assert [(run["name"], run["url"]) for run in document["runs"]] == [("remote", run_url)]
    result = cli("status", f"{s3_storage['storage']}/remote", *options)
    assert result.returncode == 0, result.stderr
    assert status_fields(result.stdout)["run"] == run_url
    assert status_fields(result.stdout)["jobs"] == "1 Success"
    result = cli("logs", run_url, "00000000", *options)
    assert (result.returncode, result.stdout) == (0, "hello from call 7\ncall 7 on stderr\n")
    result = cli("clean", run_url, *options)
    assert result.returncode == 0, result.stderr
    result = cli("runs", s3_storage["storage"], *options)  # a prefix with no objects left
    assert (result.returncode, result.stdout.strip()) == (0, f"no runs in {s3_storage['storage']}")
    result = cli("runs", "s3://no-such-bucket-here/runs", *options)
    assert result.returncode == 2 and "does not exist" in result.stderr


# -- clean ------------------------------------------------------------------------------------


@pytest.fixture
def aged_runs(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """Two finished runs, the first created (its manifest says) in 2020."""
    urls = []
    for name in ("old", "new"):
        with BatchPoolExecutor(
            storage=str(tmp_path), cleanup_bucket=False, max_workers=1, name=name
        ) as bpe:
            assert bpe.submit(square, 3).result(timeout=30) == 9
            urls.append(bpe.run_url)
    make_old(urls[0])
    yield tmp_path, urls[0], urls[1]


def test_clean_older_than(aged_runs: tuple[Path, str, str]) -> None:
    storage, old, new = aged_runs
    result = cli("clean", str(storage), "--older-than", "7d", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"would delete {old} (" in result.stdout and new not in result.stdout
    assert Path(old).exists()

    code, document = cli_json("clean", str(storage), "--older-than", "1w", "--dry-run")
    assert code == 0 and document["dry_run"] is True
    assert [run["url"] for run in document["deleted"]] == [old]

    result = cli("clean", str(storage), "--older-than", "7d")
    assert result.returncode == 0, result.stderr
    assert f"deleted {old} (" in result.stdout and "freed " in result.stdout
    assert not Path(old).exists() and Path(new).exists()

    result = cli("clean", str(storage), "--older-than", "7d")
    assert (result.returncode, result.stdout.strip()) == (
        0,
        f"no run in {storage} is older than 7d",
    )

    result = cli("clean", new)
    assert result.returncode == 0, result.stderr
    assert f"deleted {new} (" in result.stdout and not Path(new).exists()


def test_clean_with_a_bad_age(tmp_path: Path) -> None:
    for age in ("7", "7x", "d7", "-1d"):
        result = cli("clean", str(tmp_path), f"--older-than={age}")
        assert result.returncode == 2, age
        assert "30s, 15m, 12h, 7d or 2w" in result.stderr and "Traceback" not in result.stderr
