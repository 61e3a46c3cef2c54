"""Operating a run through the public API: job states, job records, logs on errors,
usage and cost, progress, re-attaching after the client was killed, and resume."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from test_slurm import slurm  # noqa: F401  (the session fixture that starts Slurm)

from batchpool import BatchPoolExecutor
from batchpool.runs import open_run, read_run

TESTS = Path(__file__).resolve().parent


def mark_and_square(marks: str, i: int, seconds: float = 0.0, gate: str | None = None) -> int:
    """Leave one file per run of the call (so a test counts runs), then return i*i; with a
    ``gate``, only once that file exists."""
    if gate is not None:
        wait_gate(gate)
    Path(marks, f"{i}.{os.getpid()}.{uuid.uuid4().hex}").touch()
    print(f"squaring {i}", flush=True)
    time.sleep(seconds)
    return i * i


def flaky(marks: str, i: int) -> int:
    """Raise for the items named by a file ``fail-<i>`` in ``marks``; count every run."""
    Path(marks, f"{i}.{uuid.uuid4().hex}").touch()
    if Path(marks, f"fail-{i}").exists():
        raise ValueError(f"item {i} failed")
    return i * 10


def chatty_failure(x: int) -> int:
    print(f"loading shard {x}", flush=True)
    print("about to divide", flush=True)
    return 1 // (x - x)


def burn_and_hold(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page: resident, not just reserved
        block[i] = 1
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    return len(block)


def runs_of(marks: Path, i: int) -> int:
    return sum(1 for p in marks.iterdir() if p.name.split(".", 1)[0] == str(i))


def test_status_counts_calls_by_state(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as bpe:
        assert bpe.status() == {}
        try:
            blocked = bpe.submit(wait_gate, str(gate))
            queued = [bpe.submit(int, "7") for _ in range(3)]
            # One worker runs the blocked call's job (with any call that shares its
            # chunk); the job behind it waits in the pool's queue (Ready); the rest of
            # the backlog is parked in storage (Pending). Nothing moves until the gate
            # opens, once both jobs are handed over: wait for that state, however long.
            deadline = time.monotonic() + 60
            counts = bpe.status()
            while counts.get("Running", 0) < 1 or counts.get("Ready", 0) < 1:
                assert time.monotonic() < deadline, counts
                time.sleep(0.05)
                counts = bpe.status()
            assert sum(counts.values()) == 4 and set(counts) <= {"Running", "Ready", "Pending"}
            assert counts["Running"] >= 1 and counts["Ready"] >= 1, counts
            queued[-1].cancel()
        finally:
            gate.touch()
        assert blocked.result(timeout=30) == "opened"
        failing = bpe.submit(int, "not a number")
        with pytest.raises(ValueError):
            failing.result(timeout=30)
        done = [f.result(timeout=30) for f in queued if not f.cancelled()]
        assert done == [7] * len(done)
    cancelled = sum(f.cancelled() for f in queued)
    assert bpe.status() == {
        state: n
        for state, n in {"Success": 1 + len(done), "Failed": 1, "Cancelled": cancelled}.items()
        if n
    }


def wait_gate(gate: str) -> str:
    while not os.path.exists(gate):
        time.sleep(0.02)
    return "opened"


def test_future_job_tells_where_and_how_a_call_ran(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as bpe:
        future = bpe.submit(burn_and_hold, 50)
        assert future.result(timeout=60) == 50 * 1024 * 1024
        job = future.job
        assert job is not None
        assert job.state == "Success" and job.exit == "ok" and job.attempt == 1
        assert job.host == os.uname()[1]
        assert job.started is not None and job.ended is not None
        assert job.duration is not None and job.duration >= 0.3
        assert job.cpu_seconds is not None and job.cpu_seconds >= 0.25
        # the job's own peak, not the worker's from earlier jobs
        assert job.peak_memory_bytes is not None and job.peak_memory_bytes >= 50 * 1024 * 1024
        failed = bpe.submit(chatty_failure, 3)
        with pytest.raises(ZeroDivisionError):
            failed.result(timeout=60)
        assert failed.job is not None and failed.job.state == "Failed"
        assert (
            failed.job.exit == "1/1 raised: ZeroDivisionError: integer division or modulo by zero"
        )


def test_errors_end_with_the_last_lines_of_the_jobs_log(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as bpe:
        future = bpe.submit(chatty_failure, 4)
        with pytest.raises(ZeroDivisionError) as info:
            future.result(timeout=60)
        assert future.logs() == "loading shard 4\nabout to divide\n"
    if sys.version_info < (3, 11):
        pytest.skip("exception notes need Python 3.11")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Last lines of the job's log" in notes
    assert "loading shard 4" in notes and "about to divide" in notes


def test_usage_sums_jobs_and_prices_core_hours(tmp_path: Path) -> None:
    with BatchPoolExecutor(
        max_workers=2, storage=str(tmp_path), cpus_per_job=1, cost_per_core_hour=3.6
    ) as bpe:
        assert list(bpe.map(burn_and_hold, [20, 20, 20], chunksize=1)) == [20 * 1024 * 1024] * 3
        usage = bpe.usage()
    assert usage.jobs == 3
    assert usage.cpu_seconds >= 0.75  # 3 x 0.3 s of CPU, minus timer slack
    assert usage.wall_seconds >= usage.cpu_seconds * 0.8
    assert usage.core_seconds == pytest.approx(usage.wall_seconds)  # one CPU per job
    assert usage.peak_memory_bytes >= 20 * 1024 * 1024
    assert usage.cost == pytest.approx(usage.core_hours * 3.6)
    assert "core-hours" in str(usage) and "estimated cost" in str(usage)


def test_the_store_tells_the_same_story(tmp_path: Path) -> None:
    """What ``read_run`` (and so the CLI) derives from markers and the journal."""
    with BatchPoolExecutor(
        name="story", max_workers=2, storage=str(tmp_path), cleanup_bucket=False
    ) as bpe:
        ok = bpe.submit(int, "5")
        bad = bpe.submit(chatty_failure, 1)
        assert ok.result(timeout=60) == 5
        with pytest.raises(ZeroDivisionError):
            bad.result(timeout=60)
        url = bpe.run_url
    view = read_run(open_run(url))
    assert view.name == "story" and view.state == "closed"
    assert view.counts() == {"Success": 1, "Failed": 1}
    jobs = {job.state: job for job in view.jobs}
    assert jobs["Failed"].job_ids and jobs["Failed"].host == os.uname()[1]
    assert jobs["Failed"].failed_calls == 1
    assert "about to divide" in view.log(jobs["Failed"])
    assert view.usage().jobs == 2
    # the chunks are numbered in submission order
    assert [job.chunk[:8] for job in view.jobs] == ["00000000", "00000001"]
    # At close the manifest gets the job table: engine job ids, attempts, state.
    assert view.manifest is not None
    table = view.manifest.jobs
    assert {row.state for row in table.values()} == {"Success", "Failed"}
    assert all(row.attempts == 1 and len(row.job_ids) == 1 for row in table.values())


def test_progress_bar_counts_calls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path)) as bpe:
        assert list(bpe.map(int, ["1", "2", "3"] * 4, progress=True)) == [1, 2, 3] * 4
        # The last chunk's value wakes the map before its done-callback counts it on
        # the bar (in the watcher's thread): the bar ends a moment after the map.
        err = capsys.readouterr().err
        deadline = time.monotonic() + 30  # a hang guard, not a timing assertion
        while "12/12" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
        assert "12/12" in err and "failed=0" in err
        # By default: no terminal, no bar.
        assert list(bpe.map(int, ["1", "2"])) == [1, 2]
        assert capsys.readouterr().err == ""


def test_the_bar_counts_a_chunk_after_the_map_let_go_of_its_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``set_result`` wakes map's iterator before the done-callbacks run, and the iterator
    drops the chunk's values as soon as it read them: the bar's callback must not need
    them. Its callback waits here until the map was read to the end."""
    import threading

    import batchpool.progress as progress

    read = threading.Event()
    counted = progress.Progress._ended

    def after_the_map_was_read(self: progress.Progress, batch: object) -> None:
        read.wait(60)
        counted(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(progress.Progress, "_ended", after_the_map_was_read)
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as bpe:
        assert list(bpe.map(int, ["1", "2", "3"], chunksize=3, progress=True)) == [1, 2, 3]
        read.set()
    err = capsys.readouterr().err
    assert "3/3" in err and "failed=0" in err, err


# -- re-attach after the client was killed --------------------------------------------------

CLIENT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from batchpool import BatchPoolExecutor
    from test_operate import mark_and_square

    storage, marks, gate = sys.argv[1], sys.argv[2], sys.argv[3]
    bpe = BatchPoolExecutor(
        name="crash-test", storage=storage, cleanup_bucket=False, max_workers=2
    )
    # The second half waits for the gate, opened once this client is dead.
    futures = [
        bpe.submit(mark_and_square, marks, i, 0.02, gate if i >= 100 else None)
        for i in range(200)
    ]
    print("submitted", flush=True)
    time.sleep(600)
    """
)

ATTACHER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from batchpool import BatchPoolExecutor

    storage = sys.argv[1]
    with BatchPoolExecutor.attach(storage, "crash-test", max_workers=2) as bpe:
        results = [f.result(timeout=90) for f in bpe.futures]
        print(json.dumps({{"results": results, "status": bpe.status()}}))
    """
)


