"""HTCondorBackend against a real single-node HTCondor pool, started by ``ci/htcondor.sh``.

The pool runs Debian 13's minicondor in a container on the host network; the client is
this process, through the ``htcondor2`` bindings and a token for the pool's job user.
Jobs run as that user (HTCondor never runs jobs as root), so every store and log folder
here is one that user may write, and the umask is 0 while a test runs: the folders
batchpool creates in the store stay writable by the jobs.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from htcondor_pool import HTCondorPool
from outages import wait_until
from test_cli import cli, cli_json, wait_until_running

from batchpool import BatchPoolExecutor, WorkerLostError
from batchpool.backends.base import JobSpec, JobState, Notify, Resources, backend_class
from batchpool.backends.htcondor import HTCondorBackend, environment_value

pytestmark = pytest.mark.htcondor

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """Folders this process creates stay writable by the pool's job user."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def logs(htcondor_pool: HTCondorPool) -> Path:
    return htcondor_pool.folder("logs")


@pytest.fixture
def store(htcondor_pool: HTCondorPool) -> Path:
    return htcondor_pool.folder("store")


def shell_job(name: str, script: str, env: dict[str, str] | None = None, **res: object) -> JobSpec:
    """A job whose "python" is ``sh -c SCRIPT``: the worker's arguments follow, unused."""
    resources = Resources(python=("/bin/sh", "-c", script, "sh")).replace(**res)
    return JobSpec(
        name=name, args=("--chunk", "c", "--attempt", "1"), env=env or {}, resources=resources
    )


def wait_final(backend: HTCondorBackend, ids: Sequence[str]) -> dict[str, JobState]:
    states: dict[str, JobState] = {}

    def over() -> bool:
        states.update(backend.status(ids))
        return all(states[j].is_final for j in ids)

    wait_until("the jobs to end", over, timeout=120)
    return states


