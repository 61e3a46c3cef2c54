"""What a run costs as the service bills it (``batchpool/billing.py``): the billing rule
against hand-computed figures, core-hours of real runs on the local pool and on Slurm
against the end markers their workers wrote, the time lost to attempts that died, and
``estimate`` before a map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_slurm import slurm  # noqa: F401  (the fixture that starts the local Slurm cluster)

from batchpool import BatchPoolExecutor, Estimate, WorkerLostError
from batchpool.backends.base import Backend
from batchpool.backends.hail import HailBatchBackend
from batchpool.backends.slurm import SlurmBackend
from batchpool.billing import billed_cores, core_size, memory_per_core_gib, record_lost_attempt
from batchpool.documents import Handed, Manifest, decode, encode
from batchpool.runs import RunView, Usage, open_run, read_run

REPO = Path(__file__).resolve().parent.parent


def snooze(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def die_once(flag: str) -> str:
    """Kill the worker process the first time (after it ran a little), return after."""
    if not os.path.exists(flag):
        Path(flag).touch()
        time.sleep(0.3)
        os._exit(1)
    return "second attempt"


def die_always(seconds: float) -> None:
    time.sleep(seconds)
    os._exit(1)


def refuse(x: int) -> int:
    raise ValueError(f"item {x} is bad")


def status_json(run_url: str) -> dict[str, object]:
    """``python -m batchpool status RUN --json``, as a person would run it."""
    result = subprocess.run(
        [sys.executable, "-m", "batchpool", "status", run_url, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


def billed_by_markers(view: RunView, cores: float) -> float:
    """Core-hours from the end markers in storage: every attempt's wall x ``cores``."""
    walls = [e.wall_seconds or 0.0 for job in view.jobs for e in job.ends.values()]
    return sum(walls) * cores / 3600


# -- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "memory", "per_core", "billed"),
    [
        (1, "7G", 3.75, 2),  # Hail's own example: 7 / 3.75 = 1.87 -> 2
        (1, "3G", 3.75, 1),  # 0.8 core of memory: the CPU asked is more
        (0.5, "1G", 3.75, 0.5),  # 0.27 core of memory -> 0.5, the CPUs asked
        (0.25, "512M", 3.75, 0.25),  # the smallest core size
        (0.1, None, 3.75, 0.25),  # less than the smallest size is billed that size
        (1, "16G", 3.75, 8),  # 4.27 -> 8
        (4, "7G", 3.75, 4),
        (1, "15G", 3.75, 4),  # exactly 4 cores of memory stays 4
        (1, "7.5G", 3.75, 2),  # exactly 2
        (3, None, 3.75, 4),  # Hail rounds the cores asked too: 3 -> 4 (5 -> 8 in its docs)
        (1, 7 * 1024**3, 3.75, 2),  # bytes
        (1, "7G", "3.75G", 2),  # the ratio as an amount
        (1, "7G", "3840M", 2),  # 3840 MiB = 3.75 GiB
        (1, "7G", "3.75", 2),  # a bare number is GiB
        (1, "1G", 0.5, 2),  # the Slurm test's figures
        (2, "standard", 3.75, 2),  # Hail's memory words follow the cores
        (1, "highmem", 3.75, 1),
        (1, "7G", None, 1),  # off: the CPUs asked, whatever the memory
        (1, "7G", 0, 1),
        (3, "64G", 0, 3),  # off: no rounding either
        (1.5, None, None, 1.5),
    ],
)
def test_billed_cores_hand_computed(
    cpus: float, memory: str | int | None, per_core: float | str | None, billed: float
) -> None:
    assert billed_cores(cpus, memory, per_core) == billed


def test_core_sizes_are_powers_of_two_from_a_quarter() -> None:
    assert [core_size(c) for c in (0.01, 0.25, 0.3, 0.5, 0.9, 1, 1.01, 2, 3, 5, 16, 17)] == [
        0.25, 0.25, 0.5, 0.5, 1, 1, 2, 2, 4, 8, 16, 32,
    ]  # fmt: skip


@given(
    cpus=st.sampled_from([0.25, 0.5, 1, 2, 4, 8, 16]),
    mib=st.integers(min_value=1, max_value=1 << 20),
    per_core=st.floats(min_value=0.1, max_value=64),
)
def test_billed_cores_is_the_smallest_core_size_that_holds_cpus_and_memory(
    cpus: float, mib: int, per_core: float
) -> None:
    billed = billed_cores(cpus, f"{mib}M", per_core)
    assert billed == core_size(billed)  # a core size
    assert billed >= cpus and billed * per_core * 1024 >= mib * (1 - 1e-9)  # holds both
    smaller = billed / 2
    assert smaller < cpus or smaller * per_core * 1024 < mib or billed == 0.25  # the least