def kill_client_when(
    tmp_path: Path, source: str, args: list[str], marks: Path, started: int
) -> None:
    """Run a client script that prints "submitted" after its submits; SIGKILL it once
    ``started`` of its calls have left their mark."""
    script = tmp_path / "client.py"
    script.write_text(source.format(tests=str(TESTS)))
    client = subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "submitted"
        deadline = time.monotonic() + 90
        while len(list(marks.iterdir())) < started:
            assert time.monotonic() < deadline, "the client's calls never started"
            time.sleep(0.02)
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()


@pytest.mark.timeout(180)
def test_a_killed_client_loses_nothing_and_runs_nothing_twice(tmp_path: Path) -> None:
    storage, marks, gate = tmp_path / "runs", tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    # Killed once some calls ran and most did not yet (half of them wait for the gate).
    args = [str(storage), str(marks), str(gate)]
    kill_client_when(tmp_path, CLIENT, args, marks, started=20)
    started_before = len(list(marks.iterdir()))
    assert 20 <= started_before <= 100
    gate.touch()

    attacher = tmp_path / "attach.py"
    attacher.write_text(ATTACHER.format(tests=str(TESTS)))
    done = subprocess.run(
        [sys.executable, str(attacher), str(storage)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["results"] == [i * i for i in range(200)]
    assert report["status"] == {"Success": 200}
    assert [runs_of(marks, i) for i in range(200)] == [1] * 200  # none ran twice


def test_attach_refuses_while_the_client_lives_and_without_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchpool import BatchPoolError
    from batchpool.recovery import secret_file

    with BatchPoolExecutor(
        name="alive", storage=str(tmp_path), cleanup_bucket=False, max_workers=1
    ) as bpe:
        assert bpe.submit(int, "1").result(timeout=30) == 1
        with pytest.raises(BatchPoolError, match="still runs here"):
            BatchPoolExecutor.attach(str(tmp_path), "alive")
        url = bpe.run_url
    # Its client has shut down: attaching gives the finished calls back.
    with BatchPoolExecutor.attach(str(tmp_path), "alive") as again:
        assert [f.result(timeout=30) for f in again.futures] == [1]
    secret_file(url).unlink()
    monkeypatch.delenv("BATCHPOOL_RUN_SECRET", raising=False)
    with pytest.raises(BatchPoolError, match="secret of the run"):
        BatchPoolExecutor.attach(str(tmp_path), "alive")


# -- resume: only what failed runs again --------------------------------------------------


def test_resume_runs_only_failed_and_missing_calls(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "fail-3").touch()
    (marks / "fail-7").touch()
    storage = str(tmp_path / "runs")
    with BatchPoolExecutor(name="nightly", resume=True, storage=storage, max_workers=2) as bpe:
        first = [f for f in (bpe.submit(flaky, str(marks), i) for i in range(10))]
        cf.wait(first, timeout=60)
        assert [f.exception() is not None for f in first] == [i in (3, 7) for i in range(10)]
        run_url = bpe.run_url
    assert run_url.endswith("/nightly")
    (marks / "fail-3").unlink()
    (marks / "fail-7").unlink()
    with BatchPoolExecutor(name="nightly", resume=True, storage=storage, max_workers=2) as bpe:
        assert bpe.run_url == run_url
        results = list(bpe.map(flaky, [str(marks)] * 12, range(12)))
        assert results == [i * 10 for i in range(12)]
        assert bpe.status() == {"Success": 12}
    # Items 3 and 7 failed and ran again; 10 and 11 are new; the rest ran once.
    assert [runs_of(marks, i) for i in range(12)] == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1]
    manifest = json.loads(Path(run_url, "manifest.json").read_text())
    assert [s["how"] for s in manifest["sessions"]] == ["resume"]
    # The store shows the earlier failures as run again: nothing is left to fix.
    view = read_run(open_run(run_url))
    assert view.troubled() == [] and view.call_counts() == {"Success": 12}
    assert sum(job.rerun for job in view.jobs) >= 1


def test_resume_needs_a_name_and_the_same_serializer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resume=True needs name"):
        BatchPoolExecutor(resume=True, storage=str(tmp_path))
    pytest.importorskip("dill")
    with BatchPoolExecutor(name="r", resume=True, storage=str(tmp_path)) as bpe:
        assert bpe.submit(int, "2").result(timeout=30) == 2
    with pytest.raises(ValueError, match="serializer='cloudpickle'"):
        BatchPoolExecutor(name="r", resume=True, storage=str(tmp_path), serializer="dill")


def test_cancelled_parked_calls_are_skipped_by_the_worker(tmp_path: Path) -> None:
    """Calls written ahead into a chunk stay cancellable until it is handed over."""
    marks = tmp_path / "marks"
    marks.mkdir()
    gate = tmp_path / "gate"
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path / "runs")) as bpe:
        try:
            blocker = bpe.submit(wait_gate, str(gate))
            backlog = [bpe.submit(mark_and_square, str(marks), i) for i in range(20)]
            # Until the gate opens, nothing moves once both in-flight slots are taken
            # (the blocker Running, the job behind it Ready) and the watcher has written
            # the rest of the backlog into chunks (none is queued in memory any more).
            deadline = time.monotonic() + 60
            while bpe._watcher._pending or bpe.status().get("Ready", 0) < 1:
                assert time.monotonic() < deadline, bpe.status()
                time.sleep(0.02)
            parked = [i for i, f in enumerate(backlog) if not f.running()]
            assert len(parked) >= 5
            assert bpe.status()["Pending"] == len(parked)
            assert all(backlog[i].cancel() for i in parked)
        finally:
            gate.touch()
        assert blocker.result(timeout=30) == "opened"
        handed = [i for i in range(20) if i not in parked]
        assert [backlog[i].result(timeout=30) for i in handed] == [i * i for i in handed]
    assert sorted(int(p.name.split(".")[0]) for p in marks.iterdir()) == handed
    assert bpe.status() == {"Success": len(handed) + 1, "Cancelled": len(parked)}


