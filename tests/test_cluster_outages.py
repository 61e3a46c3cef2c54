"""A real scheduler restart: slurmctld or sge_qmaster stopped while jobs run, then started.

``bash ci/slurm.sh stop-controller`` (``ci/sge.sh``) stops only the controller, by its
PID file: slurmd (sge_execd) and the jobs it runs carry on, and every client command
fails meanwhile (``sbatch``/``squeue`` with "Unable to contact slurm controller" after
~9-18 s each, ``qsub``/``qstat`` with "unable to send message to qmaster" at once).
``start-controller`` starts it again; it reloads its saved state and learns from the
node what ended meanwhile.

The controller stays down far shorter than ``engine_outage_grace``, and on SGE longer
than the old rule took to give up (every job in flight lost after 10 failed status
queries in a row, then run again while the old one still ran; a failed submission
failed its calls at once). That rule counted queries, not seconds: ~20 s on SGE, whose
qstat fails at once, but ~200 s on Slurm, whose squeue takes ~18 s to fail. On Slurm
the outage is 40 s: jobs end and new ones wait to be submitted while slurmctld
is down, which is what this test is for; outlasting the old rule's count there would
cost the suite three more minutes, and ``test_engine_outages.py`` already refuses more
queries than that rule allowed. The tests assert counts, never times: each call ran once (one start
in its mark file), in its first attempt (one ``.1.start`` marker per chunk in the store,
none of a second attempt), and every result came back in order. The controller is
started again in a ``finally``, so a failing test leaves the cluster as it found it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from htcondor_pool import HTCondorPool
from outages import attempts, count, mark_and_sleep, wait_until
from test_sge import sge  # noqa: F401  (the session fixture that starts SGE)
from test_slurm import slurm  # noqa: F401  (the session fixture that starts Slurm)

from batchpool import BatchPoolExecutor
from batchpool.backends.base import Backend
from batchpool.backends.htcondor import HTCondorBackend
from batchpool.backends.sge import SGEBackend
from batchpool.backends.slurm import SlurmBackend

CI = Path(__file__).resolve().parent.parent / "ci"
#: Seconds the controller stays down, well within the grace. qstat fails at once, so the
#: old rule's 10 failed queries took ~20 s at the 2 s poll ceiling: SGE's outage outlasts
#: them. squeue takes ~18 s to fail (sbatch ~9 s): long enough for several failed
#: queries and submissions in Slurm's 40 s.
SGE_OUTAGE = 30
SLURM_OUTAGE = 40
#: The schedd's shadows go with it; the starters keep the jobs running and the schedd
#: reconnects to them when it is back (their job lease is 40 minutes).
HTCONDOR_OUTAGE = 15
#: Seconds each call runs: longer than stopping the controller takes (~1 s for
#: slurmctld, ~9 s for a controlled shutdown of sge_qmaster), so the first calls are
#: still running when it is gone and end while it is down.
NAP = 15
#: Two waves of two: the first runs as the controller stops and ends while it is down;
#: the second is handed over (held while it is down) and runs after it is back.
ITEMS = list(range(4))


def controller(script: str, action: str) -> str:
    """``bash ci/<script> stop-controller|start-controller``: its output, or a failure."""
    proc = subprocess.run(
        ["bash", str(CI / script), action],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ci/{script} {action}: {output}"
    return output


@contextmanager
def controller_down(script: str) -> Iterator[list[str]]:
    """The controller is stopped inside the block and always started again after it;
    the list yielded gets what ``start-controller`` said."""
    said: list[str] = []
    try:
        controller(script, "stop-controller")
        yield said
    finally:
        said.append(controller(script, "start-controller"))


#: What each engine says of its nodes and jobs, put in the failure of a test that failed.
ENGINE_STATE = {
    "slurm.sh": [["sinfo", "--Node", "--long"], ["squeue", "--all"]],
    "sge.sh": [["qstat", "-f", "-u", "*"]],
    "htcondor.sh": [],
}


def engine_state(script: str) -> str:
    said = []
    for argv in ENGINE_STATE[script]:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            said.append(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            said.append(f"$ {' '.join(argv)}\n{exc}")
    return "\n".join(said)


def map_through_a_restart(
    backend: Backend, script: str, outage: float, tmp_path: Path, nap: float = NAP
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    bpe = BatchPoolExecutor(
        backend=backend,
        storage=str(tmp_path / "store"),
        max_workers=2,
        engine_outage_grace=600,
        cleanup_bucket=False,  # the start markers are read after the executor closed
    )
    try:
        # Without buffersize every chunk is handed to the executor now; two run at once.
        n = len(ITEMS)
        results = bpe.map(
            mark_and_sleep, ITEMS, [str(marks)] * n, [nap] * n, chunksize=1, timeout=outage + 300
        )
        wait_until("a call started", lambda: count(marks))
        with controller_down(script) as said:
            time.sleep(outage)  # the fault itself, not an assertion
        # Someone else's `bash ci/<script>` would have started it early (the script
        # waits while it is held down, up to 15 min): then this tested a shorter outage.
        assert "already running" not in said[0], f"the outage was cut short: {said[0]}"
        assert list(results) == [x * 10 for x in ITEMS]
        run_url = bpe.run_url
    except Exception as exc:
        # Not `with`: its shutdown would wait for jobs the engine may never run, and the
        # hang would end the whole session (pytest-timeout's thread method).
        bpe.shutdown(wait=False, cancel_futures=True)
        raise AssertionError(f"{exc!r}; the engine says:\n{engine_state(script)}") from exc
    bpe.shutdown(wait=True)
    assert count(marks) == dict.fromkeys(ITEMS, 1)  # each call ran once
    # map's chunks have no future of their own to ask for ``job.attempt``; the store
    # has one start marker per job that ran: ``events/<chunk>.<attempt>.start``.
    found = attempts(Path(run_url, "events").glob("*.start"), "events")
    assert found == [1] * len(ITEMS), found  # one job per chunk, no retry


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
@pytest.mark.timeout(SLURM_OUTAGE + 400)
def test_slurmctld_restart_costs_no_run_and_no_result(tmp_path: Path) -> None:
    backend = SlurmBackend(log_dir=tmp_path / "slurm-logs")
    map_through_a_restart(backend, "slurm.sh", SLURM_OUTAGE, tmp_path)


@pytest.mark.sge
@pytest.mark.usefixtures("sge")
@pytest.mark.timeout(SGE_OUTAGE + 400)
def test_sge_qmaster_restart_costs_no_run_and_no_result(tmp_path: Path) -> None:
    map_through_a_restart(SGEBackend(), "sge.sh", SGE_OUTAGE, tmp_path)


@pytest.mark.timeout(HTCONDOR_OUTAGE + 400)
def test_htcondor_schedd_restart_costs_no_run_and_no_result(htcondor_pool: HTCondorPool) -> None:
    # Jobs run as the pool's user: its folders, and a umask that keeps new ones writable.
    folder = htcondor_pool.folder("outage")
    old = os.umask(0)
    try:
        backend = HTCondorBackend(log_dir=folder / "logs")
        # condor_off stops the schedd within a second: shorter calls still outlast it
        map_through_a_restart(backend, "htcondor.sh", HTCONDOR_OUTAGE, folder, nap=8)
    finally:
        os.umask(old)