class Recording(HTCondorBackend):
    """An HTCondorBackend that remembers the ids it returned."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.ids: list[str] = []

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        ids = super().submit(jobs, notify)
        self.ids += ids
        return ids


def triple(x: int) -> int:
    return 3 * x


def fail(x: int) -> int:
    raise KeyError(f"no key {x}")


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def chatty(x: int) -> int:
    print(f"hello from htcondor {x}", flush=True)
    return x


def die_first(x: int, folder: str) -> int:
    """SIGKILLs its own worker on the first run (a mark file says it ran)."""
    mark = Path(folder) / f"ran-{x}"
    if not mark.exists():
        mark.touch()
        os.kill(os.getpid(), 9)
    return x


def wait_for(path: str, seconds: float) -> str:
    stop = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < stop:
        time.sleep(0.1)
    return path


# -- without a pool ---------------------------------------------------------------------------


def test_registered_by_name() -> None:
    assert backend_class("htcondor") is HTCondorBackend


def test_environment_is_quoted_by_htcondors_rules() -> None:
    value = environment_value({"A": "1", "J": '{"k": "it\'s"}', "S": "two words"})
    assert value == '"A=\'1\' J=\'{""k"": ""it\'\'s""}\' S=\'two words\'"'
    with pytest.raises(ValueError, match="B holds a newline"):
        environment_value({"B": "x\ny"})
    with pytest.raises(ValueError, match="C holds '\\$\\$', which HTCondor reads as a match-time"):
        environment_value({"C": "pa$$word"})


def test_job_options_become_submit_commands(logs: Path) -> None:
    backend = HTCondorBackend(log_dir=logs, accounting_group="group_lab.alice")
    job = shell_job(
        "run-00000001-1",
        "true",
        cpus=1.5,
        memory="2G",
        gpus=1,
        walltime="01:30:00",
        extra_args=['+JobFlavour = "espresso"'],
    )
    description = backend.description([job])
    assert {k: description[k] for k in ("request_cpus", "request_memory", "request_gpus")} == {
        "request_cpus": "2",
        "request_memory": "2048",
        "request_gpus": "1",
    }
    assert description["allowed_execute_duration"] == "5400"
    assert description["accounting_group"] == "group_lab.alice"
    assert description["+JobFlavour"] == '"espresso"'
    assert description["arguments"] == "$(Process)"
    with pytest.raises(ValueError, match="HTCondor has no queues"):
        backend.description([shell_job("q", "true", queue="short")])
    with pytest.raises(ValueError, match="not a submit description line"):
        backend.description([shell_job("x", "true", extra_args=["--mem=4G"])])


# -- against the pool -------------------------------------------------------------------------


def test_one_cluster_per_group_and_environment_arrives_exactly(
    htcondor_pool: HTCondorPool, logs: Path
) -> None:
    backend = HTCondorBackend(log_dir=logs)
    out = htcondor_pool.folder("env")
    tricky = {
        "JSON": '{"fs": "{\\"cls\\": \\"x\\"}", "root": "/a b", "it\'s": [1, 2.5]}',
        "MACRO": "$(Cluster) $HOME ${PATH} $ \\$ a$",
        "SPACES": "  two  words ",
        "UNICODE": "café ✓",
    }
    # sh -c SCRIPT sh -m batchpool.worker <args>: $3 is the job's own argument
    script = f'for v in {" ".join(tricky)}; do eval "printf %s \\"\\$$v\\"" > "{out}/$3.$v"; done'
    jobs = [
        JobSpec(
            name="run-0000000a-1",
            args=(str(i),),
            env=tricky,
            resources=Resources(python=("/bin/sh", "-c", script, "sh")),
        )
        for i in range(3)
    ]
    other = shell_job("run-0000000b-1", "exit 3", memory="200M")
    ids = backend.submit([*jobs, other])
    assert backend.submit_calls == 2  # the three alike are one cluster of three procs
    assert len({i.split(".")[0] for i in ids}) == 2
    assert [i.split(".")[1] for i in ids] == ["0", "1", "2", "0"]
    split = HTCondorBackend(log_dir=logs, max_cluster_size=2)
    more = split.submit(jobs)  # three alike, at most two per cluster
    assert split.submit_calls == 2 and [i.split(".")[1] for i in more] == ["0", "1", "0"]
    ids += more
    states = wait_final(backend, ids)
    assert [states[i] for i in ids] == [JobState.SUCCEEDED] * 3 + [JobState.FAILED] + [
        JobState.SUCCEEDED
    ] * 3
    for i in range(3):
        got = {v: (out / f"{i}.{v}").read_text(encoding="utf-8") for v in tricky}
        assert got == tricky, i
    assert "ExitCode=3" in backend.explain(ids[3])


def test_map_in_order_errors_keep_their_type_and_env_reaches_the_job(
    logs: Path, store: Path
) -> None:
    backend = Recording(log_dir=logs)
    with BatchPoolExecutor(
        backend=backend,
        storage=str(store),
        max_workers=4,
        cleanup_bucket=False,
        job_options={"env": {"GREETING": 'it\'s "quoted" $(x)'}},
    ) as bpe:
        assert list(bpe.map(triple, range(12), chunksize=4, timeout=120)) == [
            3 * x for x in range(12)
        ]
        with pytest.raises(KeyError, match="no key 7"):
            bpe.submit(fail, 7).result(timeout=120)
        assert bpe.submit(getenv, "GREETING").result(timeout=120) == 'it\'s "quoted" $(x)'
        assert bpe.submit(chatty, 5).result(timeout=120) == 5
    # what the call printed is in the run's logs/ and in the job's own output file
    assert any("hello from htcondor 5" in log.read_text() for log in store.glob("*/logs/*.log"))
    engine_log = logs / f"htcondor-{backend.ids[-1]}.out"
    assert "hello from htcondor 5" in engine_log.read_text()
    assert backend.submit_calls <= 6  # the map's three chunks went in at most three hand-overs


def test_a_killed_worker_runs_again_as_a_new_attempt(
    htcondor_pool: HTCondorPool, logs: Path, store: Path
) -> None:
    marks = htcondor_pool.folder("marks")
    with BatchPoolExecutor(
        backend=HTCondorBackend(log_dir=logs), storage=str(store), max_attempts=2
    ) as bpe:
        assert bpe.submit(die_first, 5, str(marks)).result(timeout=180) == 5
    with BatchPoolExecutor(
        backend=HTCondorBackend(log_dir=logs), storage=str(store), max_attempts=1
    ) as bpe:
        future = bpe.submit(die_first, 6, str(marks))
        with pytest.raises(WorkerLostError, match="killed by SIGKILL") as error:
            future.result(timeout=180)
    assert "HTCondor says JobStatus=4 (completed)" in str(error.value)


def test_walltime_holds_the_job_and_the_error_names_the_limit(logs: Path, store: Path) -> None:
    backend = HTCondorBackend(log_dir=logs)
    with BatchPoolExecutor(backend=backend, storage=str(store), max_attempts=1) as bpe:
        future = bpe.options(walltime="3").submit(time.sleep, 120)
        with pytest.raises(WorkerLostError) as error:
            future.result(timeout=180)
    text = str(error.value)
    assert "HoldReasonCode=47" in text and "exceeded allowed execute duration" in text
    assert "killed: runtime limit of 3 s (the walltime job option)" in text
    job_id = next(iter(backend._ads))
    # a held job does not stay in the queue: batchpool removed it, saying why
    wait_until(
        "the held job to leave the queue",
        lambda: backend._ads_of([job_id])[job_id]["JobStatus"] == 3,
    )


def test_future_cancel_removes_a_queued_job(logs: Path, store: Path) -> None:
    # A requirement no machine meets keeps the job idle, as on a busy pool.
    backend = Recording(log_dir=logs, submit_options={"requirements": "false"})
    with BatchPoolExecutor(backend=backend, storage=str(store)) as bpe:
        future = bpe.submit(triple, 1)
        wait_until("the call to be handed over", lambda: backend.ids)
        assert future.running()  # handed to HTCondor, idle in its queue
        assert future.cancel() and future.cancelled()
        done, _ = cf.wait([future], timeout=60)  # at once: the timeout is a hang guard
        assert done == {future}
        job_id = backend.ids[0]
        wait_until(
            "HTCondor to report the job removed",
            lambda: backend.status([job_id])[job_id] is JobState.CANCELLED,
        )
    assert backend._ads[job_id]["JobStatus"] == 3  # removed (the schedd keeps no reason)


def test_a_store_the_jobs_user_cannot_write_is_refused_at_construction(
    htcondor_pool: HTCondorPool, tmp_path: Path, logs: Path
) -> None:
    backend = HTCondorBackend(log_dir=logs)
    private = tmp_path / "store"  # under pytest's own 0700 folder
    with pytest.raises(
        ValueError, match=f"HTCondor runs jobs as '{htcondor_pool.job_user}', never as root"
    ) as error:
        BatchPoolExecutor(backend=backend, storage=str(private))
    assert "cannot enter" in str(error.value) and "Run the client as" in str(error.value)
    os.umask(0o022)
    with pytest.raises(ValueError, match="umask is 022"):
        BatchPoolExecutor(backend=backend, storage=str(htcondor_pool.folder("store")))


def test_status_and_cancel_from_another_process(logs: Path, store: Path) -> None:
    bpe = BatchPoolExecutor(
        backend=HTCondorBackend(log_dir=logs),
        storage=str(store),
        cleanup_bucket=False,
        max_workers=1,
    )
    try:
        future = bpe.submit(time.sleep, 120)
        job = wait_until_running(bpe.run_url, deadline=120)
        code, document = cli_json("status", bpe.run_url)
        assert (code, document["engine_error"], document["backend"]) == (0, None, "htcondor")
        assert [(j["state"], j["job_id"]) for j in document["jobs"]] == [("Running", job.job_id)]
        result = cli("cancel", bpe.run_url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"cancelled 1 job on htcondor: {job.job_id}" in result.stdout
        cf.wait([future], timeout=120)  # a hang guard: the removal ends it at once
        assert future.done(), "the removal did not end the call"
    finally:
        bpe.shutdown(wait=False, cancel_futures=True)


def test_the_example_runs_unchanged_on_htcondor(logs: Path, store: Path) -> None:
    argv = [
        sys.executable, str(REPO / "examples" / "anywhere.py"), "--backend", "htcondor",
        "--backend-option", f"log_dir={logs}", "--storage", str(store), "--blocks", "4",
    ]  # fmt: skip
    example = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    assert example.returncode == 0, example.stderr[-3000:]
    assert "primes below 100,000 (computed on batchpool-htcondor)" in example.stdout