@pytest.mark.parametrize("bad", [-1, "lots", float("nan"), True, [3.75], "3.75 per core"])
def test_a_bad_memory_per_core_says_what_to_pass(bad: object) -> None:
    with pytest.raises(ValueError, match=r"memory_per_core=.*GiB per core"):
        memory_per_core_gib(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"memory_per_core="):
        BatchPoolExecutor(memory_per_core=bad, max_workers=1)  # type: ignore[arg-type]


def test_a_bad_memory_or_cpus_names_it() -> None:
    with pytest.raises(ValueError, match=r"memory='seven'.*'8G'"):
        billed_cores(1, "seven", 3.75)
    with pytest.raises(ValueError, match=r"cpus=0 .*e\.g\. 1"):
        billed_cores(0, "1G", 3.75)


def test_the_hail_service_bills_memory_and_other_engines_do_not() -> None:
    assert HailBatchBackend.memory_per_core == 3.75
    assert Backend.memory_per_core is None
    assert SlurmBackend.memory_per_core is None


def test_usage_shows_lost_time_apart_and_old_journals_still_read() -> None:
    usage = Usage(cost_per_core_hour=1.0)
    usage.add({"wall_seconds": 3600.0, "cpu_seconds": 10.0}, 2.0)
    usage.add({"wall_seconds": 1800.0, "lost": True}, 2.0)
    assert (usage.jobs, usage.lost_attempts) == (1, 1)
    assert usage.core_hours == 3.0 and usage.lost_core_hours == 1.0
    assert usage.cost == 3.0  # lost time is billed
    assert usage.as_dict()["lost_core_hours"] == 1.0
    assert "1.0000 lost core-hours (1 attempt that died)" in str(usage)
    key = "jobs/000000.json"
    old = Handed(chunk="00000000-0123456789ab", attempt=1, job_id="local-1", calls=1)
    assert decode(Handed, key, encode(old, key, None)).billed_cores is None


# -- on the local pool ------------------------------------------------------------------------


def test_usage_and_status_bill_the_cores_the_memory_implies(tmp_path: Path) -> None:
    with BatchPoolExecutor(
        max_workers=2,
        storage=str(tmp_path),
        cleanup_bucket=False,
        cpus_per_job=1,
        memory_per_core=3.75,
        job_options={"memory": "7G"},
    ) as bpe:
        assert list(bpe.map(snooze, [0.1] * 4, chunksize=1)) == [0.1] * 4
        usage = bpe.usage()
        run_url = bpe.run_url
    view = read_run(open_run(run_url))
    assert [job.billed_cores for job in view.jobs] == [2.0] * 4  # the journal's
    assert view.manifest is not None and view.manifest.settings.memory_per_core == 3.75
    expected = billed_by_markers(view, 2.0)
    assert usage.jobs == 4 and usage.lost_attempts == 0
    assert usage.core_hours == pytest.approx(expected, rel=1e-9)
    assert usage.core_hours == pytest.approx(2 * usage.wall_seconds / 3600, rel=1e-9)
    assert view.usage().core_hours == pytest.approx(expected, rel=1e-9)
    document = status_json(run_url)
    shown = document["usage"]
    assert isinstance(shown, dict)
    assert shown["core_hours"] == round(expected, 6)
    assert shown["lost_core_hours"] == 0
    jobs = document["jobs"]
    assert isinstance(jobs, list) and [j["billed_cores"] for j in jobs] == [2.0] * 4