SLURM_CLIENT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from batchpool import BatchPoolExecutor
    from batchpool.backends.slurm import SlurmBackend
    from test_operate import mark_and_square

    storage, marks, logs = sys.argv[1:4]
    bpe = BatchPoolExecutor(
        name="slurm-crash", backend=SlurmBackend(log_dir=logs), storage=storage,
        cleanup_bucket=False,
    )
    futures = [bpe.submit(mark_and_square, marks, i, 2.0) for i in range(6)]
    print("submitted", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slurm
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("slurm")
def test_attach_on_slurm_watches_the_jobs_the_dead_client_left(tmp_path: Path) -> None:
    storage, marks = tmp_path / "runs", tmp_path / "marks"
    marks.mkdir()
    args = [str(storage), str(marks), str(tmp_path / "logs")]
    kill_client_when(tmp_path, SLURM_CLIENT, args, marks, started=1)  # the array started
    # Slurm keeps running the array; a new client watches it through squeue.
    with BatchPoolExecutor.attach(str(storage), "slurm-crash") as bpe:
        assert bpe.backend.name == "slurm"  # rebuilt from the manifest
        assert [f.result(timeout=120) for f in bpe.futures] == [i * i for i in range(6)]
        run_url = bpe.run_url
    assert [runs_of(marks, i) for i in range(6)] == [1] * 6
    logs = subprocess.run(
        [sys.executable, "-m", "batchpool", "logs", run_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert logs.returncode == 0 and "squaring 5" in logs.stdout


PROGRESS_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import batchpool.progress
    from batchpool import BatchPoolExecutor

    def nap(x):
        time.sleep(0.1)
        return x

    default_delay = batchpool.progress.DEFAULT_DELAY
    with BatchPoolExecutor(max_workers=2, storage=sys.argv[1]) as bpe:
        # Short: done before the bar's delay. An hour, so that on a loaded machine too
        # (starting two workers may take longer than the default's two seconds).
        batchpool.progress.DEFAULT_DELAY = 3600.0
        assert list(bpe.map(nap, range(3))) == [0, 1, 2]       # short: no bar
        print("SHORT DONE", file=sys.stderr, flush=True)
        # Long: 60 naps of 0.1 s on two workers last 3 s at least, past the default delay.
        batchpool.progress.DEFAULT_DELAY = default_delay
        assert list(bpe.map(nap, range(60), chunksize=1)) == list(range(60))  # a bar
    """
)


def test_long_maps_show_a_bar_on_a_terminal_by_default(tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    script = tmp_path / "progress.py"
    script.write_text(PROGRESS_SCRIPT)
    leader, follower = pty.openpty()
    # A new pty is 0 columns wide, where tqdm draws nothing: make it a usual terminal.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "runs")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=follower,  # a terminal
            timeout=90,
            check=False,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: all is read
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    err = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, err
    before, _, after = err.partition("SHORT DONE")
    assert "call" not in before  # the short map stayed silent
    assert "60/60" in after and "failed=0" in after


def test_a_requeued_job_that_had_its_result_does_not_run_again(tmp_path: Path) -> None:
    """Slurm may requeue (--requeue) a job after its outcome was written: the worker
    started again for the same attempt leaves the result alone."""
    from batchpool.recovery import secret_file
    from batchpool.serialization import SECRET_ENV
    from batchpool.store import STORE_ENV

    marks = tmp_path / "marks"
    marks.mkdir()
    with BatchPoolExecutor(
        max_workers=1, storage=str(tmp_path / "runs"), cleanup_bucket=False
    ) as bpe:
        assert bpe.submit(mark_and_square, str(marks), 3).result(timeout=30) == 9
        url = bpe.run_url
        spec = bpe._store.spec()
    chunk = next(Path(url, "chunks").iterdir()).name.removesuffix(".in")
    env = {
        **os.environ,
        STORE_ENV: spec,
        SECRET_ENV: secret_file(url).read_text(),
        "SLURM_RESTART_COUNT": "1",
        "PYTHONPATH": str(TESTS),
    }
    done = subprocess.run(
        [sys.executable, "-m", "batchpool.worker", "--chunk", chunk, "--attempt", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "already has its result" in done.stderr
    assert runs_of(marks, 3) == 1


def test_status_from_a_done_callback(tmp_path: Path) -> None:
    seen: list[dict[str, int]] = []
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as bpe:
        future = bpe.submit(int, "3")
        future.add_done_callback(lambda f: seen.append(bpe.status()))
        assert future.result(timeout=30) == 3
    assert seen and seen[0].get("Success") == 1


def test_cancel_json_alone_stops_a_live_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`batchpool cancel` from a machine that cannot reach the engine leaves only
    cancel.json: the client finds it on its own and stops everything."""
    from batchpool import WorkerLostError, watcher

    monkeypatch.setattr(watcher, "CANCEL_CHECK", 0.5)
    monkeypatch.setattr(watcher, "SAFETY_POLL", 0.5)
    gate = tmp_path / "gate"
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path / "runs")) as bpe:
        try:
            blocked = bpe.submit(wait_gate, str(gate))
            backlog = [bpe.submit(int, "1") for _ in range(6)]
            Path(bpe.run_url, "cancel.json").write_text('{"by": "test"}')
            done, _ = cf.wait([blocked, *backlog], timeout=30)
            assert len(done) == 7, "the client never noticed cancel.json"
        finally:
            gate.touch()
    with pytest.raises((WorkerLostError, cf.CancelledError), match="cancel"):
        blocked.result()
    assert all(f.cancelled() or f.exception() is not None for f in backlog)
    assert bpe.status() == {"Cancelled": 7}


def test_async_map_takes_progress_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    async def main() -> list[int]:
        async with BatchPoolExecutor(max_workers=2, storage=str(tmp_path)) as bpe:
            return [r async for r in await bpe.async_map(int, [["4", "5"]], progress=True)]

    assert asyncio.run(main()) == [4, 5]
    assert "2/2" in capsys.readouterr().err