def test_an_attempt_that_died_is_billed_and_shown_apart(tmp_path: Path) -> None:
    with BatchPoolExecutor(
        max_workers=2,
        storage=str(tmp_path / "runs"),
        cleanup_bucket=False,
        memory_per_core=0.5,
        job_options={"memory": "1G"},  # 2 cores
        max_attempts=2,
    ) as bpe:
        retried = bpe.submit(die_once, str(tmp_path / "flag"))
        given_up = bpe.submit(die_always, 0.2)
        assert retried.result(timeout=60) == "second attempt"
        with pytest.raises(WorkerLostError):
            given_up.result(timeout=60)
        usage = bpe.usage()
        run_url = bpe.run_url
    view = read_run(open_run(run_url))
    by_label = {job.labels[0].partition("(")[0]: job for job in view.jobs}
    died, lost = by_label["die_once"], by_label["die_always"]
    # The retried job: attempt 1's marker written by the client, attempt 2's by its worker.
    assert (died.state, died.attempt) == ("Success", 2)
    first = died.ends[1]
    assert first.lost and first.error is not None and first.error.startswith("lost: ")
    assert first.wall_seconds is not None and first.wall_seconds >= 0.3
    assert first.started == died.starts[1].started
    assert not died.ends[2].lost
    # The job given up: Error, both attempts' time lost.
    assert (lost.state, lost.attempt) == ("Error", 2)
    assert [lost.ends[a].lost for a in (1, 2)] == [True, True]
    lost_walls = [e.wall_seconds or 0.0 for job in view.jobs for e in job.ends.values() if e.lost]
    assert len(lost_walls) == 3 and min(lost_walls) >= 0.2
    # The live usage, the store's and the command's agree; lost time is in core_hours.
    assert (usage.jobs, usage.lost_attempts) == (1, 3)
    assert usage.lost_core_hours == pytest.approx(sum(lost_walls) * 2 / 3600, rel=1e-9)
    assert usage.core_hours == pytest.approx(billed_by_markers(view, 2.0), rel=1e-9)
    assert view.usage().lost_core_hours == pytest.approx(usage.lost_core_hours, rel=1e-9)
    shown = status_json(run_url)["usage"]
    assert isinstance(shown, dict)
    lost_hours = round(usage.lost_core_hours, 6)
    assert (shown["lost_attempts"], shown["lost_core_hours"]) == (3, lost_hours)
    assert "3 attempts that died" in str(view.usage())
    # The run's web page shows it too.
    pytest.importorskip("flask")
    import requests

    from batchpool.ui import UIServer

    folder = run_url.rsplit("/", 1)[-1]
    with UIServer(str(tmp_path / "runs")) as ui:
        session = requests.Session()
        session.cookies.set(f"batchpool_ui_{ui.port}", ui.token)
        page = session.get(f"{ui.base_url}/api/runs/{folder}", timeout=30).json()
        html = session.get(f"{ui.base_url}/runs/{folder}", timeout=30).text
    assert (page["lost_attempts"], page["lost_core_hours"]) == (3, round(usage.lost_core_hours, 4))
    assert "core-hours billed for 3 attempts that died without a result" in html


def quick_then_die(x: int) -> int:
    if x == 3:
        os._exit(1)  # kills the worker that ran the jobs before it a moment ago
    return x


def test_jobs_ended_just_before_their_worker_died_keep_their_end_markers(
    tmp_path: Path,
) -> None:
    # A pool worker puts its end markers off while jobs wait (up to a second). One job
    # kills it: the markers of those it ended just before are written by the pool, so
    # storage bills what live usage bills.
    with BatchPoolExecutor(
        max_workers=1, storage=str(tmp_path), cleanup_bucket=False, max_attempts=1
    ) as bpe:
        futures = [bpe.submit(quick_then_die, x) for x in range(5)]
        outcomes = [f.exception(timeout=60) or f.result() for f in futures]
        usage = bpe.usage()
        run_url = bpe.run_url
    assert outcomes[:3] == [0, 1, 2] and isinstance(outcomes[3], WorkerLostError)
    view = read_run(open_run(run_url))
    for job in view.jobs:
        assert set(job.ends) == set(job.starts), (job.chunk, job.starts, job.ends)
    assert usage.core_hours == pytest.approx(billed_by_markers(view, 1.0), rel=1e-9)


def test_a_dead_attempt_that_never_started_leaves_no_marker(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path), cleanup_bucket=False) as bpe:
        bpe.submit(snooze, 0).result(timeout=60)
        store, secret = bpe._store, bpe._watcher._secret
    (job,) = read_run(store).jobs
    assert record_lost_attempt(store, secret, job.chunk, 2, "never ran") is None
    assert not store.exists(store.end_key(job.chunk, 2))
    # Nor over a marker the worker wrote.
    before = store.get(store.end_key(job.chunk, 1))
    assert record_lost_attempt(store, secret, job.chunk, 1, "late news") is None
    assert store.get(store.end_key(job.chunk, 1)) == before


# -- the estimate -----------------------------------------------------------------------------


def test_estimate_times_a_sample_and_scales_it(tmp_path: Path) -> None:
    with BatchPoolExecutor(
        max_workers=2,
        storage=str(tmp_path),
        memory_per_core=3.75,
        job_options={"memory": "7G"},
        cost_per_core_hour=0.5,
    ) as bpe:
        guess = bpe.estimate(snooze, [0.2] * 40, sample=4)
        assert bpe.usage().jobs == 2  # four calls, spread over the two workers
        with pytest.raises(ValueError, match="item 0 is bad"):
            bpe.estimate(refuse, range(100), sample=2)  # the bug shows before the big map
        generated = bpe.estimate(snooze, (0.0 for _ in range(7)), sample=2)
    assert isinstance(guess, Estimate)
    assert (guess.calls, guess.sample, guess.workers, guess.billed_cores) == (40, 4, 2, 2.0)
    assert guess.seconds_per_call >= 0.2
    assert guess.core_hours == pytest.approx(40 * guess.seconds_per_call * 2 / 3600)
    assert guess.wall_seconds == pytest.approx(40 * guess.seconds_per_call / 2)
    assert guess.cost == pytest.approx(guess.core_hours * 0.5)
    text = str(guess)
    assert text.startswith("about ") and "on 2 workers" in text
    assert "core-hours billed" in text and "estimated from 4 calls of snooze" in text
    assert (generated.calls, generated.sample) == (7, 2)
    with pytest.raises(ValueError, match="sample=0"):
        bpe.estimate(snooze, [1], sample=0)


# -- on Slurm ---------------------------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_jobs_are_billed_the_cores_their_memory_implies(slurm: str, tmp_path: Path) -> None:  # noqa: F811
    # The node offers its real memory (ci/slurm.sh: RealMemory from `slurmd -C`); 1G
    # at 0.5 GiB per core bills 2 cores for each 1-CPU job.
    with BatchPoolExecutor(
        backend=SlurmBackend(log_dir=tmp_path / "slurm-logs"),
        storage=str(tmp_path / "runs"),
        cleanup_bucket=False,
        memory_per_core=0.5,
        job_options={"memory": "1G"},
    ) as bpe:
        assert list(bpe.map(snooze, [0.1] * 3, chunksize=1, timeout=120)) == [0.1] * 3
        usage = bpe.usage()
        run_url = bpe.run_url
    view = read_run(open_run(run_url))
    assert [job.billed_cores for job in view.jobs] == [2.0] * 3
    manifest = view.manifest
    assert isinstance(manifest, Manifest) and manifest.settings.memory_per_core == 0.5
    expected = billed_by_markers(view, 2.0)
    assert usage.jobs == 3 and usage.core_hours == pytest.approx(expected, rel=1e-9)
    shown = status_json(run_url)["usage"]
    assert isinstance(shown, dict) and shown["core_hours"] == round(expected, 6)


def test_a_job_found_dead_waits_for_its_retry_and_attach_runs_it_again() -> None:
    # The moment between the client's writing the lost attempt's end marker and its
    # handing over the retry: the store says Pending (as the client counts it), not
    # Error, so a client that attaches then runs the job again instead of giving it up.
    from batchpool.backends.base import Resources
    from batchpool.backends.local import LocalBackend
    from batchpool.chunks import Chunk
    from batchpool.documents import EndMarker, GivenUp, StartMarker
    from batchpool.recovery import _how
    from batchpool.runs import JobView, _derive

    chunk_id = "00000000-0123456789ab"
    start = StartMarker(chunk=chunk_id, attempt=1, host="elsewhere", started=100.0)
    end = EndMarker(chunk=chunk_id, attempt=1, started=100.0, ended=160.0, wall_seconds=60.0,
                    error="lost: its worker process exited with code 1", lost=True)  # fmt: skip
    job = JobView(chunk_id, calls=1, job_ids=["local-1"], starts={1: start}, ends={1: end})
    _derive(job, set(), None)
    assert (job.state, job.exit, job.reason, job.duration) == ("Pending", end.error, None, 60.0)
    backend = LocalBackend(1)
    try:
        how = _how(job, Chunk(chunk_id, [], [], Resources()), backend, "here", 1.0)
    finally:
        backend.close()
    assert (how.how, how.chunk.attempt) == ("new", 2)  # started elsewhere: a new attempt
    given_up = GivenUp(chunk=chunk_id, attempt=1, state="Error", reason="lost, every attempt")
    _derive(job, set(), given_up)
    assert (job.state, job.exit) == ("Error", "lost")
